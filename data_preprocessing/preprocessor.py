"""Raw MSD task -> cropped, resampled, normalised NumPy volumes with per-case metadata.

Data flow per case (arrays are (C, D, H, W), see docs/data_format.md):
read NIfTI and check it -> crop to the non-zero region of the image -> resample to the target
spacing (images cubic, labels by linear interpolation of one-hot maps; order 0 along a
separately handled anisotropic axis) -> normalise (CT: clip and z-score with dataset
statistics; other modalities: z-score per channel over the body) -> pad to the patch size
(training) -> write `<case>_x.npy`, `<case>_y.npy`, `<case>_meta.json` atomically, meta last.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from data_preprocessing import configs, planner
from data_preprocessing.resample import (
    resample_image,
    resample_label,
    resampled_shape,
    separate_axis,
)
from utils.errors import UserError
from utils.io import load_json, npy_is_complete, remove_stale_temporaries, save_json, save_npy

CONFIG_NAME = "config.json"
CT_SAMPLES_PER_CASE = 10_000


class PreprocessingError(UserError):
    """Bad input data: the message names the case or file and the problem."""


@dataclass(frozen=True)
class CaseFiles:
    """Source files of one case, relative to the task folder."""

    case_id: str
    image: str | tuple[str, ...]  # one file (3D, or 4D with channels last), or one 3D file per channel
    label: str | None


# --------------------------------------------------------------------------------------------
# Reading and checking the raw task
# --------------------------------------------------------------------------------------------
CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.nii(\.gz)?$")


def image_cases(folder: Path, n_channels: int) -> list[CaseFiles]:
    """The images of a folder, as cases: `<case>.nii.gz` files (3D, or 4D with channels last), or when the
    task has several channels and every file is named `<case>_0000.nii.gz`, `<case>_0001.nii.gz`, ... one
    file per channel (the nnU-Net v2 naming)."""
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith((".nii.gz", ".nii")) and
                   not p.name.startswith("."))
    if not names:
        raise PreprocessingError(f"{folder} holds no .nii.gz images")
    matches = [CHANNEL_FILE.match(name) for name in names]
    if n_channels > 1 and all(matches):
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
    return [CaseFiles(_case_id(name), name, None) for name in names]


def find_task_dir(data: str | os.PathLike, task: str) -> Path:
    """Locate the raw task folder for `--task` ('05', 'Task05_Prostate' or a folder name)."""
    data = Path(data)
    if (data / task / "dataset.json").is_file() or (data / task).is_dir():
        return data / task
    number = configs.task_number(task)
    matches = sorted(p for p in data.glob(f"Task{number}_*") if p.is_dir()) if number.isdigit() else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise PreprocessingError(f"no folder Task{number}_* for task '{task}' in {data}; download it or pass --data")
    raise PreprocessingError(f"several folders match task '{task}' in {data}: {', '.join(p.name for p in matches)}")


def load_dataset_json(task_dir: Path) -> dict:
    """Read and check dataset.json (MSD v1)."""
    path = task_dir / "dataset.json"
    if not path.is_file():
        raise PreprocessingError(f"{path} is missing: an MSD task folder needs a dataset.json")
    try:
        dataset = load_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PreprocessingError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(dataset, dict):
        raise PreprocessingError(f"{path} must hold a JSON object")
    for key in ("modality", "labels", "training"):
        if key not in dataset:
            raise PreprocessingError(f"{path} has no '{key}' entry")
    if not isinstance(dataset["modality"], dict) or not dataset["modality"]:
        raise PreprocessingError(f"{path}: 'modality' must map channel numbers to names, e.g. {{\"0\": \"CT\"}}")
    try:
        labels = {int(k): v for k, v in dataset["labels"].items()}
    except (AttributeError, ValueError):
        raise PreprocessingError(
            f"{path}: 'labels' must map label values to names, e.g. {{\"0\": \"background\"}}") from None
    if 0 not in labels:
        raise PreprocessingError(f"{path}: 'labels' must declare the background value 0")
    if not isinstance(dataset["training"], list):
        raise PreprocessingError(f"{path}: 'training' must be a list of {{image, label}} entries")
    return dataset


def _case_id(image_path: str) -> str:
    name = Path(image_path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _relative(path: str) -> str:
    return path[2:] if path.startswith("./") else path


def list_cases(dataset: dict, exec_mode: str) -> list[CaseFiles]:
    """The cases preprocessed in `exec_mode` (training: images with labels; val: training images
    without labels; test: the test images)."""
    cases = []
    if exec_mode == "test":
        for entry in dataset.get("test", []):
            image = entry["image"] if isinstance(entry, dict) else entry
            cases.append(CaseFiles(_case_id(image), _relative(image), None))
        return cases
    for index, entry in enumerate(dataset["training"]):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise PreprocessingError(f"dataset.json: training entry {index} needs 'image' and 'label'")
        label = _relative(entry["label"]) if exec_mode == "training" else None
        cases.append(CaseFiles(_case_id(entry["image"]), _relative(entry["image"]), label))
    ids = [case.case_id for case in cases]
    duplicates = sorted({case_id for case_id in ids if ids.count(case_id) > 1})
    if duplicates:
        raise PreprocessingError(f"dataset.json lists these cases more than once: {', '.join(duplicates)}")
    return cases


def read_nifti(path: Path, case_id: str, label: bool = False) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Load a NIfTI file and its voxels (float32 for images, the stored type for labels)."""
    if not path.is_file():
        raise PreprocessingError(f"{case_id}: file {path} does not exist")
    try:
        nifti = nib.load(str(path))
        data = np.asanyarray(nifti.dataobj) if label else nifti.get_fdata(dtype=np.float32, caching="unchanged")
    except Exception as error:  # nibabel and zlib raise many types for damaged files
        raise PreprocessingError(f"{case_id}: cannot read {path} ({type(error).__name__}: {error})") from None
    return nifti, data


