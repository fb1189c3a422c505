"""Separable resampling of volumes and label maps.

Each axis is resampled on its own with a small interpolation kernel: nearest (order 0), linear
(order 1) or cubic convolution (order 3, Keys' kernel with a = -0.5, which passes through the
samples and reproduces quadratics). Voxel centres are aligned: output voxel ``j`` of an axis
resized from ``n`` to ``m`` samples input position ``(j + 0.5) * n / m - 0.5``, and positions
outside the volume take the edge value.

Why by hand: scipy's and scikit-image's spline resampling (what nnU-Net uses) run a prefilter and
a full 3D kernel on one core; per-axis products with a small interpolation matrix run on torch's
BLAS on every core, and make "in-plane cubic, order 0 along the coarse axis" a per-axis choice
rather than a separate code path. Volumes must be finite (readers refuse NaN and infinity): a
matrix product spreads a NaN along its whole row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def _taps(old_size: int, new_size: int, order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input indices (taps, new_size) and weights (taps, new_size) of one axis."""
    position = (torch.arange(new_size, dtype=torch.float64) + 0.5) * (old_size / new_size) - 0.5
    if order == 0:
        index = torch.floor(position + 0.5).clamp_(0, old_size - 1).long()[None]
        return index, torch.ones_like(index, dtype=torch.float32)
    base = torch.floor(position)
    frac = position - base
    if order == 1:
        offsets = torch.tensor([0.0, 1.0], dtype=torch.float64)
        weights = torch.stack([1 - frac, frac])
    elif order == 3:
        offsets = torch.tensor([-1.0, 0.0, 1.0, 2.0], dtype=torch.float64)
        distance = (frac[None] - offsets[:, None]).abs()
        a = -0.5
        near = (a + 2) * distance**3 - (a + 3) * distance**2 + 1
        far = a * distance**3 - 5 * a * distance**2 + 8 * a * distance - 4 * a
        weights = torch.where(distance <= 1, near, torch.where(distance < 2, far, torch.zeros_like(distance)))
    else:
        raise ValueError(f"interpolation order must be 0, 1 or 3, got {order}")
    index = (base[None] + offsets[:, None]).clamp_(0, old_size - 1).long()
    return index, weights.float()


def resample_axis(volume: torch.Tensor, axis: int, new_size: int, order: int) -> torch.Tensor:
    """Resample one axis of a float tensor to `new_size` samples (see the module docstring)."""
    old_size = volume.shape[axis]
    if old_size == new_size:
        return volume
    return _gather(volume, axis, *_taps(old_size, new_size, order), order)


def _gather(volume: torch.Tensor, axis: int, index: torch.Tensor, weights: torch.Tensor, order: int) -> torch.Tensor:
    """The weighted sum over taps of the samples `index` (taps, n) along `axis`: n samples along it.

    Computed as the product with the (n, old) interpolation matrix, zero but for the taps: a matrix product
    runs on BLAS at full speed along any axis, where gathering samples along an inner axis of a large volume
    (torch.index_select) ran 10-20 times slower.
    """
    old_size, new_size = volume.shape[axis], index.shape[1]
    matrix = torch.zeros(new_size, old_size, dtype=volume.dtype, device=volume.device)
    matrix.scatter_add_(1, index.t().contiguous().to(volume.device), weights.t().to(volume.dtype).to(volume.device))
    if axis == volume.ndim - 1:
        return (volume.reshape(-1, old_size) @ matrix.t()).reshape(*volume.shape[:-1], new_size)
    before, after = math.prod(volume.shape[:axis]), math.prod(volume.shape[axis + 1:])
    out = matrix @ volume.reshape(before, old_size, after)
    return out.reshape(*volume.shape[:axis], new_size, *volume.shape[axis + 1:])


def _resample(volume: torch.Tensor, new_shape: Sequence[int], orders: Sequence[int]) -> torch.Tensor:
    """Resample the trailing len(new_shape) axes; shrinking axes go first to keep the work small."""
    first_axis = volume.ndim - len(new_shape)
    axes = sorted(range(len(new_shape)), key=lambda a: new_shape[a] / volume.shape[first_axis + a])
    for axis in axes:
        volume = resample_axis(volume, first_axis + axis, int(new_shape[axis]), orders[axis])
    return volume


