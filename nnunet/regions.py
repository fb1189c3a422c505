"""Regions: nested groups of labels trained with sigmoid outputs, and the BraTS regions and scores.

A task may declare hierarchical regions in its dataset.json (`--regions`); BraTS (MSD Task01 labels:
1 peritumoral edema, 2 non-enhancing tumour and necrosis, 3 enhancing tumour) is trained on the nested
regions whole tumour {1, 2, 3}, tumour core {2, 3} and enhancing tumour {3} (`--brats`). Validation
reports them with the TensorFlow reference's names, plus the edema (label 1: whole tumour outside the
core) and MeanDice, the mean of TumorCore, PeritumoralEdema and EnhancingTumor (its three classes);
WholeTumor is reported beside it. MeanDice also selects the best checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from utils.errors import UserError

BRATS_REGIONS = [[1, 2, 3], [2, 3], [3]]
BRATS_SCORES = ["WholeTumor", "TumorCore", "EnhancingTumor", "PeritumoralEdema"]
BRATS_MEAN = [1, 2, 3]  # indices into BRATS_SCORES averaged by MeanDice
BRATS_EDEMA = 1


def task_regions(targets: str, config: dict) -> list[list[int]] | None:
    """The regions a model with these targets ("labels", "regions", "brats") is trained on; None for labels."""
    if targets == "brats":
        return BRATS_REGIONS
    if targets == "regions":
        if not config.get("regions"):
            raise UserError("--regions needs regions declared in the task's dataset.json (none were found)")
        return [list(region["labels"]) for region in config["regions"]]
    return None


def score_names(targets: str, config: dict) -> list[str]:
    """Names of the validation scores: the BraTS scores, the regions' names, or the foreground classes'."""
    if targets == "brats":
        return list(BRATS_SCORES)
    if targets == "regions":
        return [region["name"] for region in config["regions"]]
    return [config["labels"][str(value)] for value in range(1, config["n_class"])]


def labels_to_regions(label: torch.Tensor, regions: Sequence[Sequence[int]], channel_dim: int = 1) -> torch.Tensor:
    """Region masks of a label map.

    Args:
        label: integer label map with a channel axis of size 1 at `channel_dim`: (B, 1, *spatial) by default,
            or (1, *spatial) with `channel_dim=0`.
        regions: the label values each region is made of, e.g. BraTS (MSD Task01, 1 edema, 2 non-enhancing
            tumour, 3 enhancing tumour): [[1, 2, 3], [2, 3], [3]] for whole tumour, tumour core, enhancing tumour.
        channel_dim: the channel axis.

    Returns:
        bool masks with R = len(regions) channels at `channel_dim`, e.g. (B, R, *spatial).
    """
    if label.shape[channel_dim] != 1:
        raise ValueError(f"label map of shape {tuple(label.shape)} needs a channel axis of size 1 at {channel_dim}")
    masks = [
        torch.isin(label, torch.as_tensor(list(region), dtype=label.dtype, device=label.device)) for region in regions
    ]
    return torch.cat(masks, dim=channel_dim)


def region_class_order(regions: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """The order in which regions are painted into a label map and the label each one writes.

    Regions are taken from the largest (most labels) to the smallest; each writes the one label it holds that no
    smaller region holds. For BraTS [[1, 2, 3], [2, 3], [3]] this is [(0, 1), (1, 2), (2, 3)].

    Returns:
        (region index, label) pairs in painting order.

    Raises:
        ValueError: when a region does not add exactly one label of its own (the regions are not nested).
    """
    order = sorted(range(len(regions)), key=lambda index: len(regions[index]), reverse=True)
    painted = []
    for position, index in enumerate(order):
        inner = set().union(*(set(regions[later]) for later in order[position + 1:]))
        own = set(regions[index]) - inner
        if len(own) != 1:
            raise ValueError(
                f"region {list(regions[index])} adds labels {sorted(own)} beyond the smaller regions; "
                f"each region must add exactly one label"
            )
        painted.append((index, own.pop()))
    return painted


def regions_to_labels(
    regions_out: torch.Tensor, regions: Sequence[Sequence[int]], threshold: float = 0.5, channel_dim: int = 1
) -> torch.Tensor:
    """Label map from region probabilities or masks.

    The rule is nnU-Net v2's: regions are painted from the largest to the smallest, each writing the label it adds
    (see `region_class_order`), so a voxel takes the label of the innermost region that is on. An inner region that
    is on wins even where an outer one is off (enhancing tumour outside the predicted core is still enhancing).

    Args:
        regions_out: (B, R, *spatial) region probabilities (after the sigmoid) or bool masks, regions at
            `channel_dim`.
        regions: the label values of each region, as for `labels_to_regions`.
        threshold: a probability above this turns a region on; ignored for bool masks.
        channel_dim: the region axis.

    Returns:
        uint8 label map with a channel axis of size 1 at `channel_dim`, e.g. (B, 1, *spatial).
    """
    if regions_out.shape[channel_dim] != len(regions):
        raise ValueError(f"{regions_out.shape[channel_dim]} region channels for {len(regions)} regions")
    masks = regions_out if regions_out.dtype == torch.bool else regions_out > threshold
    label = torch.zeros_like(masks.select(channel_dim, 0), dtype=torch.uint8)
    for index, value in region_class_order(regions):
        label[masks.select(channel_dim, index)] = value
    return label.unsqueeze(channel_dim)
