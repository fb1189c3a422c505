"""Scoring a folder of NIfTI predictions against a folder of NIfTI labels.

Cases are matched by file name (`<case>.nii.gz` or `<case>.nii`). Each case gets the Dice of every
class (empty in both prediction and label scores 1) and, on request, the 95th-percentile Hausdorff
distance in mm, measured with the label file's voxel spacing (header zooms). Results go to a printed
table, `PREFIX.csv` and `PREFIX.json`; in the JSON an infinite HD95 (a class present in only one of
prediction and label) is written as null, in the CSV and the table as `inf`.

Every problem with the inputs raises `EvaluationError` with a one-line message naming the case or
file, before anything is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nnunet.metrics import HD95_MODES, class_counts, dice_from_counts, hd95
from utils.errors import UserError
from utils.nifti import NiftiError, load_nifti

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Affines are stored as float32 in NIfTI headers; differences below these tolerances are rounding.
AFFINE_RTOL = 1e-5
AFFINE_ATOL = 1e-3  # mm
# Label values index count arrays, so an absurd value (a corrupt or intensity file) is refused early.
MAX_LABEL = 65535


class EvaluationError(UserError, ValueError):
    """A problem with the inputs of an evaluation, described in one line for the user."""


@dataclass
class LabelVolume:
    """An integer label map read from NIfTI.

    Attributes:
        data: (X, Y, Z) label map as stored in the file, uint8 or int32.
        affine: (4, 4) voxel-to-world matrix, mm.
        spacing: voxel size along each array axis, mm.
    """

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, ...]


@dataclass
class CaseScore:
    """Voxel counts and distances of one case, indexed by label value.

    Attributes:
        case_id: file name without its NIfTI suffix.
        intersection: (L,) voxels labelled c in both prediction and label, for c in 0 .. L-1.
        pred_count: (L,) voxels labelled c in the prediction.
        label_count: (L,) voxels labelled c in the label.
        hd95: HD95 in mm of every non-zero value present in the prediction or the label.
    """

    case_id: str
    intersection: np.ndarray
    pred_count: np.ndarray
    label_count: np.ndarray
    hd95: dict[int, float] = field(default_factory=dict)

    def dice(self, classes: list[int]) -> list[float]:
        """Dice of each class; a class beyond the counted values is absent from both maps and scores 1."""
        size = max([len(self.intersection), *(c + 1 for c in classes)])
        counts = [
            torch.from_numpy(np.pad(a, (0, size - len(a))))
            for a in (self.intersection, self.pred_count, self.label_count)
        ]
        return dice_from_counts(*counts)[classes].tolist()


def present_labels(counts: np.ndarray) -> set[int]:
    """Non-zero label values with at least one voxel, from (L,) voxel counts indexed by value."""
    return {int(v) for v in np.flatnonzero(counts) if v != 0}


def find_cases(folder: str | os.PathLike, role: str) -> dict[str, Path]:
    """NIfTI files of a folder by case id.

    Args:
        folder: folder holding `<case>.nii.gz` or `<case>.nii` files (hidden files are ignored).
        role: "prediction" or "label", for messages.

    Returns:
        {case_id: path}, sorted by case id.

    Raises:
        EvaluationError: if the folder does not exist or holds a case twice (.nii and .nii.gz).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"{role} folder {folder} does not exist")
    cases: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = next((s for s in NIFTI_SUFFIXES if path.name.endswith(s)), None)
        if suffix is None or path.name.startswith(".") or not path.is_file():
            continue
        case_id = path.name[: -len(suffix)]
        if case_id in cases:
            raise EvaluationError(
                f"{role} folder {folder} holds case {case_id} twice: {cases[case_id].name} and {path.name}"
            )
        cases[case_id] = path
    return dict(sorted(cases.items()))


def read_dataset_labels(path: str | os.PathLike) -> dict[int, str]:
    """Class names of a dataset from its dataset.json.

    Args:
        path: dataset.json in MSD form (`"labels": {"0": "background", "1": "liver"}`) or nnU-Net v2 form
            (`"labels": {"background": 0, "liver": 1}`).

    Returns:
        {label value: name}, background included.

    Raises:
        EvaluationError: if the file cannot be read or has no usable "labels" entry.
    """
    try:
        with open(path, encoding="utf-8") as file:
            labels = json.load(file).get("labels")
    except (OSError, ValueError, AttributeError) as error:
        raise EvaluationError(f"cannot read the labels of {path}: {_one_line(error)}") from error
    if not isinstance(labels, dict) or not labels:
        raise EvaluationError(f'{path} has no "labels" mapping of label values to class names')
    try:
        if all(isinstance(value, int) for value in labels.values()):
            names = {int(value): str(name) for name, value in labels.items()}
        else:
            names = {int(value): str(name) for value, name in labels.items()}
    except (TypeError, ValueError) as error:
        raise EvaluationError(
            f'{path}: "labels" must map label values to names (region labels are not supported)'
        ) from error
    if any(value < 0 or value > MAX_LABEL for value in names):
        raise EvaluationError(f"{path}: label values must lie in [0, {MAX_LABEL}]")
    return dict(sorted(names.items()))


