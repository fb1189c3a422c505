"""Planning from the data: target spacing, patch size, network kernels and strides.

All spacings and shapes are in (D, H, W) order (2D: (H, W)), in mm and voxels. The rules follow
nnU-Net's published heuristics:

* the target spacing is the median spacing; when the median is anisotropic (coarsest / finest
  axis >= 3) the coarse axis takes the 10th percentile of its spacings instead, so fewer cases
  are interpolated heavily along it;
* an axis is downsampled only while its spacing is at most twice the finest one and its feature
  map stays at least `min_fmap`; an axis whose spacing is more than twice the finest gets a
  kernel of 1 until the downsampling of the other axes has evened the spacing out;
* the patch starts from the median shape after resampling and shrinks along its longest
  physical extent until it fits the voxel budget, each axis a multiple of its total stride.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

ANISOTROPY_THRESHOLD = 3.0
VOXEL_BUDGET_3D = 128**3
VOXEL_BUDGET_2D = 512**2


def target_spacing(spacings: np.ndarray, anisotropy_threshold: float = ANISOTROPY_THRESHOLD) -> list[float]:
    """Target spacing of a dataset.

    Args:
        spacings: (N, 3) spacing of each case in mm, (D, H, W).
        anisotropy_threshold: coarsest/finest ratio from which the coarse axis is treated apart.

    Returns:
        (3,) spacing in mm.
    """
    spacings = np.asarray(spacings, dtype=np.float64)
    target = np.median(spacings, axis=0)
    coarse = int(np.argmax(target))
    if target[coarse] / target.min() >= anisotropy_threshold:
        others = np.delete(target, coarse)
        # Keep the coarse axis at least as coarse as the others, so it stays the coarse one.
        target[coarse] = max(np.percentile(spacings[:, coarse], 10), others.max() + 1e-5)
    return [float(round(s, 5)) for s in target]


def kernels_strides(
    patch_size: Sequence[int], spacing: Sequence[float], min_fmap: int = 4, depth: int = 6
) -> tuple[list[list[int]], list[list[int]]]:
    """Convolution kernels and strides of each U-Net level.

    Args:
        patch_size: the network's input size in voxels, (D, H, W) or (H, W).
        spacing: voxel spacing of that input in mm, same order.
        min_fmap: an axis is not downsampled below this many voxels.
        depth: maximum number of levels, the full-resolution one included.

    Returns:
        (kernels, strides): one entry per level; `strides[0]` is all ones (the first level does
        not downsample), `strides[i]` is the downsampling from level i-1 to level i.
    """
    sizes = [int(s) for s in patch_size]
    spacing = [float(s) for s in spacing]
    ndim = len(sizes)
    kernels: list[list[int]] = []
    strides: list[list[int]] = [[1] * ndim]
    while True:
        finest = min(spacing)
        even = [s / finest <= 2 for s in spacing]
        kernels.append([3 if e else 1 for e in even])
        if len(strides) == depth:
            break
        stride = [2 if e and size % 2 == 0 and size // 2 >= min_fmap else 1 for e, size in zip(even, sizes)]
        if all(s == 1 for s in stride):
            break
        strides.append(stride)
        sizes = [size // s for size, s in zip(sizes, stride)]
        spacing = [sp * s for sp, s in zip(spacing, stride)]
    return kernels, strides


def total_strides(strides: Sequence[Sequence[int]]) -> list[int]:
    """Product of the strides of all levels, per axis."""
    return [math.prod(level[axis] for level in strides) for axis in range(len(strides[0]))]


def _downsamplings(size: float, spacing: Sequence[float], axis: int, min_fmap: int, depth: int) -> int:
    """How many times `axis` would be halved for an input of unlimited divisibility."""
    sizes = [size if i == axis else 1e9 for i in range(len(spacing))]
    spacing = list(spacing)
    count = 0
    for _ in range(depth - 1):
        finest = min(spacing)
        even = [s / finest <= 2 for s in spacing]
        halve = [e and sz / 2 >= min_fmap for e, sz in zip(even, sizes)]
        if not any(halve):
            break
        count += halve[axis]
        sizes = [sz / 2 if h else sz for sz, h in zip(sizes, halve)]
        spacing = [sp * 2 if h else sp for sp, h in zip(spacing, halve)]
    return count


def plan_patch_size(
    median_shape: Sequence[float],
    spacing: Sequence[float],
    voxel_budget: int | None = None,
    min_fmap: int = 4,
    depth: int = 6,
) -> list[int]:
    """Patch size for a dataset whose resampled cases have the given median shape.

    Args:
        median_shape: median shape after resampling, (D, H, W) or (H, W), voxels.
        spacing: target spacing, same order, mm.
        voxel_budget: the largest number of voxels a patch may hold (default 128^3 in 3D, 512^2 in 2D).
        min_fmap, depth: as for `kernels_strides`.

    Returns:
        The patch size, each axis a multiple of the network's total stride along it.
    """
    if voxel_budget is None:
        voxel_budget = VOXEL_BUDGET_3D if len(median_shape) == 3 else VOXEL_BUDGET_2D
    patch = [max(float(s), float(min_fmap)) for s in median_shape]

    def rounded(shape: list[float]) -> list[int]:
        out = []
        for axis, size in enumerate(shape):
            step = 2 ** _downsamplings(size, spacing, axis, min_fmap, depth)
            out.append(max(step, int(math.ceil(size / step)) * step))
        return out

    result = rounded(patch)
    while math.prod(result) > voxel_budget:
        extent = [size * sp for size, sp in zip(result, spacing)]
        axis = int(np.argmax(extent))
        step = 2 ** _downsamplings(result[axis], spacing, axis, min_fmap, depth)
        if result[axis] - step < min_fmap:
            break
        patch[axis] = result[axis] - step
        result = rounded(patch)
    return result


# Features of the first level of a U-Net (nnU-Net's 32); each holds a full-resolution map of the patch.
FIRST_LEVEL_FEATURES = 32


def training_memory_bytes(patch_size: Sequence[int], in_channels: int, batch_size: int) -> int:
    """A lower bound in bytes on the memory one training step of a plan needs: the float32 input batch
    (B, C, *patch) and one full-resolution feature map (B, 32, *patch). Real use is several times more."""
    return int(batch_size) * math.prod(int(p) for p in patch_size) * 4 * (int(in_channels) + FIRST_LEVEL_FEATURES)


def suggest_batch_size(patch_size: Sequence[int]) -> int:
    """Batch size that keeps the voxels per step near nnU-Net's defaults (2 x 128^3 in 3D)."""
    voxels = math.prod(patch_size)
    if len(patch_size) == 3:
        return int(np.clip(2 * VOXEL_BUDGET_3D // voxels, 2, 8))
    return int(np.clip(64 * 192 * 160 // voxels, 2, 64))
