"""DICOM input: series found in a folder, checked from their headers, read into the geometry of a NIfTI image.

`main.py --exec_mode predict --input DIR` takes a folder of DICOM files as well as NIfTI images: when DIR holds no
NIfTI image, every file below it (subfolders included) that pydicom reads as a DICOM image is grouped by its
SeriesInstanceUID. Non-image objects (segmentations, structured reports, ...) are ignored.

Each series is checked from its headers before any pixel is read: one orientation, one size, one pixel spacing
for every slice, slices stacked along the slice normal, no two at one position, and no missing slices (a step
between neighbouring positions more than 1.5 times the median step). SimpleITK then reads the pixels (rescale
slope and intercept applied) in the files' order along the slice normal, and the volume becomes what a NIfTI of
the series holds: voxels (X, Y, Z) = (column, row, slice) and the affine in RAS (DICOM's patient coordinates are
LPS: the first two rows change sign). Predictions of such a case are written back in the same order.

Cases:

* a task with one channel: every series is a case (or, with one `--dicom_channels` name, the series it matches in
  each study);
* a task with several channels, or whenever channel names are given (`--dicom_channels`): the series of one
  study (StudyInstanceUID) make a case, one series per channel, found by their SeriesDescription: a channel name
  matches a description that contains it, ignoring case; when several series of a study match, the one whose
  description equals the name wins. The names default to the task's channel names (config.json `modalities`).
  The channels of a case must share one grid.

Case ids: the folder that holds a case's files and no other case's (its path below DIR, with `/` as `_`); for
cases mixed in one folder, `<SeriesNumber>_<SeriesDescription>` of a series or `<PatientID>_<StudyID>` of a
study, with characters other than letters, digits, `.`, `-` and `_` replaced by `_`; names that would repeat get
`_` and 8 hexadecimal digits of the series (or study) UID's SHA-1.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from data_preprocessing.layouts import NIFTI_ENDINGS, CaseFiles, PreprocessingError, image_cases

if TYPE_CHECKING:  # pydicom and SimpleITK are imported where DICOM is read: NIfTI runs do without them
    import pydicom

# Neighbouring slices further apart than this many times the median step mean missing slices.
GAP_FACTOR = 1.5
OUTPUT_FORMATS = ("nifti", "dicom-seg", "both")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class DicomSeries:
    """One checked series.

    Attributes:
        uid: SeriesInstanceUID.
        study_uid: StudyInstanceUID.
        description: SeriesDescription ("" when absent).
        number: SeriesNumber (None when absent).
        files: absolute paths, in slice order (ascending position along the slice normal).
        grid: (rows, columns, orientation (6,), pixel spacing (2,), positions (N, 3)), to compare series.
        patient_id, study_id: for case ids of mixed folders.
    """

    uid: str
    study_uid: str
    description: str
    number: int | None
    files: tuple[str, ...]
    grid: tuple
    patient_id: str = ""
    study_id: str = ""

    def name(self) -> str:
        """How messages name it: number, description and UID."""
        number = f"{self.number} " if self.number is not None else ""
        return f"series {number}'{self.description}' ({self.uid})"


def has_nifti(folder: Path) -> bool:
    return any(p.name.endswith(NIFTI_ENDINGS) and not p.name.startswith(".") for p in folder.iterdir())


def raw_cases(folder: Path, n_channels: int, channel_names: Sequence[str] = (),
              default_names: Sequence[str] = ()) -> list[CaseFiles]:
    """The cases of a prediction input folder: its NIfTI images (`layouts.image_cases`) or, without any, its DICOM
    series (`dicom_cases`).

    Args:
        folder: the --input folder.
        n_channels: the task's channels.
        channel_names: the SeriesDescription of each channel (--dicom_channels), or empty.
        default_names: the task's channel names, used for DICOM when `channel_names` is empty and the task has
            several channels.
    """
    if has_nifti(folder):
        if channel_names:
            raise PreprocessingError(f"--dicom_channels names DICOM series but {folder} holds NIfTI images")
        return image_cases(folder, n_channels)
    return dicom_cases(folder, n_channels, channel_names or (default_names if n_channels > 1 else ()))


# ----------------------------------------------------------------------------------------------
# Finding and checking series (headers only)
# ----------------------------------------------------------------------------------------------
def read_headers(folder: Path) -> dict[str, list[tuple[Path, pydicom.Dataset]]]:
    """The DICOM image files below `folder` (hidden files and folders skipped), by SeriesInstanceUID."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if "SeriesInstanceUID" not in header or "ImagePositionPatient" not in header or "Rows" not in header:
            continue  # not an image of a volume (a segmentation, a report, ...)
        series.setdefault(str(header.SeriesInstanceUID), []).append((path.resolve(), header))
    return series


