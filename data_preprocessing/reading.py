"""Reading a raw case: its NIfTI files (or DICOM series, `data_preprocessing.dicom`) checked and turned into
(C, D, H, W) arrays with their geometry.

Every file is opened through `utils.nifti.load_nifti`, which refuses a header that claims more data than the
file holds before anything is allocated; a problem is one line naming the case and the file.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from data_preprocessing.dicom import dicom_meta, read_dicom_case
from data_preprocessing.layouts import CaseFiles, PreprocessingError
from utils.nifti import NiftiError, load_nifti


def read_nifti(path: Path, case_id: str, label: bool = False) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Load a NIfTI file and its voxels (float32 for images, the stored type for labels)."""
    if not path.is_file():
        raise PreprocessingError(f"{case_id}: file {path} does not exist")
    try:
        nifti = load_nifti(path)
    except NiftiError as error:
        raise PreprocessingError(f"{case_id}: cannot read {path}: {error.reason}") from None
    try:
        data = np.asanyarray(nifti.dataobj) if label else nifti.get_fdata(dtype=np.float32, caching="unchanged")
    except Exception as error:  # nibabel and zlib raise many types for damaged files
        raise PreprocessingError(f"{case_id}: cannot read {path} ({type(error).__name__}: {error})") from None
    return nifti, data


def to_channels_first(data: np.ndarray, array_order: str = "xyz") -> np.ndarray:
    """NIfTI (X, Y, Z) or (X, Y, Z, C) -> (C, D, H, W) = (C, Z, Y, X); files stored slice-first ("zyx",
    KiTS19) keep their spatial order."""
    if array_order == "zyx":
        return data[None] if data.ndim == 3 else data.transpose(3, 0, 1, 2)
    if data.ndim == 3:
        return data.transpose(2, 1, 0)[None]
    return data.transpose(3, 2, 1, 0)


def spacing_dhw(image: nib.Nifti1Image, array_order: str = "xyz") -> list[float]:
    """Header zooms, in the array's axis order, -> (D, H, W) spacing in mm."""
    zooms = [float(z) for z in image.header.get_zooms()[:3]]
    return zooms if array_order == "zyx" else zooms[::-1]


@dataclass
class LoadedCase:
    image: np.ndarray  # (C, D, H, W) float32
    label: np.ndarray | None  # (D, H, W) uint8
    spacing: list[float]  # (D, H, W) mm
    nifti: nib.Nifti1Image  # the source image, for its affine and header


def read_image(task_dir: Path, case: CaseFiles) -> tuple[nib.Nifti1Image, np.ndarray]:
    """The case's image as (X, Y, Z) or (X, Y, Z, C), stacking per-channel files on the last axis."""
    if isinstance(case.image, str):
        return read_nifti(task_dir / case.image, case.case_id)
    first, volumes = None, []
    for name in case.image:
        nifti, data = read_nifti(task_dir / name, case.case_id)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise PreprocessingError(f"{case.case_id}: channel file {name} has shape {data.shape}; expected 3D")
        if first is not None and (data.shape != volumes[0].shape
                                  or not np.allclose(nifti.affine, first.affine, atol=1e-3, rtol=1e-4)):
            raise PreprocessingError(f"{case.case_id}: channel file {name} does not share the grid of {case.image[0]}")
        if first is None:
            first = nifti
        volumes.append(data)
    return first, np.stack(volumes, axis=-1)


