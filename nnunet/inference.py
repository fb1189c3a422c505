"""Whole-volume inference: overlapping windows stitched into one score volume, in bounded memory.

A volume is covered by windows of the network's patch size placed as MONAI's `sliding_window_inference`
places them (a step of `patch * (1 - overlap)`, the last window flush with the far edge; an axis smaller
than the patch gets one window, centred, its outside read as zeros). Each window's scores (logits, or
probabilities with an activation; with test-time augmentation the mean over every flip of the window) are
weighted, and the weighted windows summed into the output.

Why not `sliding_window_inference` itself: it keeps a float32 sum of weighted scores and a float32 map of
the summed weights, both of the whole volume, and divides at the end: two full float32 buffers where one
half-precision one suffices. Here the weights are separable (a Gaussian per axis, or a constant) and the
window grid is a product of per-axis positions, so the summed weight at a voxel is the product of per-axis
sums, known before any window runs. Each window's scores are multiplied by their share of the final mean
(its weight over the summed weight, per axis, so no tiny product ever underflows) and added: the output is
the weighted mean as it accumulates, values stay in [0, 1] for probabilities, and float16 holds it to about
1e-3 (labels agree with a float32 run on all but a few boundary voxels in 10^5).
The output lives on `device` (the GPU, or the CPU when the GPU is short of memory), the windows run where
the volume is.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence

import psutil
import torch
from tqdm import tqdm

from utils.errors import UserError

Network = Callable[[torch.Tensor], torch.Tensor]

SIGMA_SCALE = 0.125  # the Gaussian's sigma as a fraction of the patch, as nnU-Net and MONAI
WINDOW_BAR = 64  # cases of at least this many windows show a progress bar over them (on a terminal)


def flip_axes(n_spatial: int, first_axis: int = 2) -> list[tuple[int, ...]]:
    """Every combination of flipped spatial axes, the identity first: 8 in 3D, 4 in 2D."""
    axes = range(first_axis, first_axis + n_spatial)
    return [combo for count in range(n_spatial + 1) for combo in itertools.combinations(axes, count)]


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """First voxel of each window along an axis of `size` voxels (negative: the axis is padded)."""
    if size <= patch:
        return [-((patch - size) // 2)]
    step = max(int(patch * (1 - overlap)), 1)
    count = math.ceil((size - patch) / step) + 1
    return [min(index * step, size - patch) for index in range(count)]


def importance_map(patch: Sequence[int], blend: str) -> torch.Tensor:
    """(*patch) float32 weight of a window's voxels, as MONAI computes it: a Gaussian towards the centre (sigma
    an eighth of the patch per axis, peak about 1) floored at 1e-3 so that no voxel is ignored, or constant."""
    if blend == "constant":
        return torch.ones(tuple(patch))
    if blend != "gaussian":
        raise ValueError(f"blend must be 'gaussian' or 'constant', got {blend!r}")
    axes = [torch.exp(-((torch.arange(size, dtype=torch.float32) - (size - 1) / 2) / (SIGMA_SCALE * size)) ** 2 / 2)
            for size in patch]
    weight = separable(*axes)
    return weight.clamp_(min=max(float(weight.min()), 1e-3))


class WindowShares:
    """Each window's share of the weighted mean: its importance map over the summed map of every window.

    The summed map at a window's voxels is the sum of the maps of the windows overlapping it (a few per axis),
    computed per window instead of kept for the whole volume, and cached by the arrangement of those neighbours,
    which repeats from window to window inside the volume.
    """

    def __init__(self, spatial: Sequence[int], window: Sequence[int], starts: Sequence[Sequence[int]], blend: str,
                 device: torch.device, cache_bytes: int = 32 * 2**20) -> None:
        self.spatial, self.window, self.starts = spatial, window, starts
        self.weight = importance_map(window, blend).to(device)
        self.cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.cache_size = max(2, cache_bytes // (self.weight.numel() * 4))

    def neighbours(self, axis: int, index: int) -> tuple[tuple[int, ...], tuple[int, int]]:
        """Along one axis: the offsets of the windows overlapping window `index`, and its part inside the image."""
        start, patch, size = self.starts[axis][index], self.window[axis], self.spatial[axis]
        offsets = tuple(other - start for other in self.starts[axis] if abs(other - start) < patch)
        return offsets, (max(-start, 0), min(size - start, patch))

    def __call__(self, position: Sequence[int]) -> torch.Tensor:
        """The share of the window at grid `position`, over its voxels inside the image."""
        key = tuple(self.neighbours(axis, index) for axis, index in enumerate(position))
        share = self.cache.get(key)
        if share is not None:
            self.cache.move_to_end(key)
            return share
        bounds = [inside for _, inside in key]
        total = torch.zeros_like(self.weight[tuple(slice(low, high) for low, high in bounds)])
        for offsets in itertools.product(*(axis_offsets for axis_offsets, _ in key)):
            # The neighbour shifted by `offsets`, over this window's inside part: in this frame and in its own.
            mine, theirs = [], []
            for offset, (low, high), patch in zip(offsets, bounds, self.window):
                first, last = max(low, offset), min(high, offset + patch)
                mine.append(slice(first - low, last - low))
                theirs.append(slice(first - offset, last - offset))
            total[tuple(mine)] += self.weight[tuple(theirs)]
        share = self.weight[tuple(slice(low, high) for low, high in bounds)] / total
        self.cache[key] = share
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return share


def free_device_memory(device: torch.device) -> int:
    # The device module (nnunet.trainer, the one place that asks CUDA) imports this one through the model.
    from nnunet.trainer import free_device_memory as free

    return free(device)


def stitch_device(volume: torch.Tensor, shape: Sequence[int], dtype: torch.dtype, choice: str = "auto") -> torch.device:
    """Where the (K, *spatial) output lives: `choice` "cpu" or "gpu" (the volume's device), or with "auto" the
    volume's device when it has room for the output and a quarter more, else the CPU."""
    if choice == "cpu" or volume.device.type != "cuda":
        return torch.device("cpu")
    if choice == "gpu":
        return volume.device
    free = free_device_memory(volume.device)
    needed = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return volume.device if needed * 1.25 < free else torch.device("cpu")


def predict_volume(network: Network, volume: torch.Tensor, patch_size: Sequence[int], *, overlap: float = 0.5,
                   blend: str = "gaussian", batch_size: int = 4, tta: bool = False, activation: str | None = None,
                   dtype: torch.dtype = torch.float32, device: str = "auto") -> torch.Tensor:
    """Predict a whole volume with a 2D or 3D network.

    Without TTA the windows' logits are blended and the activation applied to the blend (as MONAI and nnU-Net
    do); with TTA each window's probabilities are averaged over its flips, and those are blended.

    Args:
        network: a 3D network when len(patch_size) == 3, else a 2D one applied to slices along the first axis;
            maps (N, C, *patch_size) to (N, K, *patch_size).
        volume: (1, C, D, H, W).
        patch_size: the network's window, (D, H, W) or (H, W).
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        blend: "gaussian" (windows weighted towards their centre, as nnU-Net) or "constant".
        batch_size: windows per forward pass.
        tta: average the activated outputs over every flip of each window's spatial axes.
        activation: None (logits, only without TTA), "softmax" or "sigmoid".
        dtype: of the output: float32, or float16 / bfloat16 for half the memory.
        device: where the output accumulates: "auto", "cpu" or "gpu" (see `stitch_device`).

    Returns:
        (1, K, D, H, W): logits, or probabilities when `activation` is given.
    """
    if tta and activation is None:
        raise ValueError("test-time augmentation averages probabilities: give an activation")
    if volume.ndim != 5 or volume.shape[0] != 1:
        raise ValueError(f"expected a volume (1, C, D, H, W), got shape {tuple(volume.shape)}")
    two_d = len(patch_size) == 2
    # A 2D network sees windows one slice thick; their slice axis is dropped for the forward pass.
    window = (1, *patch_size) if two_d else tuple(patch_size)
    spatial = tuple(volume.shape[2:])
    starts = [window_starts(size, patch, overlap) for size, patch in zip(spatial, window)]
    shares = WindowShares(spatial, window, starts, blend, volume.device)
    flips = flip_axes(len(patch_size), first_axis=3 if two_d else 2) if tta else [()]

    def run(patches: torch.Tensor) -> torch.Tensor:
        """(N, C, *window) -> (N, K, *window) float32 logits, or with TTA probabilities averaged over the flips."""
        total = None
        for axes in flips:
            flipped = torch.flip(patches, axes) if axes else patches
            scores = network(flipped[:, :, 0]).unsqueeze(2) if two_d else network(flipped)
            scores = activate(scores, activation if tta else None)
            scores = torch.flip(scores, axes) if axes else scores
            total = scores if total is None else total.add_(scores)
        return total.div_(len(flips)) if len(flips) > 1 else total

    grid = list(itertools.product(*(range(len(axis)) for axis in starts)))
    output = None
    bar = tqdm(total=len(grid), desc="windows", unit="window", leave=False,
               disable=len(grid) < WINDOW_BAR or not sys.stderr.isatty())
    for first in range(0, len(grid), batch_size):
        batch = grid[first:first + batch_size]
        boxes = [[(starts[axis][i], starts[axis][i] + window[axis]) for axis, i in enumerate(position)]
                 for position in batch]
        scores = run(torch.stack([read_window(volume[0], box) for box in boxes]))
        if output is None:
            shape = (scores.shape[1], *spatial)
            where = stitch_device(volume, shape, dtype, device)
            try:
                output = torch.zeros(shape, dtype=dtype, device=where)
            except torch.OutOfMemoryError:
                if device != "auto" or where.type == "cpu":
                    raise
                output = torch.zeros(shape, dtype=dtype)  # the GPU ran short after all: host memory
        for position, box, window_scores in zip(batch, boxes, scores):
            inside = tuple(slice(max(low, 0), min(high, size)) for (low, high), size in zip(box, spatial))
            within = tuple(slice(max(-low, 0), max(-low, 0) + part.stop - part.start)
                           for (low, _), part in zip(box, inside))
            contribution = window_scores[(slice(None), *within)].mul_(shares(position))
            output[(slice(None), *inside)] += contribution.to(output.device, dtype)
        bar.update(len(batch))
    bar.close()
    if activation and not tta:
        activate_in_place(output, activation)
    return output[None]


def activate_in_place(scores: torch.Tensor, activation: str, slab_voxels: int = 2**22) -> torch.Tensor:
    """Apply the activation to (K, D, ...) logits slab by slab along D, in their own dtype and memory."""
    step = max(1, slab_voxels // max(1, math.prod(scores.shape[2:]) * scores.shape[0]))
    for low in range(0, scores.shape[1], step):
        slab = scores[:, low:low + step]
        slab.copy_(activate(slab[None], activation)[0])
    return scores


def activate(logits: torch.Tensor, activation: str | None) -> torch.Tensor:
    logits = logits.float()
    if activation == "softmax":
        return torch.softmax(logits, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    return logits


def read_window(image: torch.Tensor, box: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(C, *window) voxels of `image` (C, *spatial) in `box`, zeros where the box leaves the image."""
    inside = tuple(slice(max(low, 0), min(high, size)) for (low, high), size in zip(box, image.shape[1:]))
    if all(low >= 0 and high <= size for (low, high), size in zip(box, image.shape[1:])):
        return image[(slice(None), *inside)]
    patch = image.new_zeros((image.shape[0], *(high - low for low, high in box)))
    within = tuple(slice(part.start - low, part.stop - low) for (low, _), part in zip(box, inside))
    patch[(slice(None), *within)] = image[(slice(None), *inside)]
    return patch


def separable(*factors: torch.Tensor) -> torch.Tensor:
    """The outer product of 1D factors: (a,), (b,), (c,) -> (a, b, c)."""
    result = factors[0]
    for factor in factors[1:]:
        result = result[..., None] * factor
    return result


class CaseTooLarge(UserError):
    """A case whose prediction would not fit in the memory left; the others can still run."""


def case_footprint(shape: Sequence[int], classes: int, patch_size: Sequence[int], batch_size: int, tta: bool,
                   dtype: torch.dtype = torch.float16) -> tuple[int, int]:
    """(bytes of the case's score volume, bytes of the rest) that predicting a (C, *shape) volume allocates beyond
    the volume itself: the scores of every class in `dtype`; one batch of windows' float32 scores (twice with TTA)
    and their shares; on the way back the uint8 labels of the crop and of the source and two slabs of float32
    scores. The network's own activations are not counted."""
    voxels = math.prod(shape)
    scores = classes * voxels * torch.empty((), dtype=dtype).element_size()
    window = math.prod(patch_size)
    rest = batch_size * classes * window * 4 * (2 if tta else 1) + 32 * 2**20 + 2 * voxels + 2 * 64 * 2**20
    return scores, rest


def check_room(case_id: str, volume: torch.Tensor, classes: int, patch_size: Sequence[int], batch_size: int,
               tta: bool, stitch: str = "auto", dtype: torch.dtype = torch.float16) -> None:
    """Raise CaseTooLarge (one line: the case, the estimate, the way out) when the memory free for its prediction
    (`case_footprint`: on the GPU where the scores are stitched there, else in the host) is short."""
    scores, rest = case_footprint(volume.shape[2:], classes, patch_size, batch_size, tta, dtype)
    gb = 1e9
    if volume.device.type == "cuda" and stitch != "cpu":
        free = free_device_memory(volume.device)
        if scores * 1.25 < free:
            scores_on_host = 0
        elif stitch == "gpu":
            raise CaseTooLarge(f"{case_id}: its scores need about {scores / gb:.1f} GB of GPU memory "
                               f"({classes} classes x {list(volume.shape[2:])} voxels in half precision), "
                               f"{free / gb:.1f} GB are free; use --stitch_device cpu or a smaller --val_batch_size")
        else:
            scores_on_host = scores
    else:
        scores_on_host = scores
    needed = scores_on_host + rest
    available = psutil.virtual_memory().available
    if needed > available:
        raise CaseTooLarge(f"{case_id}: predicting it needs about {needed / gb:.1f} GB of memory ({classes} classes "
                           f"x {list(volume.shape[2:])} voxels in half precision and buffers), {available / gb:.1f} GB "
                           f"are free; use a smaller --val_batch_size or predict it where more memory is free")