def to_channels_first(data: np.ndarray) -> np.ndarray:
    """NIfTI (X, Y, Z) or (X, Y, Z, C) -> (C, D, H, W) = (C, Z, Y, X)."""
    if data.ndim == 3:
        return data.transpose(2, 1, 0)[None]
    return data.transpose(3, 2, 1, 0)


def spacing_dhw(image: nib.Nifti1Image) -> list[float]:
    """Header zooms (sx, sy, sz) -> (D, H, W) spacing in mm."""
    sx, sy, sz = (float(z) for z in image.header.get_zooms()[:3])
    return [sz, sy, sx]


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


def load_case(task_dir: Path, case: CaseFiles, n_channels: int, label_values: Iterable[int]) -> LoadedCase:
    """Read one case and check it; raise PreprocessingError naming the case otherwise."""
    nifti, data = read_image(task_dir, case)
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
    image = np.ascontiguousarray(to_channels_first(data))
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
        label_float = np.asarray(label_data, dtype=np.float64)
        if not np.isfinite(label_float).all() or (label_float != np.round(label_float)).any():
            raise PreprocessingError(f"{case.case_id}: label {case.label} has non-integer values")
        values = np.unique(label_float).astype(np.int64)
        unknown = sorted(set(values.tolist()) - set(label_values))
        if unknown:
            raise PreprocessingError(
                f"{case.case_id}: label values {unknown} are not declared in dataset.json 'labels'")
        label = np.ascontiguousarray(label_float.astype(np.uint8).transpose(2, 1, 0))
    return LoadedCase(image, label, spacing_dhw(nifti), nifti)


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
    voxels outside the body are set to 0.
    """
    for channel, scheme in enumerate(normalization):
        values = image[channel]
        if scheme["type"] == "ct":
            np.clip(values, scheme["clip_low"], scheme["clip_high"], out=values)
            values -= scheme["mean"]
            values /= max(scheme["std"], 1e-8)
        else:
            inside = values[body] if body.any() else values.ravel()
            mean, std = float(inside.mean()), float(inside.std())
            values -= mean
            values /= max(std, 1e-8)
            values[~body] = 0
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

    Returns:
        image (C, D, H, W) float32, label (1, D, H, W) uint8 or None, and the geometry part of
        the case metadata (see docs/data_format.md).
    """
    box = nonzero_box(loaded.image, loaded.label)
    image = np.ascontiguousarray(crop(loaded.image, box))
    label = np.ascontiguousarray(crop(loaded.label, box)) if loaded.label is not None else None
    body = (image != 0).any(axis=0)
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
        image = np.pad(image, [[0, 0], *padding])
        if label is not None:
            label = np.pad(label, padding)
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


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------
def is_ct(modality: str) -> bool:
    return modality.strip().upper() == "CT"


def _fingerprint_case(task_dir: Path, case: CaseFiles, n_channels: int, label_values: list[int],
                      ct_channels: list[int], seed: int) -> dict:
    """Spacing, cropped shape and a sample of foreground intensities of one training case."""
    loaded = load_case(task_dir, case, n_channels, label_values)
    box = nonzero_box(loaded.image, loaded.label)
    samples = {}
    if ct_channels and loaded.label is not None:
        foreground = loaded.label > 0
        rng = np.random.default_rng(seed)
        for channel in ct_channels:
            values = loaded.image[channel][foreground]
            if values.size > CT_SAMPLES_PER_CASE:
                values = rng.choice(values, CT_SAMPLES_PER_CASE, replace=False)
            samples[channel] = values
    return {"spacing": loaded.spacing, "shape": [stop - start for start, stop in box], "samples": samples}


