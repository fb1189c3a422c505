"""DALI pipelines that feed the network: training, evaluation, test and benchmark, in 2D and 3D.

One pipeline definition serves both devices. The files are always read and cropped on the CPU;
with `Device("gpu", ...)` every operator after the crop runs on the GPU, with `Device("cpu", None)`
the whole pipeline runs on the CPU (`device_id=None`). `select_device` is the one place that
chooses.

Arrays are channel first, `(C, D, H, W)`. A 2D network trains on slabs: each of `nvol` volumes
drawn per step gives `S = batch_size // nvol` contiguous slices, augmented in-plane, and the
loader stacks them into `(nvol * S, C, H, W)`.

Random augmentations run under DALI conditionals (`if fn.random.coin_flip(...)`), so a sample
pays only for the augmentations drawn for it; blending every branch with a coin computes all of
them and was measured 3.5x slower.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import nvidia.dali.math as dmath
import torch
from nvidia.dali import fn, pipeline_def, types

# nnU-Net's augmentation probabilities and ranges.
ZOOM_PROB, ZOOM_RANGE = 0.15, (0.7, 1.0)
ROTATION_PROB, ROTATION_DEGREES = 0.2, 30.0
SCALE_PROB, SCALE_RANGE = 0.2, (0.7, 1.4)
FLIP_PROB = 0.5
NOISE_PROB, NOISE_SIGMA = 0.15, (0.0, 0.33)
BLUR_PROB, BLUR_SIGMA = 0.15, (0.5, 1.5)
BRIGHTNESS_PROB, BRIGHTNESS_RANGE = 0.15, (0.7, 1.3)
CONTRAST_PROB, CONTRAST_RANGE = 0.15, (0.65, 1.5)
# A 3D patch whose in-plane edge exceeds its depth by this factor (an anisotropic plan) is
# rotated, scaled and zoomed in-plane only, as nnU-Net does: resampling thick slices across the
# slice axis invents structure.
ANISOTROPY_THRESHOLD = 3.0
PREFETCH_QUEUE_DEPTH = 2


@dataclass(frozen=True)
class Augmentations:
    """Groups of training augmentations; each augmentation inside a group keeps its own probability.

    Attributes:
        zoom: crop a centred region of 0.7-1.0 the patch and resize it back to the patch.
        rotation: rotation (+-30 degrees) and scaling (0.7-1.4) about the patch centre.
        flips: a flip of each spatial axis (in-plane axes only in 2D).
        intensity: gaussian noise, gaussian blur, brightness and contrast (image only).
    """

    zoom: bool = True
    rotation: bool = True
    flips: bool = True
    intensity: bool = True


@dataclass(frozen=True)
class Device:
    """Where the operators after the read and crop run.

    Attributes:
        kind: "cpu" or "gpu".
        device_id: the CUDA device of this process (its local rank), None on the CPU.
    """

    kind: str
    device_id: int | None


def select_device(gpus: int, local_rank: int = 0) -> Device:
    """The pipelines' device: the GPU of this process when GPUs are requested and CUDA works, else the CPU."""
    if gpus > 0 and torch.cuda.is_available():
        return Device("gpu", local_rank)
    return Device("cpu", None)


def rotates_in_plane_only(patch_size: Sequence[int]) -> bool:
    """Whether a 3D patch (D, H, W) is anisotropic enough to keep rotation and scaling in the (H, W) plane."""
    return len(patch_size) == 3 and max(patch_size[1:]) / patch_size[0] > ANISOTROPY_THRESHOLD


def case_id_of(path: str) -> str:
    """'/data/01_3d/BRATS_001_x.npy' -> 'BRATS_001'."""
    name = os.path.basename(path)
    return name[: -len("_x.npy")] if name.endswith("_x.npy") else os.path.splitext(name)[0]


# ---------------------------------------------------------------------------------------------
# Building blocks of the pipelines (called inside a pipeline definition)
# ---------------------------------------------------------------------------------------------
def _coin(probability: float):
    return fn.random.coin_flip(probability=probability, dtype=types.BOOL)


def _as_float(flag):
    return fn.cast(flag, dtype=types.FLOAT)


def _read(files: Sequence[str], shuffle_seed: int | None, **roi):
    """numpy reader over `files`; shuffled with a fresh permutation every pass when `shuffle_seed` is set.

    Two readers built with the same files and seed visit the same files in the same order, which
    keeps images and labels paired.
    """
    if shuffle_seed is None:
        return fn.readers.numpy(files=list(files), **roi)
    return fn.readers.numpy(
        files=list(files), shuffle_after_epoch=True, shuffle_after_epoch_seed=shuffle_seed, **roi
    )