def checked_image(data: np.ndarray, case: CaseFiles, n_channels: int) -> np.ndarray:
    """A case's image voxels, (X, Y, Z) or (X, Y, Z, C) as stored, checked and returned as (C, D, H, W).

    Raises:
        PreprocessingError: another number of axes or channels than the task's, or NaN or infinite voxels.
    """
    if data.ndim == 4 and data.shape[3] == 1 and n_channels == 1:
        data = data[..., 0]
    if data.ndim not in (3, 4):
        raise PreprocessingError(
            f"{case.case_id}: image {case.image} has shape {data.shape}; expected a 3D volume (X, Y, Z) "
            f"or (X, Y, Z, C) with C={n_channels} channels")
    channels = 1 if data.ndim == 3 else data.shape[3]
    if channels != n_channels:
        raise PreprocessingError(
            f"{case.case_id}: image has {channels} channel(s) but the task declares {n_channels} modalities")
    if not np.isfinite(data).all():
        raise PreprocessingError(f"{case.case_id}: image {case.image} contains NaN or infinite voxels")
    return np.ascontiguousarray(to_channels_first(data, case.array_order))


def load_case(task_dir: Path, case: CaseFiles, n_channels: int, label_values: Iterable[int]) -> LoadedCase:
    """Read one case and check it; raise PreprocessingError naming the case otherwise."""
    if case.dicom is not None:
        nifti, data = read_dicom_case(case)
    else:
        nifti, data = read_image(task_dir, case)
    image = checked_image(data, case, n_channels)
    label = None
    if case.label is not None:
        label_nifti, label_data = read_nifti(task_dir / case.label, case.case_id, label=True)
        if label_data.ndim == 4 and label_data.shape[3] == 1:
            label_data = label_data[..., 0]
        if label_data.ndim != 3:
            raise PreprocessingError(
                f"{case.case_id}: label {case.label} has shape {label_data.shape}; expected a 3D volume (X, Y, Z)")
        if label_data.shape != data.shape[:3]:
            raise PreprocessingError(
                f"{case.case_id}: image shape {data.shape[:3]} does not match label shape {label_data.shape}")
        if not np.allclose(nifti.affine, label_nifti.affine, atol=1e-3, rtol=1e-4):
            raise PreprocessingError(f"{case.case_id}: image and label affines differ; they must share one grid")
        # Checked on the distinct values: a float64 copy of a large label map (8 bytes a voxel, twice for the
        # rounding) was the largest allocation of preprocessing.
        values = np.unique(label_data)
        if not np.isfinite(values).all() or (values != np.round(values)).any():
            raise PreprocessingError(f"{case.case_id}: label {case.label} has non-integer values")
        values = values.astype(np.int64)
        unknown = sorted(set(values.tolist()) - set(label_values))
        if unknown:
            raise PreprocessingError(
                f"{case.case_id}: label values {unknown} are not declared in dataset.json 'labels'")
        label = to_channels_first(np.asarray(label_data).astype(np.uint8), case.array_order)[0]
        label = np.ascontiguousarray(label)
    return LoadedCase(image, label, spacing_dhw(nifti, case.array_order), nifti)


def case_meta(case: CaseFiles, loaded: LoadedCase, geometry: dict) -> dict:
    """The metadata that puts a prediction back on the source image (docs/data_format.md)."""
    meta = {
        "case_id": case.case_id,
        "image": case.image,
        "label": case.label,
        "original_shape": [int(n) for n in loaded.nifti.shape[:3]],
        "array_order": case.array_order,
        "affine": loaded.nifti.affine.tolist(),
        "nifti_header": base64.b64encode(loaded.nifti.header.binaryblock).decode("ascii"),
        **geometry,
    }
    if case.dicom is not None:
        meta["dicom"] = dicom_meta(case)
    return meta


def files_outside(root: Path, cases: Iterable[CaseFiles]) -> list[tuple[str, str, Path]]:
    """(case id, file as the dataset names it, where it really is) of each case file that a symbolic link or a
    `..` in its path places outside the dataset folder `root`."""
    base = Path(root).resolve()
    outside = []
    for case in cases:
        names = [case.image] if isinstance(case.image, str) else list(case.image)
        for name in [*names, *([case.label] if case.label else [])]:
            target = (Path(root) / name).resolve()
            if not target.is_relative_to(base):
                outside.append((case.case_id, name, target))
    return outside
