"""Raw dataset layouts: which files make up the cases of a task, in any of the supported layouts.

Every layout is read into one `RawTask`: the channels, the labels (value -> name), optional
regions, and the training and test cases as `CaseFiles` relative to one folder. The rest of the
preprocessing sees only that.

Layouts (`--task X --data D`):

* **MSD** (Medical Segmentation Decathlon, v1): `D/TaskNN_Name/dataset.json` with `modality`,
  `labels` ({"0": "background", ...}), `training` and `test` lists; NIfTI images 3D or 4D with
  channels last. Output key `NN`.
* **nnU-Net v2**: `D/DatasetNNN_Name/dataset.json` with `channel_names`, `labels` (name -> value;
  a list of values makes a region), `regions_class_order` with regions, `numTraining`,
  `file_ending` (NIfTI only: `.nii.gz` or `.nii`); one file per channel `imagesTr/<case>_0000.nii.gz`,
  labels `labelsTr/<case>.nii.gz`, optional `imagesTs/`. Output key `NNN`.
* **KiTS19**: `--task kits19`, `D/case_00000/imaging.nii.gz` and `segmentation.nii.gz` (also
  found under `D/kits19/data`, `D/kits19` or `D/data`). The arrays are stored slice-first,
  (Z, Y, X), with the header's zooms in the same order. Output key `kits19`.
* **2D images**: `D/Name/images/*.png|tif` with `D/Name/masks/` (same file stems) and optional
  `test/` (`data_preprocessing.images2d` converts them once into an MSD task). Output key `Name`.

A number (`--task 5`) finds `Task05_*` (MSD) first and `Dataset005_*` (v2) only when there is no
MSD folder; a folder name (`Dataset005_Prostate`) selects that folder whatever the layout.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from data_preprocessing import configs
from utils.errors import UserError
from utils.io import load_json
from utils.task_folders import task_number

NIFTI_ENDINGS = (".nii.gz", ".nii")
CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.nii(\.gz)?$")
KITS19 = "kits19"
KITS19_CASE = re.compile(r"^case_(?P<number>\d{5})$")


class PreprocessingError(UserError):
    """Bad input data: the message names the case or file and the problem."""


@dataclass(frozen=True)
class CaseFiles:
    """Source files of one case, relative to the task folder.

    `array_order` says how the files store the volume: "xyz" is the NIfTI convention (X, Y, Z), transposed
    to (D, H, W) = (Z, Y, X) on reading; "zyx" marks files whose arrays are already slice-first (KiTS19).
    A DICOM case (`data_preprocessing.dicom`) has `dicom`: per channel, its series' files (absolute paths) in
    slice order; `image` then holds the series UIDs.
    """

    case_id: str
    image: str | tuple[str, ...]  # one file (3D, or 4D with channels last), or one 3D file per channel
    label: str | None
    array_order: str = "xyz"
    dicom: tuple[tuple[str, ...], ...] | None = None


@dataclass
class RawTask:
    """A raw task in any supported layout, described the same way.

    Attributes:
        root: the folder the case files are relative to.
        name: the task's name (`task_name` in config.json).
        key: the prefix of the output folder, `RESULTS/<key>_<dim>d`.
        layout: "msd", "v2", "kits19" or "images2d".
        dim: the dimension the task is preprocessed for (2 or 3).
        modalities: channel number -> name, e.g. {"0": "CT"}.
        labels: label value -> name, background "0" included, values 0 .. K-1.
        regions: nested regions [{"name", "labels": [values]}], or None.
        training: the labelled cases.
        test: the unlabelled test cases.
        recipe: fixed plan values that replace planning from the data (KiTS19), or None.
        evaluation_cases: the fixed validation cases of a reference split (KiTS19), or None.
        zscore_nonzero: z-score MRI-like channels over their non-zero voxels (True) or over all voxels.
        png_masks: for tasks converted from PNG/TIFF: {"scale": s}, masks = labels * s; else None.
    """

    root: Path
    name: str
    key: str
    layout: str
    dim: int
    modalities: dict[str, str]
    labels: dict[str, str]
    regions: list[dict] | None
    training: list[CaseFiles]
    test: list[CaseFiles] = field(default_factory=list)
    recipe: dict | None = None
    evaluation_cases: list[str] | None = None
    zscore_nonzero: bool = True
    png_masks: dict | None = None

    def cases(self, exec_mode: str) -> list[CaseFiles]:
        """The cases of `exec_mode`: training (images and labels), val (training images only) or test."""
        if exec_mode == "test":
            return list(self.test)
        if exec_mode == "val":
            return [replace(case, label=None) for case in self.training]
        return list(self.training)


# --------------------------------------------------------------------------------------------
# Finding the task
# --------------------------------------------------------------------------------------------
def locate_task(data: str | os.PathLike, task: str) -> Path:
    """The raw task folder for `--task`: a folder name, or a number for `TaskNN_*` (MSD, first) or `DatasetNNN_*`."""
    data = Path(data)
    if (data / task).is_dir():
        return data / task
    if not task.isdigit():
        number = task_number(task)
        if not number.isdigit():
            raise PreprocessingError(f"no folder {task} in {data}; download it or pass --data")
        task = number
    value = int(task)
    msd = sorted(p for p in data.glob(f"Task{value:02d}_*") if p.is_dir())
    v2 = sorted(p for p in data.glob(f"Dataset{value:03d}_*") if p.is_dir())
    for matches in (msd, v2):
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise PreprocessingError(
                f"several folders match task '{task}' in {data}: {', '.join(p.name for p in matches)}")
    raise PreprocessingError(f"no folder Task{value:02d}_* or Dataset{value:03d}_* for task '{task}' in {data}; "
                             f"download it or pass --data")


def read_json_object(path: Path) -> dict:
    try:
        dataset = load_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PreprocessingError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(dataset, dict):
        raise PreprocessingError(f"{path} must hold a JSON object")
    return dataset


def _check_labels(labels: Mapping[str, str], where: str) -> dict[str, str]:
    """Labels sorted by value; values must be 0 .. K-1, each class one output channel of the network."""
    values = sorted(int(k) for k in labels)
    if values != list(range(len(values))):
        raise PreprocessingError(f"{where}: label values must be consecutive from 0 (0, 1, 2, ...), got {values}")
    return {str(v): str(labels[str(v)]) for v in values}


# --------------------------------------------------------------------------------------------
# MSD (v1)
# --------------------------------------------------------------------------------------------
def load_dataset_json(task_dir: Path) -> dict:
    """Read and check an MSD dataset.json."""
    path = task_dir / "dataset.json"
    if not path.is_file():
        raise PreprocessingError(f"{path} is missing: an MSD task folder needs a dataset.json")
    return check_msd_dataset(read_json_object(path), path)


def check_msd_dataset(dataset: dict, path: Path) -> dict:
    for key in ("modality", "labels", "training"):
        if key not in dataset:
            raise PreprocessingError(f"{path} has no '{key}' entry")
    if not isinstance(dataset["modality"], dict) or not dataset["modality"]:
        raise PreprocessingError(f"{path}: 'modality' must map channel numbers to names, e.g. {{\"0\": \"CT\"}}")
    channels = [str(c) for c in range(len(dataset["modality"]))]
    if sorted(dataset["modality"]) != sorted(channels):
        raise PreprocessingError(f"{path}: the keys of 'modality' must be the channel numbers "
                                 f"{', '.join(channels)}, got {', '.join(map(repr, dataset['modality']))}")
    try:
        labels = {int(k): v for k, v in dataset["labels"].items()}
    except (AttributeError, ValueError):
        raise PreprocessingError(
            f"{path}: 'labels' must map label values to names, e.g. {{\"0\": \"background\"}}") from None
    if 0 not in labels:
        raise PreprocessingError(f"{path}: 'labels' must declare the background value 0")
    if not isinstance(dataset["training"], list):
        raise PreprocessingError(f"{path}: 'training' must be a list of {{image, label}} entries")
    for index, entry in enumerate(dataset["training"]):
        if not (isinstance(entry, dict) and _is_file_name(entry.get("image")) and _is_file_name(entry.get("label"))):
            raise PreprocessingError(f"{path}: training entry {index} must be {{\"image\": file, \"label\": file}}, "
                                     f"got {_short(entry)}")
    if not isinstance(dataset.get("test", []), list):
        raise PreprocessingError(f"{path}: 'test' must be a list of image files")
    for index, entry in enumerate(dataset.get("test", [])):
        if not (_is_file_name(entry) or (isinstance(entry, dict) and _is_file_name(entry.get("image")))):
            raise PreprocessingError(f"{path}: test entry {index} must be an image file or {{\"image\": file}}, "
                                     f"got {_short(entry)}")
    return dataset


def _is_file_name(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _short(value, limit: int = 80) -> str:
    """A JSON value as one line of at most about `limit` characters, for error messages."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def case_id_of(image_path: str) -> str:
    name = Path(image_path).name
    for suffix in NIFTI_ENDINGS:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _relative(path: str) -> str:
    return path[2:] if path.startswith("./") else path


