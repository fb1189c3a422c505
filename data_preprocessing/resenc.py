"""Residual-encoder presets: patch, batch and network sized to a GPU memory budget.

`preprocess.py --planner resenc_m|resenc_l|resenc_xl` plans as nnU-Net v2's residual-encoder presets do
(Isensee et al., "nnU-Net Revisited", MICCAI 2024), re-implemented from their published rules:

1. Topology: starting from the voxel spacing, the axes whose spacing is within a factor 2 of the finest are
   halved together, stage after stage, while each stays at least twice the smallest feature map (4 voxels;
   an axis halved alone needs three times); an axis gets 3-voxel kernels once its spacing has come within a
   factor 2 of the finest, and the deepest stage always convolves 3 wide. There is no cap on the number of
   stages, and the patch is rounded up to a multiple of the total stride along each axis.
2. The first patch has the aspect ratio of the physical extent (256^3 voxels in 3D, 2048^2 in 2D, each axis
   proportional to 1 / spacing), no larger than the median shape.
3. Memory estimate: the number of elements of the feature maps a training step keeps (each convolution's
   output, the residual projections, the transposed convolutions' outputs and the full-resolution
   segmentation output, for one patch). While it exceeds the preset's budget, the axis that is largest
   relative to the median shape (the last such axis on a tie) shrinks by its stride divisor and the topology
   is planned again.
4. Batch: the reference batch (2 in 3D, 12 in 2D) times the budget over the estimate, rounded, at least 2
   (these presets put no cap on the share of the dataset one step covers).

The budgets are those of the published presets, in feature-map elements for their reference GPU memory:
M 680 M (3D) / 135 M (2D) elements for 8 GB, L 2.1 G / 380 M for 24 GB, XL 3.6 G / 560 M for 40 GB.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from data_preprocessing.network_plan import encoder_blocks, features_per_stage
from utils.settings import NetworkPlan

MIN_FMAP = 4
# (3D budget, 2D budget) in feature-map elements, and the GPU memory they stand for (GB).
BUDGETS = {"resenc_m": (680_000_000, 135_000_000, 8), "resenc_l": (2_100_000_000, 380_000_000, 24),
           "resenc_xl": (3_600_000_000, 560_000_000, 40)}
REFERENCE_BATCH = {3: 2, 2: 12}
MIN_BATCH = 2
DEEP_SUPERVISION_HEADS = 2


@dataclass(frozen=True)
class PresetPlan:
    """A preset's patch (voxels, (D, H, W) or (H, W)), batch size, network and memory estimate (elements)."""

    patch_size: list[int]
    batch_size: int
    network: NetworkPlan
    estimate: int