def resample_rows(volume: torch.Tensor, new_shape: Sequence[int], orders: Sequence[int], axis: int, start: int,
                  stop: int) -> torch.Tensor:
    """Rows `start:stop` along spatial `axis` of `_resample(volume.float(), new_shape, orders)` for (K, D, H, W),
    reading only the input rows they interpolate from: the same values, for a slab's memory instead of the volume's.

    The two other axes, when both are linear, go through torch's bilinear interpolation, which samples exactly
    the positions `_taps` gives (align_corners=False, edges clamped) and runs several times faster than gathers
    along an inner axis.
    """
    first_axis = volume.ndim - len(new_shape)
    old_size = volume.shape[first_axis + axis]
    if old_size == new_shape[axis]:
        index, weights = torch.arange(old_size)[None], torch.ones(1, old_size)
    else:
        index, weights = _taps(old_size, int(new_shape[axis]), orders[axis])
    index, weights = index[:, start:stop], weights[:, start:stop]
    low, high = int(index.min()), int(index.max()) + 1
    rows = volume.narrow(first_axis + axis, low, high - low).float()
    rows = _gather(rows, first_axis + axis, index - low, weights, orders[axis])
    slab_shape = list(new_shape)
    slab_shape[axis] = stop - start
    others = [other for other in range(len(new_shape)) if other != axis]
    if volume.ndim != 4 or any(orders[other] != 1 for other in others):
        return _resample(rows, slab_shape, orders)
    if all(rows.shape[1 + other] == new_shape[other] for other in others):
        return rows
    # (K, D, H, W) with the slab axis moved next to K, the two others last: a batch of 2D images.
    order = [0, 1 + axis, *(1 + other for other in others)]
    moved = rows.permute(order)
    planes = moved.reshape(1, -1, *moved.shape[2:])
    resized = torch.nn.functional.interpolate(planes, size=[int(new_shape[other]) for other in others],
                                              mode="bilinear", align_corners=False)
    resized = resized.reshape(*moved.shape[:2], *resized.shape[2:])
    return resized.permute([order.index(dim) for dim in range(4)])


def axis_orders(ndim: int, order: int, separate_z: int | None) -> list[int]:
    """Interpolation order per spatial axis: `order`, except 0 along a separately handled axis."""
    return [0 if axis == separate_z else order for axis in range(ndim)]


def resample_image(image: np.ndarray, new_shape: Sequence[int], separate_z: int | None = None) -> np.ndarray:
    """Cubic resampling of a multi-channel image.

    Args:
        image: (C, D, H, W) array.
        new_shape: (D, H, W) target shape.
        separate_z: spatial axis resampled with order 0 (anisotropic data), or None.

    Returns:
        (C, *new_shape) float32 array.
    """
    if tuple(image.shape[1:]) == tuple(new_shape):
        return image.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    orders = axis_orders(len(new_shape), 3, separate_z)
    return _resample(tensor, new_shape, orders).numpy()


def resample_probabilities(probabilities: torch.Tensor, new_shape: Sequence[int],
                           separate_z: int | None = None) -> torch.Tensor:
    """Linear resampling of class probabilities (K, D, H, W) -> (K, *new_shape), order 0 along `separate_z`."""
    orders = axis_orders(len(new_shape), 1, separate_z)
    return _resample(probabilities.float(), new_shape, orders)


def resample_label(label: np.ndarray, new_shape: Sequence[int], classes: Sequence[int],
                   separate_z: int | None = None) -> np.ndarray:
    """Resample a label map by linear interpolation of each class's one-hot map, then argmax.

    One class is held in memory at a time (running maximum), so memory stays at a few volumes
    whatever the number of classes. Ties go to the lower class.

    Args:
        label: (D, H, W) integer array.
        new_shape: (D, H, W) target shape.
        classes: label values to consider (background included).
        separate_z: spatial axis resampled with order 0, or None.

    Returns:
        (*new_shape) uint8 array.
    """
    if tuple(label.shape) == tuple(new_shape):
        return label.astype(np.uint8, copy=False)
    orders = axis_orders(len(new_shape), 1, separate_z)
    source = torch.from_numpy(np.ascontiguousarray(label))
    best = torch.full(tuple(new_shape), -1.0)
    result = torch.zeros(tuple(new_shape), dtype=torch.uint8)
    for value in classes:
        score = _resample((source == value).float(), new_shape, orders)
        better = score > best
        torch.maximum(best, score, out=best)  # in place: one volume less at the peak than torch.where
        result[better] = value
    return result.numpy()


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> list[int]:
    """Shape of a volume of `shape` voxels at `spacing` mm once resampled to `target` mm."""
    return [max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target)]


def separate_axis(spacing: Sequence[float], target: Sequence[float], threshold: float = 3.0) -> int | None:
    """The axis to resample apart (order 0) when either spacing is anisotropic, else None.

    The source spacing decides first (thick slices are not interpolated across), then the target.
    """
    for candidate in (spacing, target):
        candidate = np.asarray(candidate, dtype=np.float64)
        if candidate.max() / candidate.min() >= threshold:
            return int(np.argmax(candidate))
    return None
