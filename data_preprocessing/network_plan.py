"""The network part of a plan: what `config.json` says the U-Net is, and the presets that choose it.

A `NetworkPlan` names every argument the network is built with, so the plan alone rebuilds the model
and an edited plan trains an edited network (`nnunet.network.build_network`). In `config.json` it is
the object under "network" (docs/data_format.md):

    {"kind": "unet" | "resenc_unet", "features": [32, 64, ...], "kernels": [[3, 3, 3], ...],
     "strides": [[1, 1, 1], [2, 2, 2], ...], "encoder_blocks": [2, 2, ...], "decoder_blocks": [2, ...],
     "norm": "instance", "negative_slope": 0.01, "deep_supervision_heads": 0}

One entry per stage (resolution level) in `features`, `kernels`, `strides` and `encoder_blocks`; one per
decoder stage (every stage but the deepest, finest first) in `decoder_blocks`. What a block is depends on
the kind: in a "unet" every block is one convolution (nnU-Net's plain network has two per stage); in a
"resenc_unet" an encoder block is a residual block of two convolutions, after a one-convolution stem, and a
decoder block is one convolution (nnU-Net's residual-encoder presets).

Presets (`preprocess.py --planner`):
* default: nnU-Net's original plain U-Net (two convolutions per stage in the encoder and the decoder),
  32 features doubling per stage up to 320 (3D) or 512 (2D);
* resenc_m / resenc_l / resenc_xl: the residual-encoder U-Nets of "nnU-Net Revisited" (Isensee et al.,
  MICCAI 2024) with 1, 3, 4, 6, 6, ... residual blocks per encoder stage and one convolution per decoder
  stage; patch and batch are chosen so that an estimate of the training memory fits about 8, 24 or 40 GB
  of GPU memory (`data_preprocessing.resenc`).
"""

from __future__ import annotations

import math

from data_preprocessing import planner
from utils.settings import NetworkPlan

PLANNERS = ("default", "resenc_m", "resenc_l", "resenc_xl")
# Residual blocks per encoder stage of the residual-encoder presets; stages past the list repeat its last.
RESENC_BLOCKS = (1, 3, 4, 6, 6, 6)
# Group norm splits channels into at most this many groups; fewer when the feature counts share no such divisor.
MAX_GROUPS = 16


def check_patch(network: NetworkPlan, patch_size: list[int], where: str = "the plan") -> None:
    """The patch must be divisible by the network's total stride along each axis (ValueError otherwise)."""
    total = planner.total_strides(network.strides)
    if len(patch_size) != len(total) or any(size % step for size, step in zip(patch_size, total)):
        raise ValueError(f"{where}: patch size {list(patch_size)} is not divisible by the network's total "
                         f"stride {total}; edit 'patch_size' or the network's 'strides'")


def features_per_stage(n_stages: int, dim: int) -> list[int]:
    """nnU-Net's channel counts: 32 doubling per stage, capped at 320 (3D) or 512 (2D)."""
    cap = 320 if dim == 3 else 512
    return [min(32 * 2**stage, cap) for stage in range(n_stages)]


def encoder_blocks(kind: str, n_stages: int) -> list[int]:
    """Blocks per encoder stage: two convolutions (unet), or the residual presets' 1, 3, 4, 6, 6, ..."""
    if kind == "unet":
        return [2] * n_stages
    return [RESENC_BLOCKS[min(stage, len(RESENC_BLOCKS) - 1)] for stage in range(n_stages)]


def plan_network(patch_size: list[int], spacing: list[float], planner_name: str = "default", *,
                 min_fmap: int = 4, depth: int | None = None) -> NetworkPlan:
    """The network of a preset for a patch (voxels) and its spacing (mm), both (D, H, W) or (H, W).

    Args:
        patch_size: the network's input size.
        spacing: voxel spacing of that input.
        planner_name: one of PLANNERS.
        min_fmap: an axis is not downsampled below this many voxels.
        depth: most stages (default: 6 for the default preset, as nnU-Net v1; unlimited for the residual presets,
            as nnU-Net v2, which stops only at `min_fmap`).

    Raises:
        ValueError: an unknown preset, or a patch too small for 3 stages.
    """
    if planner_name not in PLANNERS:
        raise ValueError(f"unknown planner {planner_name!r}; expected one of {', '.join(PLANNERS)}")
    kind = "unet" if planner_name == "default" else "resenc_unet"
    if depth is None:
        depth = 6 if kind == "unet" else 64
    kernels, strides = planner.kernels_strides(patch_size, spacing, min_fmap, depth)
    n = len(kernels)
    if n < 2:
        raise ValueError(f"patch size {list(patch_size)} allows only {n} U-Net stages (at least 2 needed); "
                         f"use a larger patch or a smaller --min_fmap")
    dim = len(patch_size)
    return NetworkPlan(
        kind=kind,
        features=tuple(features_per_stage(n, dim)),
        kernels=tuple(tuple(k) for k in kernels),
        strides=tuple(tuple(s) for s in strides),
        encoder_blocks=tuple(encoder_blocks(kind, n)),
        decoder_blocks=tuple([2] * (n - 1) if kind == "unet" else [1] * (n - 1)),
    ).checked()


