"""Raw task -> cropped, resampled, normalised NumPy volumes with per-case metadata.

The raw task may be in any layout of `data_preprocessing.layouts` (MSD, nnU-Net v2, KiTS19, 2D
images); its plan is planned from the data (`planning`), taken from `configs` (MSD tasks, KiTS19),
or given as a file and checked by `plans`. Cases are read by `reading`, transformed by `transforms`
and run in parallel by `workers`; this module runs a task and writes its folder.

Data flow per case (arrays are (C, D, H, W), see docs/data_format.md):
read NIfTI and check it -> crop to the non-zero region of the image -> resample to the target
spacing (images cubic, labels by linear interpolation of one-hot maps; order 0 along a
separately handled anisotropic axis) -> normalise (CT: clip and z-score with dataset
statistics; other modalities: z-score per channel over the body) -> pad to the patch size
(training) -> write `<case>_x.npy`, `<case>_y.npy`, `<case>_meta.json` atomically, meta last.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_preprocessing import configs, plans
from data_preprocessing.layouts import CaseFiles, PreprocessingError, RawTask
from data_preprocessing.planning import plan_task
from data_preprocessing.reading import case_meta, files_outside, load_case
from data_preprocessing.tasks import open_task
from data_preprocessing.transforms import preprocess_arrays
from data_preprocessing.workers import run_parallel, worker_pool
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

CONFIG_NAME = "config.json"


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
                    kits_recipe: str = configs.KITS19_DEFAULT_RECIPE, planner_name: str | None = None
                    ) -> PreprocessSummary:
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
        planner_name: the network preset (network_plan.PLANNERS); None: the existing plan's, else "default". A
            preset other than the existing plan's plans the task again.

    Cases already preprocessed with the same plan are skipped; cases made with another plan are redone, and
    cases the task no longer has are removed from the output folder.
    """
    plan_config = plans.read_plan(plan) if plan is not None else None
    dim = resolve_dim(dim, plan_config, plan)
    raw = open_task(data, task, results, dim, kits_recipe=kits_recipe, overwrite=overwrite)
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
        if previous is not None and planner_name not in (None, previous.get("planner", "default")):
            previous = None  # another preset: plan again
        planner_name = planner_name or "default"
        if plan_config is not None:
            config = plans.check_plan(plan_config, raw, raw.dim, f"plan {plan}")
        elif previous is not None:
            # The task's plan as written by an earlier run, possibly edited by hand since.
            config = plans.check_plan(previous, raw, raw.dim, str(config_path))
        else:
            config = plan_task(raw, raw.dim, pool, planner_name)
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