def read_label_volume(path: Path, role: str) -> LabelVolume:
    """Read a NIfTI label map and check that it holds whole, non-negative numbers.

    Args:
        path: the NIfTI file.
        role: "prediction" or "label", for messages.

    Returns:
        The label map, cast to uint8 (values up to 255) or int32.

    Raises:
        EvaluationError: if the file cannot be read or does not hold integer labels.
    """
    try:
        image = load_nifti(path)
    except NiftiError as error:
        raise EvaluationError(f"cannot read {role} {path}: {error.reason}") from None
    try:
        data = np.asanyarray(image.dataobj)
        affine = np.asarray(image.affine, dtype=np.float64)
        spacing = tuple(float(z) for z in image.header.get_zooms()[: data.ndim])
    except Exception as error:  # nibabel raises many types (ImageFileError, EOFError, zlib.error) for damaged files
        raise EvaluationError(f"cannot read {role} {path}: {_one_line(error)}") from error
    if data.dtype.kind == "f":
        invalid = ~np.isfinite(data)
        invalid |= np.floor(np.where(invalid, 0, data)) != np.where(invalid, 0, data)
        if invalid.any():
            example = data.flat[int(np.flatnonzero(invalid)[0])]
            raise EvaluationError(
                f"{role} {path} holds non-integer values such as {example:g}; labels must be whole numbers"
            )
    elif data.dtype.kind not in "biu":
        raise EvaluationError(f"{role} {path} has data type {data.dtype}, not integer labels")
    if data.size:
        low, high = data.min(), data.max()
        if low < 0:
            raise EvaluationError(f"{role} {path} holds the negative label {low:g}")
        if high > MAX_LABEL:
            raise EvaluationError(f"{role} {path} holds the label {high:g}; labels above {MAX_LABEL} are not supported")
        dtype = np.uint8 if high <= 255 else np.int32
    else:
        dtype = np.uint8
    return LabelVolume(np.ascontiguousarray(data, dtype=dtype), affine, spacing)