def list_cases(dataset: dict, exec_mode: str) -> list[CaseFiles]:
    """The cases of an MSD dataset.json for `exec_mode` (training: images with labels; val: training images
    without labels; test: the test images)."""
    cases = []
    if exec_mode == "test":
        for entry in dataset.get("test", []):
            image = entry["image"] if isinstance(entry, dict) else entry
            cases.append(CaseFiles(case_id_of(image), _relative(image), None))
        return cases
    for entry in dataset["training"]:  # entries checked by check_msd_dataset
        label = _relative(entry["label"]) if exec_mode == "training" else None
        cases.append(CaseFiles(case_id_of(entry["image"]), _relative(entry["image"]), label))
    ids = [case.case_id for case in cases]
    duplicates = sorted({case_id for case_id in ids if ids.count(case_id) > 1})
    if duplicates:
        raise PreprocessingError(f"dataset.json lists these cases more than once: {', '.join(duplicates)}")
    return cases


def dataset_regions(dataset: dict, label_values: Sequence[int]) -> list[dict] | None:
    """Hierarchical regions declared in an MSD dataset.json as {"name": [label values], ...}."""
    declared = dataset.get("regions")
    if not declared:
        return None
    if not isinstance(declared, dict):
        raise PreprocessingError("dataset.json 'regions' must map region names to lists of label values")
    return [_region(name, values, label_values) for name, values in declared.items()]