def _crop_start(label, crop_shape: Sequence[int], oversampling: float):
    """Start (D, H, W) of a training crop of `crop_shape`, biased to foreground.

    With probability `oversampling` a foreground class present in the label is drawn (uniformly),
    then one of its connected objects; the crop holds that object, or, for an object larger than
    the crop, a random voxel of the class, so the crop always holds foreground. Otherwise the crop
    is uniform over the volume. Crops stay inside the volume except along axes where the volume
    is smaller than the crop (they start at 0 and are padded at the end).

    Args:
        label: (1, D, H, W) uint8 on the CPU.
        crop_shape: (D, H, W) in voxels.
        oversampling: probability of a foreground crop.

    Returns:
        int32 (3,) start of the crop; may be computed past the volume only where padding is needed.
    """
    window = np.array([1, *crop_shape], dtype=np.int32)
    start, end, label_class = fn.segmentation.random_object_bbox(
        label, background=0, foreground_prob=oversampling, format="start_end", output_class=True,
        cache_objects=True,
    )
    start, end = fn.cast(start, dtype=types.INT32), fn.cast(end, dtype=types.INT32)
    # A crop inside the box of a large object can miss the object itself (a shell, a vessel tree):
    # fall back to one voxel of the drawn class, which the crop then surely contains.
    if label_class > 0 and fn.reductions.max(end - start - types.Constant(window)) > 0:
        voxel = fn.cast(fn.segmentation.random_mask_pixel(label, value=label_class, foreground=1), dtype=types.INT32)
        start, end = voxel, voxel + 1
    in_shape = dmath.max(label.shape(dtype=types.INT32), types.Constant(window))
    anchor = fn.roi_random_crop(roi_start=start, roi_end=end, crop_shape=window, in_shape=in_shape)
    return fn.cast(anchor[1:], dtype=types.INT32)


def _uniform_crop_start(label_or_image, crop_shape: Sequence[int]):
    """Start (D, H, W) of a crop placed uniformly in the volume (padded where the volume is smaller)."""
    shape = label_or_image.shape(dtype=types.INT32)[1:]
    window = types.Constant(np.array(crop_shape, dtype=np.int32))
    in_shape = dmath.max(shape, window)
    return fn.cast(
        fn.roi_random_crop(roi_start=types.Constant(np.zeros(3, np.int32)), roi_end=in_shape, crop_shape=window,
                           in_shape=in_shape),
        dtype=types.INT32,
    )


def _slice(data, start, crop_shape: Sequence[int]):
    return fn.slice(data, start, types.Constant(np.array(crop_shape, dtype=np.int32)), axis_names="DHW",
                    out_of_bounds_policy="pad")


def _resample(image, label, window_fraction, flips, crop_shape: Sequence[int]):
    """Resize a centred window of `window_fraction` times the patch (per axis) back to the patch.

    Flipped axes swap the window's start and end, so the flips cost nothing extra. A window larger
    than the patch (zooming out) reaches past the patch: the patch is padded with 0 first, as the
    warp fills. Image cubic, label nearest.
    """
    size = types.Constant(np.array(crop_shape, dtype=np.float32))
    window = window_fraction * size
    pad = dmath.max(dmath.ceil((window - size) * 0.5), 0.0)
    if fn.reductions.max(pad) > 0:
        anchor = fn.cast(-pad, dtype=types.INT32)
        shape = fn.cast(size + 2.0 * pad, dtype=types.INT32)
        padding = dict(axis_names="DHW", out_of_bounds_policy="pad")
        image, label = fn.slice(image, anchor, shape, **padding), fn.slice(label, anchor, shape, **padding)
    start = pad + (size - window) * 0.5
    flipped = fn.cast(flips, dtype=types.FLOAT) * window
    resize = dict(size=[float(s) for s in crop_shape], roi_start=start + flipped, roi_end=start + window - flipped,
                  antialias=False)
    return fn.resize(image, interp_type=types.INTERP_CUBIC, **resize), fn.resize(label, interp_type=types.INTERP_NN,
                                                                                   **resize)