def score_case(
    case_id: str,
    pred_path: Path,
    label_path: Path,
    with_hd95: bool = False,
    classes: list[int] | None = None,
    hd95_mode: str = "max",
) -> CaseScore:
    """Counts (and HD95) of one case.

    Args:
        case_id: the case name, for messages.
        pred_path: predicted label map, NIfTI.
        label_path: reference label map, NIfTI, same shape and affine.
        with_hd95: also compute the HD95 of every class present in either map.
        classes: the dataset's classes; a label value outside them is an error. None accepts any value.
        hd95_mode: how HD95 combines its two directions, "max" or "pooled" (`nnunet.metrics.HD95_MODES`).

    Returns:
        The case's counts and distances.

    Raises:
        EvaluationError: on an unreadable file, a shape or affine mismatch, or labels outside `classes`.
    """
    label = read_label_volume(label_path, "label")
    pred = read_label_volume(pred_path, "prediction")
    if pred.data.shape != label.data.shape:
        raise EvaluationError(
            f"{case_id}: prediction shape {pred.data.shape} does not match label shape {label.data.shape}"
        )
    if not np.allclose(pred.affine, label.affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
        difference = float(np.abs(pred.affine - label.affine).max())
        raise EvaluationError(
            f"{case_id}: prediction affine differs from label affine (largest difference {difference:.4g})"
        )
    n_values = int(max(pred.data.max(initial=0), label.data.max(initial=0))) + 1
    counts = class_counts(torch.from_numpy(pred.data), torch.from_numpy(label.data), n_values)
    score = CaseScore(case_id, *(c.numpy() for c in counts))
    present = present_labels(score.pred_count) | present_labels(score.label_count)
    if classes is not None:
        checks = (("label", label_path, score.label_count), ("prediction", pred_path, score.pred_count))
        for role, path, found in checks:
            unknown = sorted(present_labels(found) - set(classes))
            if unknown:
                raise EvaluationError(
                    f"{case_id}: {role} {path} holds label {join_labels(unknown)}, which the dataset's classes "
                    f"({join_labels(classes)}) do not include"
                )
    if with_hd95:
        score.hd95 = {c: hd95(pred.data == c, label.data == c, label.spacing, hd95_mode) for c in sorted(present)}
    return score


def evaluate_folder(
    preds_dir: str | os.PathLike,
    labels_dir: str | os.PathLike,
    hd95: bool = False,
    class_names: Mapping[int, str] | None = None,
    predicted_only: bool = False,
    hd95_mode: str = "max",
) -> dict[str, Any]:
    """Per-case and per-class Dice (and HD95) of a folder of predictions.

    Args:
        preds_dir: folder of predicted `<case>.nii.gz` / `<case>.nii` label maps.
        labels_dir: folder of reference label maps with the same case names.
        hd95: also compute the 95th-percentile Hausdorff distance in mm.
        class_names: {label value: name} of the dataset (background 0 may be included). The classes are
            then its non-zero values and any other value in a file is an error. Default: the classes are
            the non-zero values found in the label files, named by their value.
        predicted_only: score only the labels that have a prediction (e.g. one validation fold of a
            labelsTr folder) instead of requiring a prediction for every label.
        hd95_mode: "max" (MONAI, the default) or "pooled" (medpy, nnU-Net v1); see `nnunet.metrics.HD95_MODES`.

    Returns:
        A JSON-ready dict (keys of classes are strings of the label values)::

            {"preds": str, "labels": str, "classes": [int], "class_names": {"1": name},
             "cases": [{"case_id": str, "dice": {"1": float}, "hd95": {"1": float}}],
             "mean": {"dice": {"1": float}, "hd95": {"1": float}},
             "mean_dice": float, "mean_hd95": float, "hd95_mode": str, "hd95_definition": str,
             "prediction_only_labels": [int]}

        `mean` holds each class's mean over cases, `mean_dice` the mean of those. HD95 entries are present
        only with `hd95=True` and may be `inf`. `prediction_only_labels` lists values that appear in
        predictions but in no label file (default classes only); they have no column.

    Raises:
        EvaluationError: on any problem with the inputs (see `score_case`), on missing or extra
            predictions, or when there is nothing to evaluate.
    """
    preds = find_cases(preds_dir, "prediction")
    labels = find_cases(labels_dir, "label")
    if not labels:
        raise EvaluationError(f"no cases to evaluate: label folder {labels_dir} holds no .nii.gz or .nii files")
    if predicted_only:
        labels = {case_id: path for case_id, path in labels.items() if case_id in preds}
        if not labels:
            raise EvaluationError(f"none of the predictions in {preds_dir} has a label in {labels_dir}")
    missing = [case_id for case_id in labels if case_id not in preds]
    if missing:
        raise EvaluationError(f"no prediction in {preds_dir} for {_cases(missing)} of {labels_dir}; add "
                              f"--predicted_only to score only the labels that have a prediction")
    extra = [case_id for case_id in preds if case_id not in labels]
    if extra:
        raise EvaluationError(f"predictions in {preds_dir} without a label in {labels_dir}: {_cases(extra)}")

    dataset_classes = None if class_names is None else sorted(c for c in class_names if c != 0)
    scores = [score_case(case_id, preds[case_id], labels[case_id], hd95, dataset_classes, hd95_mode)
              for case_id in labels]

    label_values = set().union(*(present_labels(score.label_count) for score in scores))
    pred_values = set().union(*(present_labels(score.pred_count) for score in scores))
    classes = dataset_classes if dataset_classes is not None else sorted(label_values)
    if not classes:
        raise EvaluationError(
            f"no classes to evaluate: the labels in {labels_dir} hold only background (0); "
            "name the classes with a dataset.json"
        )
    names = {str(c): (class_names or {}).get(c, str(c)) for c in classes}
    keys = [str(c) for c in classes]

    cases = []
    for score in scores:
        case: dict[str, Any] = {"case_id": score.case_id, "dice": dict(zip(keys, score.dice(classes)))}
        if hd95:
            # A class absent from both maps has nothing to miss: distance 0, as its Dice is 1.
            case["hd95"] = {str(c): score.hd95.get(c, 0.0) for c in classes}
        cases.append(case)

    metrics = ["dice", "hd95"] if hd95 else ["dice"]
    mean = {metric: {key: float(np.mean([case[metric][key] for case in cases])) for key in keys} for metric in metrics}
    results: dict[str, Any] = {
        "preds": str(preds_dir),
        "labels": str(labels_dir),
        "classes": classes,
        "class_names": names,
        "cases": cases,
        "mean": mean,
    }
    for metric in metrics:
        results[f"mean_{metric}"] = float(np.mean(list(mean[metric].values())))
    if hd95:
        results["hd95_mode"] = hd95_mode
        results["hd95_definition"] = HD95_MODES[hd95_mode]
    results["prediction_only_labels"] = sorted(pred_values - set(classes))
    return results


def join_labels(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


def _cases(case_ids: list[str], shown: int = 5) -> str:
    listed = ", ".join(case_ids[:shown])
    more = len(case_ids) - shown
    return f"{len(case_ids)} case{'s' if len(case_ids) > 1 else ''} ({listed}{f' and {more} more' if more > 0 else ''})"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
