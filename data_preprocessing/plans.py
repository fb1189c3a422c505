"""The plan of a task (its `config.json`): checking a planned or hand-edited plan against the dataset.

A plan fixes how every case is preprocessed (target spacing, patch size, normalisation, padding)
and the whole network (channels, classes, and under "network" its kind, features, kernels, strides,
blocks per stage, normalisation and deep-supervision heads) with its batch size. `preprocess.py --plan
FILE` takes a plan instead of planning from the data; a `config.json` edited in place is read the
same way on the next run. Either is checked here before any case is written, and completed: a missing
`network` (and `batch_size`) comes from the plan's `planner` preset for its patch size and spacing,
`task`, `task_name` and the dataset's own facts come from the dataset. Training builds exactly the
network written here (`read_config` is the one reader of a preprocessed task's config.json).

Each preprocessed case records the digest of the plan values that shaped its arrays, so a case
made under another plan is preprocessed again rather than skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from numbers import Real
from pathlib import Path

from data_preprocessing import planner
from data_preprocessing.layouts import PreprocessingError, RawTask, read_json_object
from data_preprocessing.network_plan import PLANNERS, check_patch, plan_network
from utils.errors import UserError
from utils.io import format_bytes, machine_memory_bytes
from utils.settings import NetworkPlan
from utils.task_folders import PLAN_FILE, plan_path, preprocessed_tasks

CONFIG = PLAN_FILE
REQUIRED_KEYS = ("dim", "spacing", "patch_size", "normalization", "in_channels", "n_class")
OPTIONAL_KEYS = ("task", "task_name", "modalities", "labels", "batch_size", "network", "planner", "regions",
                 "pad_mode", "png_masks", "recipe")
# Plans written before the network was part of the plan: these keys followed from the patch and are planned again.
LEGACY_KEYS = ("kernels", "strides")
# The plan values that decide a preprocessed case's arrays.
PREPROCESSING_KEYS = ("dim", "spacing", "patch_size", "normalization", "labels", "in_channels", "pad_mode")
PAD_MODES = ("constant", "edge")
CT_KEYS = ("clip_low", "clip_high", "mean", "std")


def read_plan(path: str | os.PathLike) -> dict:
    """Read a plan file (JSON object), with a one-line error if it is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise PreprocessingError(f"plan {path} does not exist")
    return read_json_object(path)


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _normalization(schemes, n_channels: int, where: str) -> list[dict]:
    if not isinstance(schemes, list) or len(schemes) != n_channels:
        raise PreprocessingError(f"{where}: 'normalization' must be a list with one entry per channel "
                                 f"({n_channels}), got {schemes!r}")
    for channel, scheme in enumerate(schemes):
        kind = scheme.get("type") if isinstance(scheme, dict) else None
        if kind == "ct":
            if not all(_is_number(scheme.get(key)) for key in CT_KEYS):
                raise PreprocessingError(f"{where}: CT normalisation of channel {channel} needs numbers "
                                         f"{', '.join(CT_KEYS)}, got {scheme!r}")
            if scheme["clip_low"] > scheme["clip_high"] or scheme["std"] <= 0:
                raise PreprocessingError(f"{where}: CT normalisation of channel {channel} needs clip_low <= "
                                         f"clip_high and std > 0, got {scheme!r}")
        elif kind == "zscore":
            if not isinstance(scheme.get("nonzero", True), bool):
                raise PreprocessingError(f"{where}: 'nonzero' of channel {channel} must be true or false")
        else:
            raise PreprocessingError(f"{where}: normalisation of channel {channel} must be {{\"type\": \"ct\", ...}} "
                                     f"or {{\"type\": \"zscore\"}}, got {scheme!r}")
    return schemes