def _floats(header: pydicom.Dataset, keyword: str, count: int, where: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in header[keyword].value], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        values = np.array([])
    if values.shape != (count,):
        raise PreprocessingError(f"{where}: {keyword} must hold {count} numbers")
    return values


def describe(uid: str, entries: list[tuple[Path, pydicom.Dataset]]) -> DicomSeries:
    """The series of these headers as its first header describes it, not yet checked: no slice order, no grid."""
    first = entries[0][1]
    try:
        number = int(first.get("SeriesNumber"))
    except (TypeError, ValueError):
        number = None
    return DicomSeries(uid, str(first.get("StudyInstanceUID", "")), str(first.get("SeriesDescription", "")), number,
                       tuple(str(path) for path, _ in entries), (), str(first.get("PatientID", "")),
                       str(first.get("StudyID", "")))


def check_series(uid: str, entries: list[tuple[Path, pydicom.Dataset]], folder: Path) -> DicomSeries:
    """The series of these headers, its files sorted along the slice normal.

    Raises:
        PreprocessingError: one line naming the folder and the series: mixed orientations, sizes or pixel
            spacings; slices off the slice normal or at one position; missing slices; multi-frame images; a single
            slice.
    """
    series = describe(uid, entries)
    where = f"{folder}: {series.name()}"
    if any(int(header.get("NumberOfFrames", 1) or 1) > 1 for _, header in entries):
        raise PreprocessingError(f"{where} holds multi-frame images; export it as one file per slice")
    if len(entries) < 2:
        raise PreprocessingError(f"{where} has a single slice; a volume needs at least 2")
    grids = []
    for _, header in entries:
        grids.append((int(header.Rows), int(header.Columns), _floats(header, "ImageOrientationPatient", 6, where),
                      _floats(header, "PixelSpacing", 2, where)))
    rows, columns, orientation, spacing = grids[0]
    for (path, _), (other_rows, other_columns, other_orientation, other_spacing) in zip(entries, grids):
        if ((other_rows, other_columns) != (rows, columns) or not np.allclose(other_orientation, orientation, atol=1e-4)
                or not np.allclose(other_spacing, spacing, rtol=1e-4, atol=1e-6)):
            raise PreprocessingError(f"{where} mixes slice geometries: {path.name} differs from {entries[0][0].name} "
                                     f"in orientation, size or pixel spacing")
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([_floats(header, "ImagePositionPatient", 3, where) for _, header in entries])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    off_normal = positions - positions[0] - np.outer(along - along[0], normal)
    if np.abs(off_normal).max() > 1e-2 * max(float(spacing.min()), 1e-3):
        raise PreprocessingError(f"{where}: its slices are not stacked along the slice normal (gantry tilt); "
                                 f"resample it to an orthogonal grid first")
    steps = np.diff(along)
    median = float(np.median(steps))
    if steps.min() <= 1e-3 * max(median, 1e-3):
        index = int(np.argmin(steps))
        raise PreprocessingError(f"{where} has two slices at one position ({along[index]:.3f} mm along the normal)")
    if steps.max() > GAP_FACTOR * median:
        index = int(np.argmax(steps))
        raise PreprocessingError(f"{where} is missing slices: {steps[index]:.3f} mm between the slices at "
                                 f"{along[index]:.3f} and {along[index + 1]:.3f} mm where the median step is "
                                 f"{median:.3f} mm")
    files = tuple(str(entries[i][0]) for i in order)
    return DicomSeries(series.uid, series.study_uid, series.description, series.number, files,
                       (rows, columns, orientation, spacing, positions), series.patient_id, series.study_id)


