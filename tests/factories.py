"""Builders of tiny raw tasks for the tests."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np


@dataclass
class RawCase:
    """One case: image (X, Y, Z) or (X, Y, Z, C), label (X, Y, Z) or None, spacing (sx, sy, sz)."""

    case_id: str
    image: np.ndarray
    label: np.ndarray | None = None
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    affine: np.ndarray | None = None
    label_affine: np.ndarray | None = None

    def image_affine(self) -> np.ndarray:
        if self.affine is not None:
            return self.affine
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = [-10.0, 5.0, 2.5]
        return affine


@dataclass
class RawTask:
    root: Path
    cases: list[RawCase]
    test_cases: list[RawCase] = field(default_factory=list)


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def write_msd_task(parent: Path, name: str, cases: list[RawCase], test_cases: list[RawCase] = (),
                   modality: dict | None = None, labels: dict | None = None) -> RawTask:
    """Write an MSD-format task folder `parent/name` and return it."""
    root = parent / name
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    training = []
    for case in cases:
        save_nifti(root / "imagesTr" / f"{case.case_id}.nii.gz", case.image.astype(np.float32), case.image_affine())
        label_affine = case.label_affine if case.label_affine is not None else case.image_affine()
        save_nifti(root / "labelsTr" / f"{case.case_id}.nii.gz", case.label.astype(np.uint8), label_affine)
        training.append({"image": f"./imagesTr/{case.case_id}.nii.gz", "label": f"./labelsTr/{case.case_id}.nii.gz"})
    test = []
    for case in test_cases:
        save_nifti(root / "imagesTs" / f"{case.case_id}.nii.gz", case.image.astype(np.float32), case.image_affine())
        test.append(f"./imagesTs/{case.case_id}.nii.gz")
    dataset = {
        "name": name,
        "modality": modality or {"0": "MRI"},
        "labels": labels or {"0": "background", "1": "organ", "2": "lesion"},
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    (root / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return RawTask(root, list(cases), list(test_cases))


def blob_case(case_id: str, shape=(24, 20, 16), spacing=(1.0, 1.0, 1.0), channels: int = 1, seed: int = 0,
              margin: int = 3, ct: bool = False) -> RawCase:
    """A body (non-zero box inside a zero margin) holding an organ (1) with a lesion (2) inside."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    centre = np.array(shape) / 2
    radius = np.sqrt(((x - centre[0]) / shape[0]) ** 2 + ((y - centre[1]) / shape[1]) ** 2
                     + ((z - centre[2]) / shape[2]) ** 2)
    label = np.zeros(shape, np.uint8)
    label[radius < 0.3] = 1
    label[radius < 0.15] = 2
    body = np.zeros(shape, bool)
    body[margin:-margin, margin:-margin, max(1, margin // 2):-max(1, margin // 2)] = True
    label[~body] = 0
    base = np.array([-50.0 if ct else 100.0, 80.0, 160.0])
    image = np.stack([base[label] * (1 + 0.3 * c) + rng.normal(0, 5, shape) for c in range(channels)], axis=-1)
    if not ct:
        image[~body] = 0
    else:
        image[~body] = -1000.0
    image = image.astype(np.float32)
    return RawCase(case_id, image[..., 0] if channels == 1 else image, label, spacing)


@dataclass
class DicomGeometry:
    """Where a synthetic DICOM series lies, in DICOM patient coordinates (LPS, mm).

    `row_direction` is the direction of increasing column index (the first three ImageOrientationPatient values),
    `column_direction` that of increasing row index; slices are `slice_step` apart along their cross product.
    """

    origin: tuple[float, float, float] = (-20.0, 15.0, 30.0)
    row_direction: tuple[float, float, float] = (1.0, 0.0, 0.0)
    column_direction: tuple[float, float, float] = (0.0, 1.0, 0.0)
    pixel_spacing: tuple[float, float] = (1.0, 1.0)  # (between rows, between columns), as PixelSpacing
    slice_step: float = 1.5

    @classmethod
    def oblique(cls, degrees: float = 20.0, **changes) -> DicomGeometry:
        """Rows and columns turned about two axes: an orientation that is neither axial, coronal nor sagittal."""
        angle, tilt = np.radians(degrees), np.radians(degrees / 2)
        first = np.array([np.cos(angle), np.sin(angle), 0.0])
        second = np.array([-np.sin(angle) * np.cos(tilt), np.cos(angle) * np.cos(tilt), np.sin(tilt)])
        return cls(row_direction=tuple(np.round(first, 6)), column_direction=tuple(np.round(second, 6)), **changes)

    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)

    def position(self, index: int) -> np.ndarray:
        return np.array(self.origin) + index * self.slice_step * self.normal()

    def ras_affine(self) -> np.ndarray:
        """The NIfTI affine of the series, voxel (column, row, slice) -> RAS mm, computed from the geometry."""
        lps = np.eye(4)
        lps[:3, 0] = np.array(self.row_direction) * self.pixel_spacing[1]
        lps[:3, 1] = np.array(self.column_direction) * self.pixel_spacing[0]
        lps[:3, 2] = self.normal() * self.slice_step
        lps[:3, 3] = self.origin
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def dicom_stored(volume: np.ndarray, slope: float = 0.25, intercept: float = -1024.0) -> np.ndarray:
    """The int16 values a scanner would store for `volume` with this rescale: volume ~ stored * slope + intercept."""
    return np.clip(np.round((volume - intercept) / slope), -32768, 32767).astype(np.int16)


def write_dicom_series(folder: Path, volume: np.ndarray, geometry: DicomGeometry | None = None,
                       description: str = "CT", series_number: int = 1, study_uid: str | None = None,
                       slope: float = 0.25, intercept: float = -1024.0, seed: int = 0,
                       names: str = "random", patient_id: str = "P1") -> list[Path]:
    """Write `volume` (X, Y, Z) = (column, row, slice) as a DICOM series of int16 slices with a rescale slope and
    intercept, one file per slice, in a shuffled order under random names (or `names="ordered"`: slice order).
    The values a reader gets back are `dicom_stored(volume) * slope + intercept`. Returns the files, slice order.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    geometry = geometry or DicomGeometry()
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    stored = dicom_stored(volume, slope, intercept)
    series_uid, frame_uid = generate_uid(), generate_uid()
    study_uid = study_uid or generate_uid()
    paths = []
    for index in range(volume.shape[2]):
        paths.append(folder / (f"{rng.integers(1 << 40):012x}" if names == "random" else f"slice{index:03d}.dcm"))
    for index in rng.permutation(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        header = pydicom_dataset(meta)
        header.SOPClassUID, header.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        header.PatientName, header.PatientID, header.PatientBirthDate, header.PatientSex = "Test^Patient", \
            patient_id, "19700101", "O"
        header.StudyInstanceUID, header.SeriesInstanceUID, header.FrameOfReferenceUID = study_uid, series_uid, \
            frame_uid
        header.StudyID, header.StudyDate, header.StudyTime, header.AccessionNumber = "1", "20260101", "120000", "A1"
        header.ReferringPhysicianName, header.Modality, header.Manufacturer = "", "CT", "test"
        header.SeriesNumber, header.SeriesDescription, header.InstanceNumber = series_number, description, \
            int(index) + 1
        header.ImageOrientationPatient = [f"{v:.6f}" for v in (*geometry.row_direction, *geometry.column_direction)]
        header.ImagePositionPatient = [f"{v:.6f}" for v in geometry.position(int(index))]
        header.PixelSpacing = [f"{v:.6f}" for v in geometry.pixel_spacing]
        header.SliceThickness = f"{geometry.slice_step:.6f}"
        header.Rows, header.Columns = volume.shape[1], volume.shape[0]
        header.SamplesPerPixel, header.PhotometricInterpretation = 1, "MONOCHROME2"
        header.BitsAllocated, header.BitsStored, header.HighBit, header.PixelRepresentation = 16, 16, 15, 1
        header.RescaleSlope, header.RescaleIntercept, header.RescaleType = f"{slope:g}", f"{intercept:g}", "HU"
        header.PixelData = np.ascontiguousarray(stored[:, :, index].T).tobytes()
        header.save_as(paths[index], enforce_file_format=True)
    return paths


def pydicom_dataset(file_meta):
    from pydicom.dataset import FileDataset

    return FileDataset("", {}, file_meta=file_meta, preamble=b"\0" * 128)
