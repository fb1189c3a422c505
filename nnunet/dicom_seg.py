"""Predicted labels of a DICOM case as a DICOM Segmentation (SEG) that references the source series.

`--output_format dicom-seg` (or `both`) writes `<results>/predictions/<case>.dcm`: a BINARY segmentation with one
segment per foreground class of the task (segment number = label value, segment label = the class name of the
task's `labels`), algorithm type AUTOMATIC with the algorithm named, built by highdicom from the source series'
headers (patient, study, frame of reference, the referenced instances). Frame i of a segment lies on slice i of
the source series, in the slice order `data_preprocessing.dicom` read it in; slices where a segment is empty are
left out (when every slice is empty, all are kept: a SEG holds at least one frame). Each segment's category and
type are the generic SNOMED CT "Tissue": the task's labels name the classes, not their codes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from utils.io import atomic_open

ALGORITHM = "nnU-Net (PyTorch Lightning, DALI)"
ALGORITHM_VERSION = "1"
SERIES_NUMBER = 300  # of the segmentation series; viewers sort it after the usual acquisition series


def seg_frames(labels_xyz: np.ndarray) -> np.ndarray:
    """(X, Y, Z) labels on the source grid, NIfTI order, -> (slices, rows, columns), the frames of the source files
    in their slice order (the inverse of `data_preprocessing.dicom.read_series`'s transposition)."""
    return np.ascontiguousarray(np.asarray(labels_xyz).transpose(2, 1, 0))


def write_dicom_seg(folder: str | os.PathLike, case_id: str, labels_xyz: np.ndarray, meta: dict,
                    class_names: Sequence[str]) -> Path:
    """Write `<folder>/<case_id>.dcm`, atomically.

    Args:
        folder: output folder.
        case_id: the case; names the file.
        labels_xyz: (X, Y, Z) uint8 label values 0 .. len(class_names) on the source grid, NIfTI order.
        meta: the case's metadata with `meta["dicom"]["files"]`, the source series' files in slice order.
        class_names: the name of each foreground label value 1, 2, ...

    Returns:
        The path written.
    """
    if not meta.get("dicom"):
        raise ValueError(f"{case_id}: a DICOM SEG references a DICOM series, and this case was not read from one")
    sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in meta["dicom"]["files"]]
    frames = seg_frames(labels_xyz).astype(np.uint8)
    expected = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    if frames.shape != expected:
        raise ValueError(f"{case_id}: labels of shape {frames.shape} (slices, rows, columns) do not fit the source "
                         f"series {expected}")
    algorithm = hd.AlgorithmIdentificationSequence(name=ALGORITHM, family=codes.cid7162.ArtificialIntelligence,
                                                   version=ALGORITHM_VERSION)
    segments = [hd.seg.SegmentDescription(
        segment_number=value, segment_label=str(name)[:64], segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for value, name in enumerate(class_names, start=1)]
    segmentation = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="nnU-Net Lightning",
        manufacturer_model_name=ALGORITHM, software_versions=ALGORITHM_VERSION, device_serial_number="none",
        series_description=f"Segmentation {case_id}"[:64])
    path = Path(folder) / f"{case_id}.dcm"
    with atomic_open(path, "wb") as handle:
        segmentation.save_as(handle, enforce_file_format=True)
    return path
