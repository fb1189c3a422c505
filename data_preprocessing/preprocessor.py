"""Raw task -> cropped, resampled, normalised NumPy volumes with per-case metadata.

The raw task may be in any layout of `data_preprocessing.layouts` (MSD, nnU-Net v2, KiTS19, 2D
images); its plan is planned here from the data, taken from `configs` (MSD tasks, KiTS19), or
given as a file and checked by `data_preprocessing.plans`.

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
import ctypes
import json
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from data_preprocessing import configs, layouts, planner, plans
from data_preprocessing.layouts import CaseFiles, PreprocessingError, RawTask
from data_preprocessing.layouts import image_cases as image_cases  # re-exported: predicting raw images uses it
from data_preprocessing.resample import (
    resample_image,
    resample_label,
    resampled_shape,
    separate_axis,
)
from utils.errors import warn
from utils.io import (
    check_writable,
    folder_lock,
    load_json,
    npy_is_complete,
    remove_stale_temporaries,
    removing_new_empty_folders,
    save_json,
    save_npy,
)
from utils.nifti import NiftiError, load_nifti

CONFIG_NAME = "config.json"
CT_SAMPLES_PER_CASE = 10_000
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


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
    image = np.ascontiguousarray(to_channels_first(data, case.array_order))
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
    """Clip range (0.5 / 99.5 percentiles), mean and std of foreground CT intensities within that range."""
    if samples.size == 0:
        raise PreprocessingError("no foreground voxels in the training labels to compute CT statistics from")
    low, high = np.percentile(samples, [0.5, 99.5])
    # Of the clipped values, in float64: a few absurd voxels (1e30) would otherwise make them huge or infinite.
    clipped = np.clip(samples.astype(np.float64), low, high)
    return {"type": "ct", "clip_low": float(low), "clip_high": float(high),
            "mean": float(clipped.mean()), "std": float(clipped.std())}


def plan_task(raw: RawTask, dim: int, pool: concurrent.futures.Executor | None = None) -> dict:
    """The task's config: the fixed recipe (KiTS19) or the published MSD values where there are some, else
    planned from the data (target spacing, patch size, CT statistics); checked and completed by `plans`."""
    number = raw.key
    n_channels = len(raw.modalities)
    label_values = [int(k) for k in raw.labels]
    ct_channels = [int(k) for k, name in raw.modalities.items() if is_ct(name)]
    patch_key = f"{number}_{dim}d"
    plan: dict = {}

    if raw.recipe is not None:
        plan = dict(raw.recipe)
        spacing, patch_size, normalization = plan.pop("spacing"), plan.pop("patch_size"), plan.pop("normalization")
    elif raw.layout == "msd" and number in configs.SPACINGS and patch_key in configs.PATCH_SIZES:
        spacing = list(configs.SPACINGS[number])
        patch_size = list(configs.PATCH_SIZES[patch_key])
        ct_stats = configs.CT_STATS.get(number)
        if ct_channels and ct_stats is None:
            raise PreprocessingError(f"task {number} has a CT channel but no CT statistics in configs.py")
        channel_ct = {c: {"type": "ct", **ct_stats} for c in ct_channels} if ct_channels else {}
        normalization = [channel_ct.get(c, {"type": "zscore"}) for c in range(n_channels)]
    else:
        if not raw.training:
            raise PreprocessingError(f"{raw.root} has no training cases to plan from")
        fingerprints = run_parallel(
            _fingerprint_case,
            [(raw.root, case, n_channels, label_values, ct_channels, index)
             for index, case in enumerate(raw.training)],
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
        zscore = {"type": "zscore"} if raw.zscore_nonzero else {"type": "zscore", "nonzero": False}
        normalization = [channel_ct.get(c, zscore) for c in range(n_channels)]

    plan.update(dim=dim, spacing=spacing, patch_size=patch_size, normalization=normalization,
                in_channels=n_channels, n_class=len(raw.labels))
    return plans.check_plan(plan, raw, dim, f"the plan of {raw.name}")


# --------------------------------------------------------------------------------------------
# Running over a task
# --------------------------------------------------------------------------------------------
PARENT_POLL_SECONDS = 0.5


def _worker_init(threads: int, parent: int) -> None:
    """Set up a worker process: its thread count, and its exit as soon as `parent` (a process id) is gone."""
    exit_with_parent(parent)
    import torch

    torch.set_num_threads(threads)


def exit_with_parent(parent: int) -> None:
    """End this process as soon as the process `parent` ends, however it ends (SIGKILL included).

    A killed parent cannot stop its workers, which would otherwise go on writing cases and then wait for work
    forever. On Linux the kernel sends SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG); elsewhere, and
    as a fallback, a daemon thread checks every half second whether this process was handed to another parent.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


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
                                                initargs=(threads, os.getpid())) as pool:
        yield pool