def group_count(features: tuple[int, ...] | list[int]) -> int:
    """Groups of group norm: the largest count up to MAX_GROUPS that divides every stage's features."""
    return math.gcd(MAX_GROUPS, *features)


def override_network(network: NetworkPlan, patch_size: list[int], spacing: list[float], overrides: dict
                     ) -> NetworkPlan:
    """The network of a plan with the command line's model flags applied, for one run.

    Args:
        network: the plan's network.
        patch_size, spacing: the network's window (voxels) and its spacing (mm), for re-planning the stages.
        overrides: the flags given (names of utils.settings.NETWORK_OVERRIDES; absent or None: keep the plan's):
            depth, min_fmap: plan the kernels and strides again with these limits (block counts are cut, or
                their last entry repeated, to the new number of stages);
            filters: features per stage (a longer list is cut to the number of stages, a shorter one is an error);
            res_block: residual encoder blocks (a plain plan's stages get one residual block each);
            norm, negative_slope: as named;
            deep_supervision, deep_supr_num: deep-supervision heads (deep_supr_num of them; the plan's number,
                else 2, when only deep_supervision is given; deep_supr_num alone changes a plan's heads).

    Raises:
        ValueError: overrides that do not fit the plan, one line naming the flag.
    """
    changes: dict = {}
    depth, min_fmap = overrides.get("depth"), overrides.get("min_fmap")
    if depth is not None or min_fmap is not None:
        default_depth = 6 if network.kind == "unet" else 64
        kernels, strides = planner.kernels_strides(patch_size, spacing, min_fmap or 4, depth or default_depth)
        n = len(kernels)
        if n < 2:
            raise ValueError(f"patch size {list(patch_size)} allows only {n} U-Net stages with --depth/--min_fmap "
                             f"(at least 2 needed)")
        changes.update(
            kernels=tuple(tuple(k) for k in kernels), strides=tuple(tuple(s) for s in strides),
            features=tuple(_fit(network.features, n, features_per_stage(n, network.dim))),
            encoder_blocks=tuple(_fit(network.encoder_blocks, n)),
            decoder_blocks=tuple(_fit(network.decoder_blocks, n - 1)),
            deep_supervision_heads=min(network.deep_supervision_heads, n - 2))
    n = len(changes.get("kernels", network.kernels))
    filters = overrides.get("filters")
    if filters is not None:
        if len(filters) < n:
            raise ValueError(f"--filters gives {len(filters)} channel counts but the network has {n} stages")
        changes["features"] = tuple(int(f) for f in filters[:n])
    if overrides.get("res_block") and network.kind == "unet":
        changes.update(kind="resenc_unet", encoder_blocks=(1,) * n)
    for key in ("norm", "negative_slope"):
        if overrides.get(key) is not None:
            changes[key] = overrides[key]
    heads = overrides.get("deep_supr_num")
    if heads is not None and not overrides.get("deep_supervision") and not network.deep_supervision_heads:
        raise ValueError("--deep_supr_num needs --deep_supervision: the plan's network has no deep supervision")
    if heads is None and overrides.get("deep_supervision"):
        heads = network.deep_supervision_heads or 2
    if heads is not None:
        if not 1 <= heads <= n - 2:
            raise ValueError(f"--deep_supr_num {heads} must be between 1 and {n - 2} for a network of {n} stages")
        changes["deep_supervision_heads"] = heads
    return network.replace(**changes) if changes else network


def _fit(values: tuple[int, ...], n: int, fresh: list[int] | None = None) -> list[int]:
    """`values` cut to n entries, or extended by `fresh`'s entries (else its own last one)."""
    values = list(values)
    if len(values) >= n:
        return values[:n]
    return values + (fresh[len(values):n] if fresh else [values[-1]] * (n - len(values)))
