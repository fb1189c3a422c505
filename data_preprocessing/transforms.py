"""The numerical steps of preprocessing a case: crop, clip outliers, resample, normalise, pad.

Arrays are (C, D, H, W); `preprocess_arrays` runs the steps in order and returns the geometry that
`nnunet.export` needs to put a prediction back onto the source image (docs/data_format.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from data_preprocessing.reading import LoadedCase
from data_preprocessing.resample import resample_image, resample_label, resampled_shape, separate_axis


# --------------------------------------------------------------------------------------------
# The numerical steps
# --------------------------------------------------------------------------------------------
def nonzero_box(image: np.ndarray, label: np.ndarray | None = None) -> list[list[int]]:
    """Bounding box [[start, stop], ...] of the voxels that are non-zero in any channel of a
    (C, D, H, W) image (and of the label's foreground, so no annotation is cropped away).
    An all-zero image keeps its whole extent."""
    mask = (image != 0).any(axis=0)
    if label is not None:
        mask |= label > 0
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        box.append([int(present[0]), int(present[-1]) + 1] if present.size else [0, mask.shape[axis]])
    return box


def crop(array: np.ndarray, box: Sequence[Sequence[int]]) -> np.ndarray:
    """Crop the trailing spatial axes of `array` to `box`."""
    spatial = tuple(slice(start, stop) for start, stop in box)
    return array[(Ellipsis, *spatial)]


def normalise(image: np.ndarray, body: np.ndarray, normalization: Sequence[dict]) -> np.ndarray:
    """Normalise each channel of a (C, D, H, W) image in place.

    CT channels: clip to the dataset's foreground percentiles, then z-score with its foreground
    mean and std. Other channels: z-score over the body (the voxels of `body`, (D, H, W) bool);
    voxels outside the body are set to 0. A z-score scheme with `"nonzero": false` (2D images,
    whose black pixels are part of the picture) uses every voxel instead.
    """
    for channel, scheme in enumerate(normalization):
        values = image[channel]
        if scheme["type"] == "ct":
            np.clip(values, scheme["clip_low"], scheme["clip_high"], out=values)
            values -= scheme["mean"]
            values /= max(scheme["std"], 1e-8)
        else:
            masked = scheme.get("nonzero", True) and body.any()
            inside = values[body] if masked else values.ravel()
            mean, std = float(inside.mean()), float(inside.std())
            values -= mean
            values /= max(std, 1e-8)
            if masked:
                values[~body] = 0
    return image


# Intensities beyond the body's 0.5-99.5 percentile range, widened by its own width on each side, are clipped
# before resampling and normalisation; percentiles are estimated from at most this many voxels.
OUTLIER_PERCENTILES = (0.5, 99.5)


OUTLIER_SAMPLES = 1_000_000


def clip_outliers(image: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Clip absurd intensities of each channel of a (C, D, H, W) image in place.

    The fence is the 0.5-99.5 percentile range of the body's voxels (`body`, (D, H, W) bool; all
    voxels if it is empty) widened by the range's width on each side. Ordinary intensities, bright
    lesions included, lie inside it and are unchanged; a few corrupt voxels (1e6, 1e30) are pulled
    to it, so they can neither overflow the resampling nor dominate a z-score's mean and std.
    """
    mask = body.ravel() if body.any() else np.ones(body.size, bool)
    # A strided sample, coprime with a row, without copying the volume.
    step = max(1, int(mask.sum()) // OUTLIER_SAMPLES)
    while math.gcd(step, image.shape[-1]) != 1:
        step += 1
    for channel in range(image.shape[0]):
        values = image[channel]
        sample = values.ravel()[::step][mask[::step]]
        if sample.size == 0:
            continue
        low, high = np.percentile(sample.astype(np.float64), OUTLIER_PERCENTILES)
        width = high - low
        np.clip(values, low - width, high + width, out=values)
    return image


def pad_to(shape: Sequence[int], minimum: Sequence[int]) -> list[list[int]]:
    """Symmetric padding [[before, after], ...] that brings `shape` up to at least `minimum`."""
    padding = []
    for size, least in zip(shape, minimum):
        missing = max(0, least - size)
        padding.append([missing // 2, missing - missing // 2])
    return padding


def case_target_spacing(config: dict, spacing: Sequence[float]) -> list[float]:
    """3D: the task's target spacing. 2D: in-plane target, the slice axis kept as it is."""
    if config["dim"] == 2:
        return [float(spacing[0]), *config["spacing"][1:]]
    return list(config["spacing"])


def preprocess_arrays(loaded: LoadedCase, config: dict, training: bool) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Crop, resample, normalise and pad one loaded case.

    `loaded.image` may be changed in place (when the crop is the whole image no copy is made, to keep the
    memory of a large scan at one image): copy it first to preprocess it again.

    Returns:
        image (C, D, H, W) float32, label (1, D, H, W) uint8 or None, and the geometry part of
        the case metadata (see docs/data_format.md).
    """
    box = nonzero_box(loaded.image, loaded.label)
    image = np.ascontiguousarray(crop(loaded.image, box))
    label = np.ascontiguousarray(crop(loaded.label, box)) if loaded.label is not None else None
    body = (image != 0).any(axis=0)
    clip_outliers(image, body)
    target = case_target_spacing(config, loaded.spacing)
    new_shape = resampled_shape(image.shape[1:], loaded.spacing, target)
    separate_z = separate_axis(loaded.spacing, target)
    cropped_shape = list(image.shape[1:])
    image = resample_image(image, new_shape, separate_z)
    body = resample_label(body.astype(np.uint8), new_shape, [0, 1], separate_z).astype(bool)
    if label is not None:
        label = resample_label(label, new_shape, sorted(int(k) for k in config["labels"]), separate_z)
    image = normalise(image, body, config["normalization"])
    padding = [[0, 0]] * 3
    if training:
        patch = list(config["patch_size"])
        minimum = patch if len(patch) == 3 else [1, *patch]
        padding = pad_to(new_shape, minimum)
        # "edge" (KiTS19, as the MLPerf reference) repeats the border; the default pads zeros.
        mode = config.get("pad_mode", "constant")
        image = np.pad(image, [[0, 0], *padding], mode=mode)
        if label is not None:
            label = np.pad(label, padding, mode=mode)
    geometry = {
        "original_spacing": loaded.spacing,
        "crop_box": box,
        "cropped_shape": cropped_shape,
        "target_spacing": target,
        "resampled_shape": list(new_shape),
        "separate_z": separate_z,
        "pad": padding,
        "shape": list(image.shape[1:]),
    }
    label_out = label[None].astype(np.uint8) if label is not None else None
    return image.astype(np.float32, copy=False), label_out, geometry