def _region(name: str, values, label_values: Sequence[int]) -> dict:
    values = [values] if isinstance(values, int) else list(values)
    unknown = sorted(set(values) - set(label_values))
    if unknown or not values or not all(isinstance(v, int) for v in values):
        raise PreprocessingError(f"dataset.json region '{name}' uses label values {unknown or values} "
                                 f"that are not declared in 'labels'")
    return {"name": name, "labels": values}


def read_msd(folder: Path, dataset: dict | None = None, dim: int | None = None) -> RawTask:
    """An MSD task folder as a RawTask."""
    path = folder / "dataset.json"
    dataset = check_msd_dataset(dataset if dataset is not None else read_json_object(path), path)
    labels = _check_labels({str(int(k)): v for k, v in dataset["labels"].items()}, str(path))
    modalities = {str(c): str(dataset["modality"][str(c)]) for c in range(len(dataset["modality"]))}
    return RawTask(
        root=folder, name=folder.name, key=task_number(folder.name), layout="msd", dim=dim or 3,
        modalities=modalities, labels=labels, regions=dataset_regions(dataset, [int(k) for k in labels]),
        training=list_cases(dataset, "training"), test=list_cases(dataset, "test"))


# --------------------------------------------------------------------------------------------
# nnU-Net v2
# --------------------------------------------------------------------------------------------
def image_cases(folder: Path, n_channels: int, per_channel: bool | None = None,
                endings: Sequence[str] = NIFTI_ENDINGS) -> list[CaseFiles]:
    """The images of a folder, as cases.

    Args:
        folder: a folder of NIfTI images.
        n_channels: the task's number of channels.
        per_channel: True: every file is one channel, `<case>_0000.nii.gz`, `<case>_0001.nii.gz`, ... (the
            nnU-Net v2 naming); False: one `<case>.nii.gz` per case (3D, or 4D with channels last); None: the
            v2 naming when the task has several channels and every file follows it, else one file per case.
        endings: the file endings that count as images.
    """
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(tuple(endings)) and
                   not p.name.startswith("."))
    if not names:
        raise PreprocessingError(f"{folder} holds no {endings[0]} images")
    matches = [CHANNEL_FILE.match(name) for name in names]
    if per_channel is None:
        per_channel = n_channels > 1 and all(matches)
    if not per_channel:
        return [CaseFiles(case_id_of(name), name, None) for name in names]
    for name, match in zip(names, matches):
        if not match:
            raise PreprocessingError(f"{folder / name}: expected <case>_0000{endings[0]} (one file per channel)")
    grouped: dict[str, dict[int, str]] = {}
    for match in matches:
        grouped.setdefault(match["case"], {})[int(match["channel"])] = match.string
    cases = []
    for case_id, channels in grouped.items():
        if sorted(channels) != list(range(n_channels)):
            raise PreprocessingError(f"{case_id}: expected channel files _0000 to _{n_channels - 1:04d} in "
                                     f"{folder}, found {sorted(channels)}")
        cases.append(CaseFiles(case_id, tuple(channels[c] for c in range(n_channels)), None))
    return cases


