"""Predictions back on the source image: undo padding, resampling, cropping and the axis order.

The inverse of `data_preprocessing.transforms.preprocess_arrays`, driven by a case's metadata
(docs/data_format.md): probabilities are resampled (linearly, order 0 along a separately handled
axis) to the crop before the argmax, so labels come from smooth class scores rather than from
interpolating a label map, then placed in the source volume and written with its affine and header.

The way back runs in slabs along one axis of the crop (`crop_slabs`): each slab of every class is
resampled from the input rows it needs, turned into labels and, with --save_probs, streamed into the
probabilities file, so no float copy of all classes on the source grid ever exists; what stays whole
is the score volume on the network's grid (half precision) and the uint8 labels.
"""

from __future__ import annotations

import base64
import contextlib
import math
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from data_preprocessing.resample import axis_orders, resample_rows
from nnunet.regions import regions_to_labels
from utils.io import atomic_open, save_nifti


def unpad(volume: torch.Tensor, pad: Sequence[Sequence[int]]) -> torch.Tensor:
    """Remove `[[before, after], ...]` from the trailing spatial axes of (K, D, H, W)."""
    index = [slice(None)] * (volume.ndim - len(pad))
    for (before, after), size in zip(pad, volume.shape[-len(pad):]):
        index.append(slice(before, size - after))
    return volume[tuple(index)]


SLAB_BYTES = 64 * 2**20  # float32 scores of all classes per slab on the way back to the source grid

Slab = tuple[int, int, torch.Tensor]  # rows start:stop along the slab axis, (K, ...) float32 on the CPU


def slab_axis(meta: dict) -> int:
    """The crop-grid axis the way back is cut along: the one the source file stores slowest (NIfTI's Z, the
    preprocessed D; the last axis of slice-first sources), so probabilities stream into the file in order."""
    return 2 if meta.get("array_order", "xyz") == "zyx" else 0


