"""Segmentation metrics: per-class and per-region Dice, and the 95th-percentile Hausdorff distance.

Pure functions shared by validation during training and by `evaluate.py`. The Dice rule for empty
structures follows nnU-Net: a class absent from both the prediction and the target scores 1 (nothing
to find, nothing found), a class absent from only one of them scores 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

HD95_PERCENTILE = 95.0
# How the two directions of HD95 combine: "max", the larger of the two directed 95th percentiles (MONAI,
# nnU-Net v2's evaluation of it); "pooled", the 95th percentile of both directions' distances together (medpy,
# nnU-Net v1). Pooled is never larger; on masks of very different sizes the two can differ by more than 100 %.
HD95_MODES = {
    "max": "larger of the two directed 95th percentiles of surface distances (MONAI)",
    "pooled": "95th percentile of the surface distances of both directions pooled (medpy, nnU-Net v1)",
}


def class_counts(pred: torch.Tensor, target: torch.Tensor, n_class: int) -> tuple[torch.Tensor, ...]:
    """Voxel counts per class of two label maps.

    Three `torch.bincount` passes over the label maps. On (128, 128, 128) uint8 volumes with 4 classes
    they took 13 ms on the CPU where a single bincount of `target * n_class + pred` (the confusion
    matrix) took 46 ms, because the latter needs an int64 index volume.

    Args:
        pred: integer label map, any shape (e.g. (D, H, W) or (1, D, H, W)), values in [0, n_class).
        target: integer label map of the same shape and value range.
        n_class: number of classes, background included.

    Returns:
        (intersection, pred_count, target_count), each (n_class,) int64 on the inputs' device:
        voxels labelled c in both maps, in the prediction, and in the target.

    Raises:
        ValueError: if the shapes differ or a label lies outside [0, n_class).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
    pred = _as_index(pred).reshape(-1)
    target = _as_index(target).reshape(-1)
    try:
        pred_count = torch.bincount(pred, minlength=n_class)
        target_count = torch.bincount(target, minlength=n_class)
    except RuntimeError as error:  # negative labels
        raise ValueError(f"label maps hold values outside [0, {n_class})") from error
    # bincount grows its output past minlength for larger values, so the range check needs no extra pass.
    if pred_count.numel() > n_class or target_count.numel() > n_class:
        raise ValueError(f"label maps hold values outside [0, {n_class})")
    intersection = torch.bincount(target[target == pred], minlength=n_class)
    return intersection, pred_count, target_count


def dice_from_counts(intersection: torch.Tensor, pred_count: torch.Tensor, target_count: torch.Tensor) -> torch.Tensor:
    """Dice 2|P∩T| / (|P| + |T|) from voxel counts, 1 where both P and T are empty.

    Args:
        intersection: (K,) voxels in both prediction and target, for K classes or regions.
        pred_count: (K,) voxels in the prediction.
        target_count: (K,) voxels in the target.

    Returns:
        (K,) float64 Dice in [0, 1]; float64 keeps counts of large volumes (above 2**24 voxels) exact.
    """
    intersection = intersection.to(torch.float64)
    denominator = pred_count.to(torch.float64) + target_count.to(torch.float64)
    return torch.where(denominator > 0, 2 * intersection / denominator.clamp(min=1), torch.ones_like(denominator))


def dice_per_class(pred: torch.Tensor, target: torch.Tensor, n_class: int) -> torch.Tensor:
    """Dice of each foreground class between two integer label maps.

    Args:
        pred: predicted label map, integer dtype, values in [0, n_class). Any shape: (D, H, W), (H, W),
            or with leading singleton axes such as (1, D, H, W); only the voxels are compared, so one
            call scores one case (give batches case by case).
        target: reference label map, same shape and value range.
        n_class: number of classes, background (label 0) included.

    Returns:
        (n_class - 1,) float64 Dice of classes 1 .. n_class - 1, on the inputs' device. A class absent
        from both maps scores 1, a class absent from one map only scores 0.

    Raises:
        ValueError: if the shapes differ or a label lies outside [0, n_class).
    """
    return dice_from_counts(*class_counts(pred, target, n_class))[1:]