def run_parallel(function, argument_tuples: list[tuple], pool: concurrent.futures.Executor | None,
                 description: str) -> list:
    """Apply `function` to each argument tuple, in the pool's processes if there is one, keeping the order.

    Each worker holds one case at a time. The first failure cancels the remaining work and is
    raised here.

    Raises:
        PreprocessingError: a worker process died (killed, e.g. for lack of memory), naming the cases
            left unfinished.
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
        except BrokenProcessPool:
            finished = {index for future, index in futures.items()
                        if future.done() and not future.cancelled() and future.exception() is None}
            unfinished = sorted(set(futures.values()) - finished)
            names = [_item_name(argument_tuples[index], index) for index in unfinished]
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise PreprocessingError(
                f"a worker process died while {description}, most likely killed for lack of memory, with "
                f"{len(names)} case(s) unfinished ({shown}); run again with a lower --n_jobs (finished cases "
                f"are kept)") from None
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return results


def _item_name(arguments: tuple, index: int) -> str:
    """The case id among a work item's arguments, else its position."""
    return next((argument.case_id for argument in arguments if isinstance(argument, CaseFiles)), f"item {index}")


def output_dir(results: str | os.PathLike, key: str, dim: int) -> Path:
    """`RESULTS/<key>_<dim>d`, the key being the task's (`RawTask.key`: "05", "005", "kits19", a folder name)."""
    return Path(results) / f"{key}_{dim}d"


def _case_is_done(folder: Path, case_id: str, training: bool, digest: str) -> bool:
    """Whether a case's files are complete and were made with the plan of `digest`."""
    meta_path = folder / f"{case_id}_meta.json"
    if not meta_path.is_file():
        return False
    try:
        meta = load_json(meta_path)
    except (json.JSONDecodeError, OSError):
        return False
    if meta.get("plan_digest") != digest or not npy_is_complete(folder / f"{case_id}_x.npy"):
        return False
    return not training or npy_is_complete(folder / f"{case_id}_y.npy", (1, *meta["shape"]))


def remove_stale_cases(folder: Path, keep: Iterable[str]) -> int:
    """Delete the files of preprocessed cases that the task no longer has (e.g. excluded by a recipe), so that
    training does not pick them up. Returns how many cases were removed."""
    keep = set(keep)
    removed = 0
    for meta_path in folder.glob("*_meta.json"):
        case_id = meta_path.name[: -len("_meta.json")]
        if case_id in keep or meta_path.name.startswith("."):
            continue
        for suffix in ("_x.npy", "_y.npy", "_meta.json"):
            (folder / f"{case_id}{suffix}").unlink(missing_ok=True)
        removed += 1
    return removed