def check_plan(plan: dict, raw: RawTask, dim: int, where: str) -> dict:
    """Check a plan against the dataset and complete it into the task's config.

    Args:
        plan: the plan (a config.json's content, possibly edited by hand).
        raw: the dataset it is for.
        dim: the dimension being preprocessed.
        where: the plan's file, for messages.

    Returns:
        The config: the plan's values with `task`, `task_name`, `modalities`, `labels`, `regions`, `planner`,
        `network` and `batch_size` filled in (see docs/data_format.md).

    Raises:
        PreprocessingError: one line naming the plan and the problem: a missing or unknown key, a value of the
            wrong type or length for `dim`, or channels or classes that differ from the dataset's.
    """
    missing = [key for key in REQUIRED_KEYS if key not in plan]
    if missing:
        raise PreprocessingError(f"{where}: the plan has no {', '.join(repr(k) for k in missing)}")
    unknown = sorted(set(plan) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS) - set(LEGACY_KEYS))
    if unknown:
        raise PreprocessingError(f"{where}: unknown plan key(s) {', '.join(repr(k) for k in unknown)}")
    if plan["dim"] != dim:
        raise PreprocessingError(f"{where}: the plan is for {plan['dim']}D but {dim}D is being preprocessed; "
                                 f"pass --dim {plan['dim']} or edit 'dim'")
    spacing, patch = plan["spacing"], plan["patch_size"]
    if not isinstance(spacing, list) or len(spacing) != 3 or not all(_is_number(s) and s > 0 for s in spacing):
        raise PreprocessingError(f"{where}: 'spacing' must be 3 positive numbers (D, H, W) in mm, got {spacing!r}")
    if not isinstance(patch, list) or len(patch) != dim or not all(_is_count(p) for p in patch):
        raise PreprocessingError(f"{where}: 'patch_size' must be a list of {dim} positive integers for a {dim}D "
                                 f"plan, got {patch!r}")
    n_channels, n_class = len(raw.modalities), len(raw.labels)
    if plan["in_channels"] != n_channels:
        raise PreprocessingError(f"{where}: 'in_channels' is {plan['in_channels']} but the dataset has "
                                 f"{n_channels} channel(s)")
    if plan["n_class"] != n_class:
        raise PreprocessingError(f"{where}: 'n_class' is {plan['n_class']} but the dataset has {n_class} classes "
                                 f"(background included)")
    labels = plan.get("labels", raw.labels)
    if not isinstance(labels, dict) or sorted(labels, key=str) != sorted(raw.labels, key=str):
        raise PreprocessingError(f"{where}: 'labels' must name the dataset's label values "
                                 f"{', '.join(raw.labels)}, got {labels!r}")
    modalities = plan.get("modalities", raw.modalities)
    if not isinstance(modalities, dict) or len(modalities) != n_channels:
        raise PreprocessingError(f"{where}: 'modalities' must name the dataset's {n_channels} channel(s), "
                                 f"got {modalities!r}")
    normalization = _normalization(plan["normalization"], n_channels, where)
    pad_mode = plan.get("pad_mode", "constant")
    if pad_mode not in PAD_MODES:
        raise PreprocessingError(f"{where}: 'pad_mode' must be one of {', '.join(PAD_MODES)}, got {pad_mode!r}")
    network, planner_name = plan_network_of(plan, where)
    batch_size = plan.get("batch_size", planner.suggest_batch_size(patch))
    if not _is_count(batch_size):
        raise PreprocessingError(f"{where}: 'batch_size' must be a positive integer, got {batch_size!r}")
    check_plan_memory(patch, n_channels, batch_size, where)
    regions = plan["regions"] if "regions" in plan else raw.regions
    if regions is not None:
        valid = isinstance(regions, list) and all(
            isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("labels"), list)
            and r["labels"] and set(r["labels"]) <= {int(k) for k in raw.labels} - {0} for r in regions)
        if not valid:
            raise PreprocessingError(f"{where}: 'regions' must be a list of {{\"name\", \"labels\": [foreground "
                                     f"label values]}}, got {regions!r}")
    config = {
        "task": raw.key,
        "task_name": raw.name,
        "dim": dim,
        "modalities": {str(k): str(v) for k, v in modalities.items()},
        "in_channels": n_channels,
        "labels": {str(k): str(labels[k]) for k in sorted(labels, key=int)},
        "n_class": n_class,
        "spacing": [float(s) for s in spacing],
        "patch_size": list(patch),
        "normalization": normalization,
        "batch_size": batch_size,
        "planner": planner_name,
        "network": network.to_dict(),
    }
    if regions:
        config["regions"] = regions
    if pad_mode != "constant":
        config["pad_mode"] = pad_mode
    if raw.png_masks:
        config["png_masks"] = raw.png_masks
    if "recipe" in plan:
        config["recipe"] = plan["recipe"]
    return config


def check_plan_memory(patch_size: list[int], in_channels: int, batch_size: int, where: str,
                      available: int | None = None) -> None:
    """Refuse a plan whose training step cannot fit in this machine's memory (`available` bytes; default: all of
    the machine's), before any array of the patch's size is allocated or any output written.

    Raises:
        PreprocessingError: one line with the estimate and the memory of the machine.
    """
    available = machine_memory_bytes() if available is None else available
    needed = planner.training_memory_bytes(patch_size, in_channels, batch_size)
    if available is not None and needed > available:
        raise PreprocessingError(
            f"{where}: 'patch_size' {list(patch_size)} with batch size {batch_size} needs at least "
            f"{format_bytes(needed)} of memory but this machine has {format_bytes(available)}; choose a smaller "
            f"patch_size")