def crop_slabs(grids: Sequence[tuple[torch.Tensor, dict]], scale: float = 1.0) -> Iterator[Slab]:
    """The sum of several score volumes taken back to the crop grid, times `scale`, slab by slab.

    Args:
        grids: (scores (K, *meta["shape"]) of any float dtype and device, meta): one per network grid, every
            meta of the same case (same crop).
        scale: e.g. 1 / the number of networks summed, for their mean.

    Yields:
        (start, stop, (K, ...) float32 scores of crop rows start:stop along `slab_axis`), on the CPU.
    """
    meta = grids[0][1]
    target = [int(n) for n in meta["cropped_shape"]]
    axis = slab_axis(meta)
    channels = grids[0][0].shape[0]
    step = max(1, SLAB_BYTES // (4 * channels * (math.prod(target) // target[axis])))
    for start in range(0, target[axis], step):
        stop = min(start + step, target[axis])
        total = None
        for scores, grid_meta in grids:
            orders = axis_orders(len(target), 1, grid_meta["separate_z"])
            part = resample_rows(unpad(scores, grid_meta["pad"]), target, orders, axis, start, stop).cpu()
            total = part if total is None else total.add_(part)
        yield start, stop, total.mul_(scale) if scale != 1 else total


def crop_labels(grids: Sequence[tuple[torch.Tensor, dict]], regions: Sequence[Sequence[int]] | None = None,
                scale: float = 1.0, consumers: Sequence[Callable[[int, int, torch.Tensor], None]] = ()) -> np.ndarray:
    """The labels of the (scaled) sum of `grids` on the crop grid, (d, h, w) uint8, slab by slab (`crop_slabs`);
    each slab's scores also go to every consumer(start, stop, scores)."""
    meta = grids[0][1]
    labels = np.empty([int(n) for n in meta["cropped_shape"]], dtype=np.uint8)
    axis = slab_axis(meta)
    for start, stop, scores in crop_slabs(grids, scale):
        index = [slice(None)] * labels.ndim
        index[axis] = slice(start, stop)
        labels[tuple(index)] = to_labels(scores, regions)
        for consume in consumers:
            consume(start, stop, scores)
    return labels


def outside_fill(channels: int, regions: Sequence[Sequence[int]] | None) -> np.ndarray:
    """Probabilities outside the crop box: background for softmax outputs, no region for sigmoid ones."""
    fill = np.zeros(channels)
    if not regions:
        fill[0] = 1
    return fill


class ProbabilityFile:
    """`<case>_probs.npz` written as slabs arrive: (K, *source shape) float16, in the source's axis order.

    The array is stored in Fortran order, so that the rows of the slab axis (`slab_axis`) are contiguous in the
    file and each slab is written once, as it comes; `np.load` reads it like any other array. Outside the crop
    box every voxel holds `fill` (one value per channel). Use as a context manager; the file appears (renamed
    from a temporary name) only when every row was written.
    """

    def __init__(self, path: str | os.PathLike, meta: dict, fill: Sequence[float]) -> None:
        self.path, self.meta = Path(path), meta
        self.fill = np.asarray(fill, dtype=np.float16)
        slice_first = meta.get("array_order", "xyz") == "zyx"
        # The source in the preprocessed axis order (D, H, W) and the order of the file's bytes in it: the
        # file's axes reversed (Fortran order), the channel last.
        self.shape_dhw = [int(n) for n in (meta["original_shape"] if slice_first else meta["original_shape"][::-1])]
        self.byte_order = (3, 2, 1, 0) if slice_first else (1, 2, 3, 0)
        self.axis = slab_axis(meta)
        self.box = [(int(low), int(high)) for low, high in meta["crop_box"]]
        self.written = 0  # source rows along the slab axis written so far
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> ProbabilityFile:
        handle = self.stack.enter_context(atomic_open(self.path, "wb"))
        archive = self.stack.enter_context(zipfile.ZipFile(handle, "w", zipfile.ZIP_DEFLATED))
        self.entry = self.stack.enter_context(archive.open("probabilities.npy", "w", force_zip64=True))
        shape = (len(self.fill), *self.meta["original_shape"])
        np.lib.format.write_array_header_2_0(self.entry, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                                                          "fortran_order": True, "shape": shape})
        return self

    def __call__(self, start: int, stop: int, scores: torch.Tensor) -> None:
        """Crop rows start:stop of (K, ...) scores on the crop grid (after the rows before them)."""
        low = self.box[self.axis][0]
        self.write_rows(low + start, scores.numpy().astype(np.float16))

    def write_rows(self, first: int, block: np.ndarray | None = None, count: int = 0) -> None:
        """Source rows from `first` on: the fill up to `first`, then `block` (K, ...) placed in the crop box."""
        while self.written < first:  # rows outside the crop box, a slab's worth at a time
            rows = min(first - self.written, max(1, SLAB_BYTES // (2 * len(self.fill) * self.plane())))
            self.emit(self.filled(rows))
        if block is not None:
            rows = block.shape[1 + self.axis]
            full = self.filled(rows)
            index = [slice(None)] + [slice(low, high) for low, high in self.box]
            index[1 + self.axis] = slice(None)
            full[tuple(index)] = block
            self.emit(full)

    def plane(self) -> int:
        return math.prod(self.shape_dhw) // self.shape_dhw[self.axis]

    def filled(self, rows: int) -> np.ndarray:
        shape = list(self.shape_dhw)
        shape[self.axis] = rows
        full = np.empty((len(self.fill), *shape), dtype=np.float16)
        full[...] = self.fill.reshape(-1, 1, 1, 1)
        return full

    def emit(self, rows: np.ndarray) -> None:
        self.entry.write(np.ascontiguousarray(rows.transpose(self.byte_order)).tobytes())
        self.written += rows.shape[1 + self.axis]

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.write_rows(self.shape_dhw[self.axis])
        if kind is None and self.written != self.shape_dhw[self.axis]:
            raise RuntimeError(f"{self.path}: wrote {self.written} of {self.shape_dhw[self.axis]} rows")
        # On an error the temporary file is removed and nothing appears under the final name.
        self.stack.__exit__(kind, value, traceback)


def to_labels(probabilities: torch.Tensor, regions: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """(K, ...) softmax probabilities (argmax) or (R, ...) region probabilities (> 0.5) -> uint8 labels."""
    if regions:
        return regions_to_labels(probabilities[None], regions)[0, 0].cpu().numpy().astype(np.uint8)
    # A running maximum over the classes (ties to the lower class, as argmax): torch's argmax over the leading
    # axis of a large volume is several times slower on the CPU.
    best = probabilities[0].clone()
    labels = torch.zeros(best.shape, dtype=torch.uint8, device=best.device)
    for index in range(1, probabilities.shape[0]):
        better = probabilities[index] > best
        labels.masked_fill_(better, index)
        torch.maximum(best, probabilities[index], out=best)
    return labels.cpu().numpy()


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
        probabilities: (K, *meta["shape"]) probabilities in the preprocessed grid, any float dtype and device.
        regions: the label values of each region for sigmoid (region) outputs, None for softmax.
        save_probs: also save the probabilities on the source grid, (K, X, Y, Z) float16, compressed.
        class_names: the names of the foreground label values, for a DICOM SEG.
        output_format: "nifti", "dicom-seg" (`<case>.dcm` instead, `nnunet.dicom_seg`, DICOM cases) or "both".

    Returns:
        The path of the NIfTI file (of the DICOM SEG without one).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    grids = [(probabilities, meta)]
    if save_probs:
        fill = outside_fill(probabilities.shape[0], regions)
        with ProbabilityFile(folder / f"{meta['case_id']}_probs.npz", meta, fill) as stream:
            on_crop = crop_labels(grids, regions, consumers=[stream])
    else:
        on_crop = crop_labels(grids, regions)
    labels = place_in_source(on_crop, meta)
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
    return path