def v2_labels(labels: Mapping, regions_class_order, path: Path) -> tuple[dict[str, str], list[dict] | None]:
    """nnU-Net v2 `labels` (name -> value, or name -> [values] for regions) as (value -> name, regions).

    With regions, every foreground entry is a region; the label values are those the regions are made of, and
    value `regions_class_order[i]` takes the name of region i.
    """
    if not isinstance(labels, Mapping) or not labels:
        raise PreprocessingError(f"{path}: 'labels' must map class names to label values, e.g. {{\"background\": 0}}")
    for name, value in labels.items():
        valid = isinstance(value, int) or (isinstance(value, list) and value and all(isinstance(v, int) for v in value))
        if not valid or isinstance(value, bool):
            raise PreprocessingError(f"{path}: label '{name}' must be a label value or a list of them, got {value!r}")
    background = [name for name, value in labels.items() if value == 0]
    if not background:
        raise PreprocessingError(f"{path}: 'labels' must declare the background value 0, e.g. \"background\": 0")
    if not any(isinstance(value, list) for value in labels.values()):
        names = {str(value): name for name, value in labels.items()}
        if len(names) != len(labels):
            raise PreprocessingError(f"{path}: 'labels' gives the same value to several classes")
        return _check_labels(names, str(path)), None
    regions = [{"name": name, "labels": value if isinstance(value, list) else [value]}
               for name, value in labels.items() if value != 0]
    if not isinstance(regions_class_order, list) or len(regions_class_order) != len(regions):
        raise PreprocessingError(f"{path}: region labels need 'regions_class_order', one label value per region "
                                 f"({len(regions)} regions)")
    values = sorted({0, *(v for region in regions for v in region["labels"])})
    names = {str(v): f"label {v}" for v in values}
    names["0"] = background[0]
    for region, value in zip(regions, regions_class_order):
        if str(value) in names and value != 0:
            names[str(value)] = region["name"]
    return _check_labels(names, str(path)), regions


def read_v2(folder: Path, dataset: dict, dim: int | None = None) -> RawTask:
    """An nnU-Net v2 raw dataset folder as a RawTask."""
    path = folder / "dataset.json"
    for key in ("channel_names", "labels", "file_ending"):
        if key not in dataset:
            raise PreprocessingError(f"{path} has no '{key}' entry (nnU-Net v2 layout)")
    if "dataset" in dataset:
        raise PreprocessingError(f"{path}: the 'dataset' entry (explicit file lists) is not supported; "
                                 f"use imagesTr/<case>_0000{dataset['file_ending']} and labelsTr/<case>"
                                 f"{dataset['file_ending']}")
    ending = dataset["file_ending"]
    if ending not in NIFTI_ENDINGS:
        raise PreprocessingError(f"{path}: file_ending '{ending}' is not supported: nnU-Net v2 tasks must be NIfTI "
                                 f"(.nii.gz or .nii); put PNG/TIFF images in images/ and masks/ folders instead")
    channels = dataset["channel_names"]
    if not isinstance(channels, dict) or not channels:
        raise PreprocessingError(f"{path}: 'channel_names' must map channel numbers to names, e.g. {{\"0\": \"CT\"}}")
    modalities = {str(k): str(v) for k, v in sorted(channels.items(), key=lambda item: int(item[0]))}
    labels, regions = v2_labels(dataset["labels"], dataset.get("regions_class_order"), path)
    images = folder / "imagesTr"
    if not images.is_dir():
        raise PreprocessingError(f"{images} is missing: an nnU-Net v2 dataset keeps its training images there")
    training = []
    for case in image_cases(images, len(modalities), per_channel=True, endings=(ending,)):
        label = folder / "labelsTr" / f"{case.case_id}{ending}"
        if not label.is_file():
            raise PreprocessingError(f"{case.case_id}: label {label} does not exist")
        training.append(CaseFiles(case.case_id, tuple(f"imagesTr/{name}" for name in case.image),
                                  f"labelsTr/{label.name}"))
    known = {case.case_id for case in training}
    orphans = sorted(p.name for p in (folder / "labelsTr").glob(f"*{ending}")
                     if p.name[: -len(ending)] not in known and not p.name.startswith("."))
    if orphans:
        raise PreprocessingError(f"{folder / 'labelsTr'}: label {orphans[0]} has no image in imagesTr")
    declared = dataset.get("numTraining")
    if declared is not None and declared != len(training):
        raise PreprocessingError(f"{path}: numTraining is {declared} but imagesTr holds {len(training)} cases")
    test = []
    if (folder / "imagesTs").is_dir() and any((folder / "imagesTs").glob(f"*{ending}")):
        test = [CaseFiles(case.case_id, tuple(f"imagesTs/{name}" for name in case.image), None)
                for case in image_cases(folder / "imagesTs", len(modalities), per_channel=True, endings=(ending,))]
    match = re.match(r"^Dataset(\d{3})_", folder.name)
    return RawTask(root=folder, name=folder.name, key=match[1] if match else folder.name, layout="v2",
                   dim=dim or 3, modalities=modalities, labels=labels, regions=regions, training=training, test=test)