def case_meta(case: CaseFiles, loaded: LoadedCase, geometry: dict) -> dict:
    """The metadata that puts a prediction back on the source image (docs/data_format.md)."""
    return {
        "case_id": case.case_id,
        "image": case.image,
        "label": case.label,
        "original_shape": [int(n) for n in loaded.nifti.shape[:3]],
        "array_order": case.array_order,
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
    meta = case_meta(case, loaded, geometry)
    meta["plan_digest"] = plans.plan_digest(config)
    if loaded.label is not None:  # of the source label: a structure lost in resampling was still annotated
        meta["label_values"] = np.flatnonzero(np.bincount(loaded.label.ravel())).tolist()
    if config.get("png_masks"):
        meta["png_masks"] = config["png_masks"]
    save_json(folder / f"{case.case_id}_meta.json", meta)
    return case.case_id


@dataclass
class PreprocessSummary:
    folder: Path
    written: int
    skipped: int
    config: dict
    removed: int = 0
    splits: Path | None = None  # the fixed validation split written for the task (KiTS19)


def _read_config(path: Path) -> dict:
    try:
        return load_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PreprocessingError(f"{path} is not valid JSON ({error}); fix it, or pass --overwrite to plan the "
                                 f"task again") from None


def resolve_dim(dim: int | None, plan: dict | None, plan_path: str | os.PathLike | None) -> int | None:
    """The requested dimension: --dim, else the plan's; they must agree when both are given."""
    plan_dim = plan.get("dim") if plan is not None and plan.get("dim") in (2, 3) else None
    if dim is not None and plan_dim is not None and dim != plan_dim:
        raise PreprocessingError(f"plan {plan_path} is for {plan_dim}D but --dim {dim} was given")
    return dim if dim is not None else plan_dim


def write_fixed_split(root: Path, raw: RawTask) -> Path | None:
    """`splits.json` with the task's fixed validation cases (those present) and every other case training.

    Returns the file, or None (and no file) when the preprocessed cases include no validation case or no other.
    """
    path = root / "splits.json"
    present = sorted(case.case_id for case in raw.training)
    val = [case for case in raw.evaluation_cases or [] if case in set(present)]
    train = [case for case in present if case not in set(val)]
    if not val or not train:
        path.unlink(missing_ok=True)
        return None
    save_json(path, [{"train": train, "val": val}])
    return path


def preprocess_task(data: str | os.PathLike, results: str | os.PathLike, task: str, dim: int | None = None,
                    exec_mode: str = "training", n_jobs: int = 1, overwrite: bool = False,
                    plan: str | os.PathLike | None = None,
                    kits_recipe: str = configs.KITS19_DEFAULT_RECIPE) -> PreprocessSummary:
    """Preprocess every case of a task for `exec_mode`; see the module docstring.

    Args:
        data: the folder holding the raw task (any layout of `data_preprocessing.layouts`).
        results: output root; the task goes to `RESULTS/<key>_<dim>d`.
        task: `--task`: a number, a folder name or "kits19".
        dim: 2 or 3; None: the plan's, else 2 for 2D images and 3 otherwise.
        exec_mode: "training" (images and labels), "val" (training images) or "test".
        n_jobs: cases preprocessed in parallel.
        overwrite: re-plan (unless `plan` is given) and redo every case.
        plan: a plan file (a config.json, possibly edited) to use instead of planning.
        kits_recipe: KiTS19 only: the MLPerf rules to follow (configs.KITS19_RECIPES).

    Cases already preprocessed with the same plan are skipped; cases made with another plan are redone, and
    cases the task no longer has are removed from the output folder.
    """
    plan_config = plans.read_plan(plan) if plan is not None else None
    dim = resolve_dim(dim, plan_config, plan)
    raw = layouts.open_task(data, task, results, dim, kits_recipe=kits_recipe, overwrite=overwrite)
    root = output_dir(results, raw.key, raw.dim)
    config_path = root / CONFIG_NAME
    training = exec_mode == "training"
    cases = raw.cases(exec_mode)
    if not cases:
        raise PreprocessingError(f"{raw.root} has no cases for --exec_mode {exec_mode}")
    outside = files_outside(raw.root, cases)
    if outside:
        case_id, source, target = outside[0]
        warn(f"{len(outside)} file(s) of {raw.name} lie outside {raw.root} through a symbolic link or '..' "
             f"(first: {case_id}: {source} -> {target}); they are read from there")
    folder = root if training else root / exec_mode
    # Two runs on one folder would delete each other's temporary files and write the same cases: one at a time.
    busy = f"another preprocess.py run is writing {root}; wait for it to finish, or use another --results folder"
    with contextlib.ExitStack() as stack:
        stack.enter_context(removing_new_empty_folders(folder))  # a run that fails early leaves no empty folder
        check_writable(folder)  # before planning, which reads every case
        stack.enter_context(folder_lock(root, busy))
        pool = stack.enter_context(worker_pool(n_jobs))
        reuse = config_path.is_file() and plan_config is None and not overwrite and raw.recipe is None
        previous = _read_config(config_path) if reuse else None
        if plan_config is not None:
            config = plans.check_plan(plan_config, raw, raw.dim, f"plan {plan}")
        elif previous is not None:
            # The task's plan as written by an earlier run, possibly edited by hand since.
            config = plans.check_plan(previous, raw, raw.dim, str(config_path))
        else:
            config = plan_task(raw, raw.dim, pool)
        if not training and config_path.is_file():
            written = previous if previous is not None else _read_config(config_path)
            if raw.recipe is not None and written.get("recipe") not in (None, raw.recipe["recipe"]):
                raise PreprocessingError(f"{config_path} was made with --kits_recipe {written['recipe']}; pass it "
                                         f"again, or preprocess the training cases with the new recipe first")
            if plans.plan_digest(written) != plans.plan_digest(config):
                # The training cases were made with the plan in config.json: changing it here would leave them stale.
                raise PreprocessingError(f"{config_path} holds another plan than the one given for --exec_mode "
                                         f"{exec_mode}; preprocess the training cases with it first "
                                         f"(--exec_mode training)")
        if previous != config:
            save_json(config_path, config)
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)
        removed = remove_stale_cases(folder, [case.case_id for case in cases])
        digest = plans.plan_digest(config)
        todo = [case for case in cases if overwrite or not _case_is_done(folder, case.case_id, training, digest)]
        run_parallel(preprocess_case, [(raw.root, case, config, folder, training) for case in todo], pool,
                     f"preprocessing {raw.name}")
        if training:
            for value in absent_classes(folder, [case.case_id for case in cases], config["labels"]):
                warn(f"class {value} ({config['labels'][str(value)]}) is declared in dataset.json but labels no "
                     f"voxel of any training case; validation leaves it out of mean_dice")
    splits = write_fixed_split(root, raw) if training and raw.evaluation_cases is not None else None
    return PreprocessSummary(folder, len(todo), len(cases) - len(todo), config, removed, splits)


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