def topology(spacing: Sequence[float], patch_size: Sequence[float], min_fmap: int = MIN_FMAP
             ) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Kernels and strides per stage for a patch, and the patch rounded up to the total stride (step 1 above).

    Returns:
        (kernels, strides, patch): one kernel and stride per stage (strides[0] all ones), patch in voxels.
    """
    dim = len(spacing)
    current_spacing = [float(s) for s in spacing]
    size = [float(s) for s in patch_size]
    kernel = [1] * dim
    kernels: list[list[int]] = []
    strides: list[list[int]] = [[1] * dim]
    while True:
        poolable = [axis for axis in range(dim) if size[axis] >= 2 * min_fmap]
        if not poolable:
            break
        finest = min(current_spacing[axis] for axis in poolable)
        poolable = [axis for axis in poolable if current_spacing[axis] / finest < 2]
        if len(poolable) == 1 and size[poolable[0]] < 3 * min_fmap:
            break
        overall_finest = min(current_spacing)
        kernel = [3 if k == 3 or current_spacing[axis] / overall_finest < 2 else 1 for axis, k in enumerate(kernel)]
        stride = [2 if axis in poolable else 1 for axis in range(dim)]
        for axis in poolable:
            current_spacing[axis] *= 2
            size[axis] = math.ceil(size[axis] / 2)
        kernels.append(list(kernel))
        strides.append(stride)
    kernels.append([3] * dim)  # the deepest stage
    divisor = [math.prod(level[axis] for level in strides) for axis in range(dim)]
    patch = [int(math.ceil(p / d) * d) for p, d in zip(patch_size, divisor)]
    return kernels, strides, patch


def preset_network(kernels: list[list[int]], strides: list[list[int]]) -> NetworkPlan:
    """The residual-encoder network for a topology: 1, 3, 4, 6, ... residual blocks, one decoder convolution."""
    n = len(kernels)
    return NetworkPlan(
        kind="resenc_unet", features=tuple(features_per_stage(n, len(kernels[0]))),
        kernels=tuple(map(tuple, kernels)), strides=tuple(map(tuple, strides)),
        encoder_blocks=tuple(encoder_blocks("resenc_unet", n)), decoder_blocks=(1,) * (n - 1),
        deep_supervision_heads=min(DEEP_SUPERVISION_HEADS, n - 2)).checked()


def feature_map_elements(network: NetworkPlan, patch_size: Sequence[int], n_classes: int) -> int:
    """Elements of the feature maps one training step keeps for one patch (step 3 above).

    Counts each convolution's output (the stem, two per residual block or one per plain block, a residual
    projection where a block changes width or resolution), each transposed convolution's output and the
    full-resolution segmentation output (the coarser heads are small and left out).
    """
    size = list(patch_size)
    sizes = []
    total = 0
    residual = network.kind == "resenc_unet"
    channels_in = network.features[0]
    if residual:
        total += network.features[0] * math.prod(size)  # the stem
    for stage in range(network.n_stages):
        size = [s // st for s, st in zip(size, network.strides[stage])]
        sizes.append(size)
        voxels, width = math.prod(size), network.features[stage]
        blocks = network.encoder_blocks[stage]
        if residual:
            changes = channels_in != width or any(st != 1 for st in network.strides[stage])
            total += (2 * blocks + int(changes)) * width * voxels
        else:
            total += blocks * width * voxels
        channels_in = width
    for stage in range(network.n_stages - 2, -1, -1):
        voxels, width = math.prod(sizes[stage]), network.features[stage]
        total += (1 + network.decoder_blocks[stage]) * width * voxels  # transposed convolution and blocks
    return total + n_classes * math.prod(sizes[0])


def plan_resenc(median_shape: Sequence[float], spacing: Sequence[float], preset: str, n_classes: int = 3
                ) -> PresetPlan:
    """Patch, batch and network of a residual-encoder preset for a dataset.

    Args:
        median_shape: median shape of the cases after resampling, (D, H, W) or (H, W), voxels.
        spacing: the target spacing, same order, mm.
        preset: "resenc_m", "resenc_l" or "resenc_xl".
        n_classes: outputs of the network (they count little).
    """
    dim = len(spacing)
    budget_3d, budget_2d, _ = BUDGETS[preset]
    budget = budget_3d if dim == 3 else budget_2d
    median = [float(s) for s in median_shape]
    inverse = 1 / np.asarray(spacing, dtype=np.float64)
    voxels = 256**3 if dim == 3 else 2048**2
    first = np.round(inverse * (voxels / np.prod(inverse)) ** (1 / dim))
    patch = np.minimum(first, median).tolist()
    kernels, strides, patch = topology(spacing, patch)
    network = preset_network(kernels, strides)
    estimate = feature_map_elements(network, patch, n_classes)
    while estimate > budget:
        ratios = [p / m for p, m in zip(patch, median)]
        axis = max(range(dim), key=lambda a: (ratios[a], a))
        divisor = [math.prod(level[a] for level in strides) for a in range(dim)]
        smaller = list(patch)
        smaller[axis] -= divisor[axis]
        # The divisor of the smaller patch: shrinking may remove a stage along that axis.
        _, smaller_strides, _ = topology(spacing, smaller)
        step = math.prod(level[axis] for level in smaller_strides)
        patch = list(patch)
        patch[axis] -= step
        kernels, strides, patch = topology(spacing, patch)
        network = preset_network(kernels, strides)
        estimate = feature_map_elements(network, patch, n_classes)
    batch = max(round(budget / estimate * REFERENCE_BATCH[dim]), MIN_BATCH)
    return PresetPlan(patch_size=[int(p) for p in patch], batch_size=int(batch), network=network,
                      estimate=int(estimate))