def _affine(window_fraction, flips, crop_shape: Sequence[int], planar: bool, in_plane: bool):
    """Source-to-destination affine about the patch centre: a random rotation, then the scaling that
    maps a window of `window_fraction` times the patch onto the patch, and the flips.

    DALI's transforms take coordinates as (x, y, z) = (W, H, D); 2D samples get a 2D transform
    applied to each slice, anisotropic 3D patches rotate about the D axis only.
    """
    angle_range = (-ROTATION_DEGREES, ROTATION_DEGREES)
    depth, height, width = crop_shape
    # Per axis (D, H, W): magnification, negative where flipped.
    factor = (1.0 - 2.0 * fn.cast(flips, dtype=types.FLOAT)) / window_fraction
    if planar:
        centre = [width / 2, height / 2]
        matrix = fn.transforms.rotation(angle=fn.random.uniform(range=angle_range), center=centre)
        return fn.transforms.scale(matrix, scale=fn.stack(factor[2], factor[1]), center=centre)
    centre = [width / 2, height / 2, depth / 2]
    axes = [[0.0, 0.0, 1.0]] if in_plane else [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    matrix = None
    for axis in axes:
        rotation = dict(angle=fn.random.uniform(range=angle_range), axis=axis, center=centre)
        matrix = fn.transforms.rotation(**rotation) if matrix is None else fn.transforms.rotation(matrix, **rotation)
    return fn.transforms.scale(matrix, scale=fn.stack(factor[2], factor[1], factor[0]), center=centre)


def _warp(data, matrix, crop_shape: Sequence[int], planar: bool, interp_type):
    """warp_affine over (C, D, H, W) data, which DALI only accepts channel last.

    Reshaping (not transposing) to frames of one channel avoids copying: 3D data becomes
    (C, D, H, W, 1) "FDHWC", 2D slabs become (C * S, H, W, 1) "FHWC".
    """
    depth, height, width = crop_shape
    if planar:
        frames = fn.reshape(data, shape=[-1, height, width, 1], layout="FHWC")
    else:
        frames = fn.reshape(data, shape=[-1, depth, height, width, 1], layout="FDHWC")
    warped = fn.warp_affine(frames, matrix=matrix, inverse_map=False, fill_value=0.0, interp_type=interp_type)
    return fn.reshape(warped, shape=[-1, depth, height, width], layout="CDHW")


def _spatial_augment(image, label, crop_shape: Sequence[int], planar: bool, augment: Augmentations):
    """Zoom, rotation, scaling and flips of image and label together, in one resampling at most.

    Each is drawn with its own probability (a disabled group draws with probability 0). A sample
    with a rotation is warped once with everything composed (image linear, label nearest); one
    with only zoom and/or scaling is resized once (image cubic); one with only flips is flipped.
    Composing matters on the CPU, where a warp costs about eight resizes. Zoom and scaling both act
    on the window the patch is resampled from: zoom takes a centred 0.7-1.0 of it, scaling
    multiplies it by 0.7-1.4 (nnU-Net's convention: > 1 zooms out). In 2D and for anisotropic 3D
    patches they stay in-plane.
    """
    in_plane = planar or rotates_in_plane_only(crop_shape)
    scaled_axes = types.Constant(np.array([0.0 if in_plane else 1.0, 1.0, 1.0], dtype=np.float32))
    flip_axes = np.array([0 if planar else 1, 1, 1], dtype=np.int32)
    flips = fn.random.coin_flip(probability=FLIP_PROB if augment.flips else 0.0, shape=[3], dtype=types.INT32)
    flips = flips * types.Constant(flip_axes)
    zoom = _coin(ZOOM_PROB if augment.zoom else 0.0)
    rescale = _coin(SCALE_PROB if augment.rotation else 0.0)
    rotate = _coin(ROTATION_PROB if augment.rotation else 0.0)
    fraction = (1.0 + _as_float(zoom) * (fn.random.uniform(range=ZOOM_RANGE) - 1.0)) * (
        1.0 + _as_float(rescale) * (fn.random.uniform(range=SCALE_RANGE) - 1.0))
    window_fraction = 1.0 + (fraction - 1.0) * scaled_axes
    if rotate:
        matrix = _affine(window_fraction, flips, crop_shape, planar, in_plane)
        image = _warp(image, matrix, crop_shape, planar, types.INTERP_LINEAR)
        label = _warp(label, matrix, crop_shape, planar, types.INTERP_NN)
    elif zoom or rescale:
        image, label = _resample(image, label, window_fraction, flips, crop_shape)
    elif fn.reductions.max(flips) > 0:
        flip = dict(depthwise=flips[0], vertical=flips[1], horizontal=flips[2])
        image, label = fn.flip(image, **flip), fn.flip(label, **flip)
    return image, label


def _augment(image, label, crop_shape: Sequence[int], planar: bool, augment: Augmentations):
    """nnU-Net's training augmentations on a (C, D, H, W) image and its (1, D, H, W) label.

    Spatial operations (zoom, rotation/scale, flips) move image and label together; in 2D they act
    in the (H, W) plane only. Intensity operations change the image only.
    """
    image, label = _spatial_augment(image, label, crop_shape, planar, augment)
    if augment.intensity:
        if _coin(NOISE_PROB):
            image = fn.noise.gaussian(image, stddev=fn.random.uniform(range=NOISE_SIGMA))
        if _coin(BLUR_PROB):
            sigma = fn.random.uniform(range=BLUR_SIGMA)
            if planar:
                # "CFHW": F is not a data axis, so each slice is blurred in-plane.
                image = fn.reshape(fn.gaussian_blur(fn.reshape(image, layout="CFHW"), sigma=sigma), layout="CDHW")
            else:
                image = fn.gaussian_blur(image, sigma=sigma)
        if _coin(BRIGHTNESS_PROB):
            image = image * fn.random.uniform(range=BRIGHTNESS_RANGE)
        if _coin(CONTRAST_PROB):
            low, high = fn.reductions.min(image), fn.reductions.max(image)
            image = dmath.clamp(image * fn.random.uniform(range=CONTRAST_RANGE), low, high)
    return image, label


def _to_device(data, device: Device):
    return data.gpu() if device.kind == "gpu" else data


def _slabs_first(image, label, crop_shape: Sequence[int]):
    """(C, S, H, W) -> (S, C, H, W) so that the batch (nvol, S, C, H, W) flattens to 2D samples without a copy."""
    _, height, width = crop_shape
    image = fn.transpose(image, perm=[1, 0, 2, 3], output_layout="FCHW")
    # A one-channel label needs no data movement, only a new shape.
    label = fn.reshape(label, shape=[-1, 1, height, width], layout="FCHW")
    return image, label


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------
@pipeline_def(enable_conditionals=True)
def training_pipeline(
    image_files: Sequence[str],
    label_files: Sequence[str],
    crop_shape: Sequence[int],
    oversampling: float,
    augment: Augmentations,
    device: Device,
    shuffle_seed: int,
    planar: bool,
):
    """Random patches of labelled cases with nnU-Net's augmentations.

    Args:
        image_files, label_files: paired `<case>_x.npy` (C, D, H, W) and `<case>_y.npy` (1, D, H, W).
        crop_shape: (D, H, W) patch; in 2D (S, H, W) with S slices per volume.
        oversampling: probability that a patch holds foreground.
        augment: which augmentation groups run.
        device: where the operators after the crop run.
        shuffle_seed: seed of the per-pass permutation of the files.
        planar: 2D training: augment in-plane and return slices first.

    Returns:
        image float32 (C, *crop_shape) and label uint8 (1, *crop_shape) per sample; in 2D
        (S, C, H, W) and (S, 1, H, W).
    """
    label = fn.reshape(_read(label_files, shuffle_seed), layout="CDHW")
    start = _crop_start(label, crop_shape, oversampling)
    # The image reader reads only the crop from the (memory-mapped) file instead of the whole volume.
    image = _read(image_files, shuffle_seed, roi_start=start, roi_shape=list(crop_shape), roi_axes=[1, 2, 3],
                  out_of_bounds_policy="pad")
    image = fn.reshape(image, layout="CDHW")
    label = _slice(label, start, crop_shape)
    image, label = _to_device(image, device), _to_device(label, device)
    image, label = _augment(image, label, crop_shape, planar, augment)
    if planar:
        image, label = _slabs_first(image, label, crop_shape)
    return image, label


@pipeline_def
def benchmark_pipeline(
    image_files: Sequence[str],
    label_files: Sequence[str] | None,
    crop_shape: Sequence[int],
    device: Device,
    shuffle_seed: int,
    planar: bool,
):
    """Uniformly placed patches without augmentation, to time the model without the loader's cost.

    Returns:
        image (C, *crop_shape) and, when `label_files` is given, label (1, *crop_shape); 2D as in
        `training_pipeline`.
    """
    if label_files is None:
        image = fn.reshape(_read(image_files, shuffle_seed), layout="CDHW")
        start = _uniform_crop_start(image, crop_shape)
        image = _to_device(_slice(image, start, crop_shape), device)
        if planar:
            image = fn.transpose(image, perm=[1, 0, 2, 3], output_layout="FCHW")
        return (image,)
    label = fn.reshape(_read(label_files, shuffle_seed), layout="CDHW")
    start = _uniform_crop_start(label, crop_shape)
    image = _read(image_files, shuffle_seed, roi_start=start, roi_shape=list(crop_shape), roi_axes=[1, 2, 3],
                  out_of_bounds_policy="pad")
    image = _to_device(fn.reshape(image, layout="CDHW"), device)
    label = _to_device(_slice(label, start, crop_shape), device)
    if planar:
        image, label = _slabs_first(image, label, crop_shape)
    return image, label


@pipeline_def
def volume_pipeline(image_files: Sequence[str], label_files: Sequence[str] | None, device: Device):
    """Whole volumes in file order, for evaluation (with labels) and prediction (without).

    Returns:
        image float32 (C, D, H, W), [label uint8 (1, D, H, W)], and the image's path as bytes.
    """
    image = fn.readers.numpy(files=list(image_files))
    path = fn.get_property(image, key="source_info")
    if label_files is None:
        return _to_device(image, device), path
    label = fn.readers.numpy(files=list(label_files))
    return _to_device(image, device), _to_device(label, device), path