def absent_classes(folder: Path, case_ids: Iterable[str], labels: dict) -> list[int]:
    """Foreground label values of `labels` ({"0": "background", "1": ...}) that no training case's label holds.

    Read from each case's metadata (`label_values`); a case preprocessed before that key existed is read from
    its `_y.npy`.
    """
    present: set[int] = set()
    for case_id in case_ids:
        meta = load_json(folder / f"{case_id}_meta.json")
        if "label_values" in meta:
            present.update(int(v) for v in meta["label_values"])
        else:
            label = np.load(folder / f"{case_id}_y.npy", mmap_mode="r")
            present.update(np.flatnonzero(np.bincount(np.asarray(label).ravel())).tolist())
    return [int(k) for k in sorted(labels, key=int) if int(k) != 0 and int(k) not in present]


def describe(summary: PreprocessSummary) -> str:
    config = summary.config
    voxels = math.prod(config["patch_size"])
    text = (f"{summary.folder}: {summary.written} case(s) written, {summary.skipped} already done; "
            f"{config['dim']}D, {config['in_channels']} channel(s), {config['n_class']} classes, "
            f"spacing {config['spacing']} mm, patch {config['patch_size']} ({voxels} voxels)")
    if summary.removed:
        text += f"; removed {summary.removed} case(s) the task no longer has"
    if summary.splits is not None:
        text += f"; fixed validation split in {summary.splits}"
    return text