def plan_digest(config: dict) -> str:
    """A short digest of the plan values that decide a case's arrays (PREPROCESSING_KEYS)."""
    values = {key: config.get(key) for key in PREPROCESSING_KEYS}
    values["labels"] = sorted(values["labels"] or {}, key=int)  # the values matter, not the class names
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def plan_network_of(plan: dict, where: str) -> tuple[NetworkPlan, str]:
    """The network a plan describes, and its preset: its "network" object, checked against its patch size, or
    (a plan without one) the network its `planner` preset gives for its patch and spacing.

    Raises:
        PreprocessingError: one line naming `where` and the problem.
    """
    planner_name = plan.get("planner", "default")
    if planner_name not in PLANNERS:
        raise PreprocessingError(f"{where}: 'planner' must be one of {', '.join(PLANNERS)}, got {planner_name!r}")
    patch, dim = list(plan["patch_size"]), len(plan["patch_size"])
    try:
        if "network" in plan:
            network = NetworkPlan.from_dict(plan["network"], where)
            if network.dim != dim:
                raise ValueError(f"{where}: the network's kernels have {network.dim} axes but the patch {patch} "
                                 f"has {dim}")
        else:
            network = plan_network(patch, list(plan["spacing"])[-dim:], planner_name)
        check_patch(network, patch, where)
    except ValueError as error:
        message = str(error)
        if "stages" in message and "network" not in plan:
            message = (f"{where}: 'patch_size' {patch} is too small for a U-Net: fewer than 2 stages fit (an axis "
                       f"needs an even size of at least 8 voxels to be halved)")
        raise PreprocessingError(message if message.startswith(where) else f"{where}: {message}") from None
    return network, planner_name


def read_config(data: str | os.PathLike) -> dict:
    """The config.json of a preprocessed task folder, or of the task above a val/ or test/ folder of cases,
    completed by `complete_config`.

    Raises:
        UserError: one line naming the folder: no such folder, no config.json, or an unreadable or invalid one.
    """
    data = Path(data)
    if not data.is_dir():
        raise UserError(f"{data} does not exist: point --data at a preprocessed task folder such as /data/01_3d")
    path = plan_path(data)
    if path is None:
        found = preprocessed_tasks(data)
        if found:
            raise UserError(f"{data} has no {CONFIG} but holds the preprocessed tasks {', '.join(found)}: add "
                            f"--task and --dim (e.g. --task {found[0].rsplit('_', 1)[0]} --dim {found[0][-2]}), "
                            f"or point --data at one of them")
        raise UserError(f"{data} has no {CONFIG}: point --data at a task folder written by preprocess.py")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not readable JSON ({error}); re-run preprocess.py") from None
    return complete_config(config, str(path))


def complete_config(config: object, where: str) -> dict:
    """A task config with its network: a config written before the network was part of the plan gets the
    network its preset plans for its patch, which is the network it was trained with.

    Raises:
        UserError: one line naming `where`: not a plan, missing entries, or a network that does not fit.
    """
    if not isinstance(config, dict):
        raise UserError(f"{where} does not hold a plan (a JSON object); re-run preprocess.py")
    missing = [key for key in ("patch_size", "spacing", "in_channels", "n_class", "labels") if key not in config]
    if missing:
        raise UserError(f"{where} has no {', '.join(missing)}; re-run preprocess.py")
    network, planner_name = plan_network_of(config, where)
    config = {key: value for key, value in config.items() if key not in LEGACY_KEYS}
    config.update(network=network.to_dict(), planner=planner_name)
    config.setdefault("dim", len(config["patch_size"]))
    config.setdefault("batch_size", planner.suggest_batch_size(config["patch_size"]))
    return config


def network_window(config: dict, dim: int | None = None) -> list[int]:
    """The network's input window: the task's patch, in-plane only for a 2D network on 3D data.

    Raises:
        UserError: a 3D network asked of a task preprocessed for 2D.
    """
    patch = [int(size) for size in config["patch_size"]]
    dim = dim or len(patch)
    if dim == 3 and len(patch) != 3:
        raise UserError(f"a 3D network needs data preprocessed with --dim 3; this task was preprocessed for 2D "
                        f"(patch {patch})")
    return patch[-dim:]


def task_network(config: dict, dim: int | None = None) -> NetworkPlan:
    """The network of a task's plan for a `dim`-D network: the plan's own, or for a 2D network on data
    preprocessed for 3D, the plan's preset planned again for the in-plane window."""
    network = NetworkPlan.from_dict(config["network"], CONFIG)
    window = network_window(config, dim)
    if len(window) == network.dim:
        return network
    try:
        return plan_network(window, list(config["spacing"])[-len(window):], config.get("planner", "default"))
    except ValueError as error:
        raise UserError(str(error)) from None