def find_series(folder: Path) -> list[tuple[DicomSeries, list[tuple[Path, pydicom.Dataset]]]]:
    """Every DICOM image series below `folder` (`describe`d, with its headers), by SeriesNumber; a one-line error
    when there is none."""
    headers = read_headers(folder)
    if not headers:
        raise PreprocessingError(f"{folder} holds no NIfTI images and no DICOM series")
    found = [(describe(uid, entries), entries) for uid, entries in headers.items()]
    return sorted(found, key=lambda item: (item[0].number if item[0].number is not None else -1,
                                           item[0].description, item[0].uid))


def same_grid(a: DicomSeries, b: DicomSeries) -> bool:
    rows, columns, orientation, spacing, positions = a.grid
    other = b.grid
    return ((rows, columns) == other[:2] and positions.shape == other[4].shape
            and np.allclose(orientation, other[2], atol=1e-4) and np.allclose(spacing, other[3], rtol=1e-4)
            and np.allclose(positions, other[4], atol=1e-2))


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------
def matching_series(study: list[DicomSeries], name: str) -> list[DicomSeries]:
    """The series whose description contains `name` (ignoring case); an exact match wins over the others."""
    wanted = name.strip().lower()
    found = [series for series in study if wanted in series.description.strip().lower()]
    exact = [series for series in found if series.description.strip().lower() == wanted]
    return exact or found


def dicom_cases(folder: Path, n_channels: int, channel_names: Sequence[str] = ()) -> list[CaseFiles]:
    """The cases of a folder of DICOM series (module docstring): one series per case, or with `channel_names` one
    study per case with a series per channel. Only the series of the cases are checked (`check_series`): a
    localizer that no channel name matches does not stop the run. Cases are sorted by id.

    Raises:
        PreprocessingError: no series; a bad series (`check_series`); a channel name with no or several series in
            a study, or channels on different grids; as many names as channels.
    """
    found = find_series(folder)
    headers = {series.uid: entries for series, entries in found}

    def checked(series: DicomSeries) -> DicomSeries:
        return check_series(series.uid, headers[series.uid], folder)

    groups: list[tuple[str, list[DicomSeries]]] = []  # (fallback name, one series per channel)
    if not channel_names:
        if n_channels != 1:
            raise PreprocessingError(f"{folder}: the task has {n_channels} channels; name the series of each with "
                                     f"--dicom_channels (their SeriesDescription)")
        groups = [(f"{series.number if series.number is not None else ''}_{series.description}", [checked(series)])
                  for series, _ in found]
    else:
        if len(channel_names) != n_channels:
            raise PreprocessingError(f"--dicom_channels names {len(channel_names)} series but the task has "
                                     f"{n_channels} channel(s)")
        studies: dict[str, list[DicomSeries]] = {}
        for series, _ in found:
            studies.setdefault(series.study_uid, []).append(series)
        for study_uid, study in sorted(studies.items()):
            channels = []
            for name in channel_names:
                matches = matching_series(study, name)
                if len(matches) != 1:
                    problem = (f"no series matches channel '{name}' (descriptions: "
                               f"{', '.join(repr(s.description) for s in study)})" if not matches else
                               f"channel '{name}' matches {len(matches)} series "
                               f"({', '.join(repr(s.description) for s in matches)}); give an exact description")
                    raise PreprocessingError(f"{folder}: study {study_uid}: {problem}")
                channels.append(checked(matches[0]))
            for series in channels[1:]:
                if not same_grid(series, channels[0]):
                    raise PreprocessingError(f"{folder}: study {study_uid}: {series.name()} does not share the grid "
                                             f"of {channels[0].name()}; the channels of a case must share one grid")
            groups.append((f"{study[0].patient_id}_{study[0].study_id}", channels))
    return _named_cases(folder, groups)


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name).strip("._")