def ct_statistics(samples: np.ndarray) -> dict:
    """Clip range (0.5 / 99.5 percentiles), mean and std of foreground CT intensities."""
    if samples.size == 0:
        raise PreprocessingError("no foreground voxels in the training labels to compute CT statistics from")
    low, high = np.percentile(samples, [0.5, 99.5])
    return {"type": "ct", "clip_low": float(low), "clip_high": float(high),
            "mean": float(samples.mean()), "std": float(samples.std())}


def plan_task(task_dir: Path, dataset: dict, task: str, dim: int,
              pool: concurrent.futures.Executor | None = None) -> dict:
    """The task's config: known MSD values where there are some, else planned from the data."""
    number = configs.task_number(task)
    modalities = {str(k): v for k, v in dataset["modality"].items()}
    n_channels = len(modalities)
    labels = {str(k): v for k, v in sorted(dataset["labels"].items(), key=lambda item: int(item[0]))}
    label_values = [int(k) for k in labels]
    ct_channels = [int(k) for k, name in modalities.items() if is_ct(name)]
    patch_key = f"{number}_{dim}d"

    if number in configs.SPACINGS and patch_key in configs.PATCH_SIZES:
        spacing = list(configs.SPACINGS[number])
        patch_size = list(configs.PATCH_SIZES[patch_key])
        ct_stats = configs.CT_STATS.get(number)
        if ct_channels and ct_stats is None:
            raise PreprocessingError(f"task {number} has a CT channel but no CT statistics in configs.py")
        channel_ct = {c: {"type": "ct", **ct_stats} for c in ct_channels} if ct_channels else {}
    else:
        cases = list_cases(dataset, "training")
        if not cases:
            raise PreprocessingError(f"{task_dir}/dataset.json lists no training cases to plan from")
        fingerprints = run_parallel(
            _fingerprint_case,
            [(task_dir, case, n_channels, label_values, ct_channels, index) for index, case in enumerate(cases)],
            pool, "planning")
        spacings = np.array([f["spacing"] for f in fingerprints])
        spacing = planner.target_spacing(spacings)
        shapes = np.array([resampled_shape(f["shape"], f["spacing"], spacing) for f in fingerprints])
        median_shape = np.median(shapes, axis=0)
        if dim == 3:
            patch_size = planner.plan_patch_size(median_shape, spacing)
        else:
            patch_size = planner.plan_patch_size(median_shape[1:], spacing[1:])
        channel_ct = {c: ct_statistics(np.concatenate([f["samples"][c] for f in fingerprints])) for c in ct_channels}

    normalization = [channel_ct.get(c, {"type": "zscore"}) for c in range(n_channels)]
    kernels, strides = planner.kernels_strides(patch_size, spacing[-len(patch_size):])
    config = {
        "task": number,
        "task_name": task_dir.name,
        "dim": dim,
        "modalities": modalities,
        "in_channels": n_channels,
        "labels": labels,
        "n_class": len(labels),
        "spacing": spacing,
        "patch_size": patch_size,
        "normalization": normalization,
        "batch_size": planner.suggest_batch_size(patch_size),
        "kernels": kernels,
        "strides": strides,
    }
    regions = dataset_regions(dataset, label_values)
    if regions:
        config["regions"] = regions
    return config


def dataset_regions(dataset: dict, label_values: list[int]) -> list[dict] | None:
    """Hierarchical regions declared in dataset.json as {"name": [label values], ...}, checked against the labels."""
    declared = dataset.get("regions")
    if not declared:
        return None
    if not isinstance(declared, dict):
        raise PreprocessingError("dataset.json 'regions' must map region names to lists of label values")
    regions = []
    for name, values in declared.items():
        values = [values] if isinstance(values, int) else list(values)
        unknown = sorted(set(values) - set(label_values))
        if unknown or not values:
            raise PreprocessingError(f"dataset.json region '{name}' uses label values {unknown or values} "
                                     f"that are not declared in 'labels'")
        regions.append({"name": name, "labels": values})
    return regions


# --------------------------------------------------------------------------------------------
# Running over a task
# --------------------------------------------------------------------------------------------
def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