def dice_from_regions(pred_regions: torch.Tensor, target_regions: torch.Tensor) -> torch.Tensor:
    """Dice of each region for boolean region masks, which may overlap (BraTS whole tumour, core, enhancing).

    Args:
        pred_regions: (R, *spatial) boolean masks, one per region.
        target_regions: (R, *spatial) boolean masks, same shape.

    Returns:
        (R,) float64 Dice; a region empty in both masks scores 1, empty in one only scores 0.

    Raises:
        ValueError: if the shapes differ.
    """
    if pred_regions.shape != target_regions.shape:
        raise ValueError(
            f"prediction regions {tuple(pred_regions.shape)} do not match target regions {tuple(target_regions.shape)}"
        )
    pred_regions = pred_regions.bool().flatten(1)
    target_regions = target_regions.bool().flatten(1)
    intersection = (pred_regions & target_regions).sum(dim=1)
    return dice_from_counts(intersection, pred_regions.sum(dim=1), target_regions.sum(dim=1))


def hd95(
    pred_mask: np.ndarray | torch.Tensor,
    target_mask: np.ndarray | torch.Tensor,
    spacing: Sequence[float],
    mode: str = "max",
) -> float:
    """Symmetric 95th-percentile Hausdorff distance between two binary masks, in mm.

    The distances are taken between the surface voxels of the two masks (voxels with a face neighbour
    outside the mask), in physical units given by `spacing`, so anisotropic voxels are measured
    correctly. With `mode="max"` the result is the larger of the two directed 95th percentiles
    (prediction to target and target to prediction), computed by MONAI's `compute_hausdorff_distance`
    on the CPU; with `mode="pooled"` it is the 95th percentile of the distances of both directions
    together (medpy's `hd95`). Percentiles are linearly interpolated.

    Args:
        pred_mask: predicted binary mask, spatial shape such as (D, H, W) or (X, Y, Z).
        target_mask: reference binary mask, same shape.
        spacing: voxel size in mm along each axis of the masks, same axis order.
        mode: "max" or "pooled" (`HD95_MODES`).

    Returns:
        The distance in mm: 0.0 when both masks are empty, `inf` when exactly one of them is empty.

    Raises:
        ValueError: if the shapes differ, `spacing` does not give one value per axis or `mode` is unknown.
    """
    if mode not in HD95_MODES:
        raise ValueError(f"HD95 mode {mode!r} is not one of {', '.join(HD95_MODES)}")
    pred_mask = torch.as_tensor(np.asarray(_to_numpy(pred_mask), dtype=bool))
    target_mask = torch.as_tensor(np.asarray(_to_numpy(target_mask), dtype=bool))
    if pred_mask.shape != target_mask.shape:
        raise ValueError(
            f"prediction mask {tuple(pred_mask.shape)} does not match target mask {tuple(target_mask.shape)}"
        )
    if len(spacing) != pred_mask.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not give one value per axis of a {pred_mask.ndim}D mask")
    pred_any, target_any = bool(pred_mask.any()), bool(target_mask.any())
    if not pred_any and not target_any:
        return 0.0
    if pred_any != target_any:
        return float("inf")
    # Imported here: MONAI takes seconds to import, and Dice alone does not need it.
    from monai.metrics import compute_hausdorff_distance
    from monai.metrics.utils import get_edge_surface_distance

    with warnings.catch_warnings():
        # MONAI passes one of its own deprecated arguments internally; the warning is not ours to act on.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        if mode == "pooled":
            # The same surface voxels and distances as MONAI's directed ones, both directions in one set.
            distances = get_edge_surface_distance(pred_mask, target_mask, spacing=[float(s) for s in spacing],
                                                  symmetric=True)[1]
            pooled = torch.cat([d.reshape(-1).double() for d in distances])
            return float(str(np.float32(torch.quantile(pooled, HD95_PERCENTILE / 100).item())))
        distance = compute_hausdorff_distance(
            pred_mask[None, None],
            target_mask[None, None],
            include_background=True,
            percentile=HD95_PERCENTILE,
            spacing=[float(s) for s in spacing],
        )
    # MONAI returns float32; its shortest decimal form drops float32 noise such as 0.800000011920929.
    return float(str(np.float32(distance.item())))


def _as_index(labels: torch.Tensor) -> torch.Tensor:
    if labels.dtype == torch.bool:
        return labels.to(torch.uint8)
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"label maps must have an integer dtype, got {labels.dtype}")
    return labels


def _to_numpy(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        return mask.detach().cpu().numpy()
    return np.asarray(mask)