def _named_cases(folder: Path, groups: list[tuple[str, list[DicomSeries]]]) -> list[CaseFiles]:
    """CaseFiles with the ids of the module docstring."""
    root = folder.resolve()
    parents = []
    for _, channels in groups:
        files = [Path(f) for series in channels for f in series.files]
        parents.append(Path(*_common_parts([f.parent.parts for f in files])))
    names = []
    for index, (fallback, _) in enumerate(groups):
        parent = parents[index]
        own = parent != root and not any(other == parent or other.is_relative_to(parent) or
                                         parent.is_relative_to(other)
                                         for j, other in enumerate(parents) if j != index)
        names.append(_safe("_".join(parent.relative_to(root).parts)) if own else (_safe(fallback) or "series"))
    cases = []
    for name, (_, channels) in zip(names, groups):
        if names.count(name) > 1:
            uid = channels[0].uid if len(channels) == 1 else channels[0].study_uid
            name = f"{name}_{hashlib.sha1(uid.encode()).hexdigest()[:8]}"
        image = channels[0].uid if len(channels) == 1 else tuple(series.uid for series in channels)
        cases.append(CaseFiles(name, image, None, dicom=tuple(series.files for series in channels)))
    return sorted(cases, key=lambda case: case.case_id)


def _common_parts(all_parts: list[tuple[str, ...]]) -> tuple[str, ...]:
    common = all_parts[0]
    for parts in all_parts[1:]:
        length = 0
        while length < min(len(common), len(parts)) and common[length] == parts[length]:
            length += 1
        common = common[:length]
    return common


# ----------------------------------------------------------------------------------------------
# Reading pixels
# ----------------------------------------------------------------------------------------------
def read_series(files: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """One series' files, in slice order, as (X, Y, Z) float32 voxels (rescale slope and intercept applied) and
    the (4, 4) RAS affine a NIfTI of the series would have."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    reader.SetOutputPixelType(sitk.sitkFloat32)
    image = reader.Execute()
    lps = np.eye(4)
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps[:3, :3] = direction * np.array(image.GetSpacing(), dtype=np.float64)
    lps[:3, 3] = image.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0), affine


def read_dicom_case(case: CaseFiles) -> tuple[nib.Nifti1Image, np.ndarray]:
    """The case's series as a NIfTI image and its voxels, (X, Y, Z) or (X, Y, Z, C) with channels last."""
    volumes, affine = [], None
    for files in case.dicom:
        try:
            data, channel_affine = read_series(files)
        except RuntimeError as error:  # SimpleITK reports unreadable pixel data so
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            raise PreprocessingError(f"{case.case_id}: cannot read the DICOM series of {Path(files[0]).parent}: "
                                     f"{reason}") from None
        if affine is not None and (data.shape != volumes[0].shape or not np.allclose(channel_affine, affine,
                                                                                      atol=1e-3)):
            raise PreprocessingError(f"{case.case_id}: the DICOM channels do not share one grid")
        affine = channel_affine if affine is None else affine
        volumes.append(data)
    data = volumes[0] if len(volumes) == 1 else np.stack(volumes, axis=-1)
    nifti = nib.Nifti1Image(data, affine)
    nifti.set_qform(affine, code=1)
    nifti.set_sform(affine, code=1)
    return nifti, data


def dicom_meta(case: CaseFiles) -> dict:
    """What a DICOM SEG of the case needs (JSON values): the files of its first channel's series in slice order,
    which the segmentation references, and the UIDs of every channel's series."""
    return {"files": list(case.dicom[0]),
            "series_instance_uids": [case.image] if isinstance(case.image, str) else list(case.image)}


def check_output_format(output_format: str, cases: Sequence[CaseFiles]) -> None:
    """DICOM SEG output needs DICOM input: a one-line error naming the first other case."""
    if output_format == "nifti":
        return
    others = [case.case_id for case in cases if case.dicom is None]
    if others:
        raise PreprocessingError(f"--output_format {output_format} writes DICOM SEG, which references DICOM "
                                 f"series, but case {others[0]} is not DICOM; use --output_format nifti")