@contextlib.contextmanager
def worker_pool(n_jobs: int) -> Iterator[concurrent.futures.ProcessPoolExecutor | None]:
    """Processes for the per-case work, or None to work in this process when n_jobs is 1."""
    if n_jobs <= 1:
        yield None
        return
    threads = max(1, (os.cpu_count() or 1) // n_jobs)
    # spawn, not fork: a forked child of a process whose OpenMP pool has run can deadlock.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(n_jobs, mp_context=context, initializer=_worker_init,
                                                initargs=(threads,)) as pool:
        yield pool


def run_parallel(function, argument_tuples: list[tuple], pool: concurrent.futures.Executor | None,
                 description: str) -> list:
    """Apply `function` to each argument tuple, in the pool's processes if there is one, keeping the order.

    Each worker holds one case at a time. The first failure cancels the remaining work and is
    raised here.
    """
    with tqdm(total=len(argument_tuples), desc=description, unit="case", leave=False, disable=None) as progress:
        if pool is None:
            results = []
            for arguments in argument_tuples:
                results.append(function(*arguments))
                progress.update()
            return results
        results = [None] * len(argument_tuples)
        futures = {pool.submit(function, *arguments): index for index, arguments in enumerate(argument_tuples)}
        try:
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
                progress.update()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return results


def output_dir(results: str | os.PathLike, task: str, dim: int) -> Path:
    return Path(results) / f"{configs.task_number(task)}_{dim}d"


def _case_is_done(folder: Path, case_id: str, training: bool) -> bool:
    meta_path = folder / f"{case_id}_meta.json"
    if not meta_path.is_file():
        return False
    try:
        meta = load_json(meta_path)
    except (json.JSONDecodeError, OSError):
        return False
    if not npy_is_complete(folder / f"{case_id}_x.npy"):
        return False
    return not training or npy_is_complete(folder / f"{case_id}_y.npy", (1, *meta["shape"]))


def case_meta(case: CaseFiles, loaded: LoadedCase, geometry: dict) -> dict:
    """The metadata that puts a prediction back on the source image (docs/data_format.md)."""
    return {
        "case_id": case.case_id,
        "image": case.image,
        "label": case.label,
        "original_shape": [int(n) for n in loaded.nifti.shape[:3]],
        "affine": loaded.nifti.affine.tolist(),
        "nifti_header": base64.b64encode(loaded.nifti.header.binaryblock).decode("ascii"),
        **geometry,
    }


def preprocess_case(task_dir: Path, case: CaseFiles, config: dict, folder: Path, training: bool) -> str:
    """Preprocess one case and write its files (meta last, so its presence marks completion)."""
    loaded = load_case(task_dir, case, config["in_channels"], [int(k) for k in config["labels"]])
    image, label, geometry = preprocess_arrays(loaded, config, training)
    save_npy(folder / f"{case.case_id}_x.npy", image)
    if label is not None:
        save_npy(folder / f"{case.case_id}_y.npy", label)
    save_json(folder / f"{case.case_id}_meta.json", case_meta(case, loaded, geometry))
    return case.case_id


@dataclass
class PreprocessSummary:
    folder: Path
    written: int
    skipped: int
    config: dict


def preprocess_task(data: str | os.PathLike, results: str | os.PathLike, task: str, dim: int = 3,
                    exec_mode: str = "training", n_jobs: int = 1, overwrite: bool = False) -> PreprocessSummary:
    """Preprocess every case of a task for `exec_mode`; see the module docstring."""
    task_dir = find_task_dir(data, task)
    dataset = load_dataset_json(task_dir)
    root = output_dir(results, task, dim)
    config_path = root / CONFIG_NAME
    training = exec_mode == "training"
    cases = list_cases(dataset, exec_mode)
    if not cases:
        raise PreprocessingError(f"{task_dir}/dataset.json lists no cases for --exec_mode {exec_mode}")
    folder = root if training else root / exec_mode
    with worker_pool(n_jobs) as pool:
        if config_path.is_file() and not overwrite:
            config = load_json(config_path)
        else:
            config = plan_task(task_dir, dataset, task, dim, pool)
            save_json(config_path, config)
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)
        todo = [case for case in cases if overwrite or not _case_is_done(folder, case.case_id, training)]
        run_parallel(preprocess_case, [(task_dir, case, config, folder, training) for case in todo], pool,
                     f"preprocessing {task_dir.name}")
    return PreprocessSummary(folder, len(todo), len(cases) - len(todo), config)


def describe(summary: PreprocessSummary) -> str:
    config = summary.config
    voxels = math.prod(config["patch_size"])
    return (f"{summary.folder}: {summary.written} case(s) written, {summary.skipped} already done; "
            f"{config['dim']}D, {config['in_channels']} channel(s), {config['n_class']} classes, "
            f"spacing {config['spacing']} mm, patch {config['patch_size']} ({voxels} voxels)")
