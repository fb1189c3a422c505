"""Predictions back on the source image: undo padding, resampling, cropping and the axis order.

The inverse of `data_preprocessing.transforms.preprocess_arrays`, driven by a case's metadata
(docs/data_format.md): probabilities are resampled (linearly, order 0 along a separately handled
axis) to the crop before the argmax, so labels come from smooth class scores rather than from
interpolating a label map, then placed in the source volume and written with its affine and header.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from data_preprocessing.resample import resample_probabilities
from nnunet.regions import regions_to_labels
from utils.io import atomic_open, save_nifti


def unpad(volume: torch.Tensor, pad: Sequence[Sequence[int]]) -> torch.Tensor:
    """Remove `[[before, after], ...]` from the trailing spatial axes of (K, D, H, W)."""
    index = [slice(None)] * (volume.ndim - len(pad))
    for (before, after), size in zip(pad, volume.shape[-len(pad):]):
        index.append(slice(before, size - after))
    return volume[tuple(index)]


def to_crop_grid(probabilities: torch.Tensor, meta: dict) -> torch.Tensor:
    """(K, *meta["shape"]) probabilities -> (K, *meta["cropped_shape"]) on the source grid inside the crop box."""
    cropped = unpad(probabilities, meta["pad"])
    return resample_probabilities(cropped, meta["cropped_shape"], meta["separate_z"])


def to_labels(probabilities: torch.Tensor, regions: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """(K, ...) softmax probabilities (argmax) or (R, ...) region probabilities (> 0.5) -> uint8 labels."""
    if regions:
        return regions_to_labels(probabilities[None], regions)[0, 0].cpu().numpy().astype(np.uint8)
    return probabilities.argmax(0).to(torch.uint8).cpu().numpy()


def place_in_source(cropped: np.ndarray, meta: dict, fill: Sequence[float] | float = 0) -> np.ndarray:
    """Put crop-box data (d, h, w) or (K, d, h, w) into the source volume, in NIfTI order (X, Y, Z) or (K, X, Y, Z).

    `fill` is the value outside the box: one number, or one per leading channel. Sources stored slice-first
    (`meta["array_order"] == "zyx"`, KiTS19) get the (D, H, W) order they were read in.
    """
    slice_first = meta.get("array_order", "xyz") == "zyx"
    leading = cropped.shape[:-3]
    spatial = meta["original_shape"] if slice_first else meta["original_shape"][::-1]
    full = np.empty((*leading, *spatial), dtype=cropped.dtype)
    full[...] = np.asarray(fill, dtype=cropped.dtype).reshape(*leading, 1, 1, 1) if leading else fill
    full[(Ellipsis, *(slice(start, stop) for start, stop in meta["crop_box"]))] = cropped
    return np.ascontiguousarray(full if slice_first else np.swapaxes(full, -1, -3))


def source_header(meta: dict) -> nib.Nifti1Header:
    return nib.Nifti1Header(binaryblock=base64.b64decode(meta["nifti_header"]))


def source_image(data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header) -> nib.Nifti1Image:
    """`data` as a NIfTI image with the source's affine and header, stored as its own type without scaling."""
    header = header.copy()
    header.set_data_dtype(data.dtype)
    header.set_slope_inter(1, 0)
    return nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64), header=header)


def write_prediction(folder: str | os.PathLike, meta: dict, probabilities: torch.Tensor,
                     regions: Sequence[Sequence[int]] | None = None, save_probs: bool = False,
                     class_names: Sequence[str] = (), output_format: str = "nifti") -> Path:
    """Write `<case>.nii.gz` (uint8 labels on the source grid), and `<case>_probs.npz` with `save_probs`.

    For tasks converted from 2D images (`meta["png_masks"]`), `<case>.png` too: the mask as the source masks
    store it (labels times the masks' scale, e.g. 0/255).

    Args:
        folder: output folder.
        meta: the case's metadata.
        probabilities: (K, *meta["shape"]) float probabilities in the preprocessed grid.
        regions: the label values of each region for sigmoid (region) outputs, None for softmax.
        save_probs: also save the probabilities on the source grid, (K, X, Y, Z) float16, compressed.
        class_names: the names of the foreground label values, for a DICOM SEG.
        output_format: "nifti", "dicom-seg" (`<case>.dcm` instead, `nnunet.dicom_seg`, DICOM cases) or "both".

    Returns:
        The path of the NIfTI file (of the DICOM SEG without one).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    on_crop = to_crop_grid(probabilities, meta)
    labels = place_in_source(to_labels(on_crop, regions), meta)
    path = folder / f"{meta['case_id']}.nii.gz"
    if output_format != "dicom-seg":
        save_nifti(path, source_image(labels, np.array(meta["affine"]), source_header(meta)))
    if output_format != "nifti":
        from nnunet.dicom_seg import write_dicom_seg  # highdicom only for DICOM SEG output

        seg_path = write_dicom_seg(folder, meta["case_id"], labels, meta, class_names)
        path = seg_path if output_format == "dicom-seg" else path
    if meta.get("png_masks"):  # a task converted from 2D PNG/TIFF masks: also a mask in that form
        from data_preprocessing.images2d import write_mask_png  # Pillow only for 2D image tasks

        write_mask_png(folder / f"{meta['case_id']}.png", labels, meta["png_masks"]["scale"])
    if save_probs:
        # Outside the crop box: background for softmax outputs, no region for sigmoid ones.
        outside = np.zeros(on_crop.shape[0])
        if not regions:
            outside[0] = 1
        source = place_in_source(on_crop.cpu().numpy().astype(np.float16), meta, fill=outside)
        with atomic_open(folder / f"{meta['case_id']}_probs.npz", "wb") as handle:
            np.savez_compressed(handle, probabilities=source)
    return path