# --------------------------------------------------------------------------------------------
# KiTS19
# --------------------------------------------------------------------------------------------
def kits19_folder(data: Path) -> Path:
    """The folder that holds the KiTS19 case folders: DATA itself, DATA/kits19/data, DATA/kits19 or DATA/data."""
    for folder in (data, data / "kits19" / "data", data / "kits19", data / "data"):
        if folder.is_dir() and any(KITS19_CASE.match(p.name) and p.is_dir() for p in folder.iterdir()):
            return folder
    raise PreprocessingError(f"no KiTS19 case folders (case_00000/imaging.nii.gz) in {data}, {data / 'kits19'} "
                             f"or {data / 'kits19' / 'data'}")


def read_kits19(data: str | os.PathLike, recipe_name: str = configs.KITS19_DEFAULT_RECIPE,
                dim: int | None = None) -> RawTask:
    """The KiTS19 layout with the MLPerf reference rules of `recipe_name` (see configs.KITS19_RECIPES).

    Training cases are the case folders with a segmentation below the reference's limit (case_00209), minus the
    recipe's excluded cases; folders with an image only are test cases. The files store (Z, Y, X) arrays.
    """
    if recipe_name not in configs.KITS19_RECIPES:
        raise PreprocessingError(f"unknown KiTS19 recipe '{recipe_name}'; choose from "
                                 f"{', '.join(configs.KITS19_RECIPES)}")
    if dim not in (None, 3):
        raise PreprocessingError("KiTS19 follows the MLPerf 3D recipe: preprocess it with --dim 3")
    recipe = configs.KITS19_RECIPES[recipe_name]
    folder = kits19_folder(Path(data))
    training, test = [], []
    for case_dir in sorted(p for p in folder.iterdir() if p.is_dir() and KITS19_CASE.match(p.name)):
        number = int(KITS19_CASE.match(case_dir.name)["number"])
        image = f"{case_dir.name}/{configs.KITS19_IMAGE}"
        if not (case_dir / configs.KITS19_IMAGE).is_file():
            raise PreprocessingError(f"{case_dir.name}: {case_dir / configs.KITS19_IMAGE} does not exist")
        if (case_dir / configs.KITS19_LABEL).is_file() and number < configs.KITS19_LABELLED_CASES:
            if number not in recipe["excluded"]:
                training.append(CaseFiles(case_dir.name, image, f"{case_dir.name}/{configs.KITS19_LABEL}", "zyx"))
        elif not (case_dir / configs.KITS19_LABEL).is_file():
            test.append(CaseFiles(case_dir.name, image, None, "zyx"))
    return RawTask(
        root=folder, name="KiTS19", key=KITS19, layout="kits19", dim=3, modalities={"0": "CT"},
        labels=dict(configs.KITS19_LABELS), regions=None, training=training, test=test,
        recipe={"spacing": list(recipe["spacing"]), "patch_size": list(configs.KITS19_PATCH_SIZE),
                "normalization": [{"type": "ct", **configs.KITS19_CT}], "pad_mode": "edge",
                "recipe": recipe_name},
        evaluation_cases=list(configs.KITS19_EVALUATION_CASES))
