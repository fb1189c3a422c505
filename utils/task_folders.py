"""Addressing a preprocessed task as the reference nnU-Net does: `--data ROOT --task NN --dim D` is `ROOT/NN_Dd`.

The entry points resolve `--data` and `--task` here once, when they build the loader's settings; packages receive
the resolved folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from utils.errors import UserError

PLAN_FILE = "config.json"


def task_number(task: str) -> str:
    """'1', '01', 'Task01_BrainTumour' -> '01'; other names are returned unchanged."""
    if task.isdigit():
        return f"{int(task):02d}"
    if task.startswith("Task") and task[4:6].isdigit():
        return task[4:6]
    return task


def plan_path(data: Path) -> Path | None:
    """The config.json of the task folder `data`, or of the task above its val/ or test/ folder; None if neither."""
    for folder in (data, data.parent):
        if (folder / PLAN_FILE).is_file():
            return folder / PLAN_FILE
    return None


def preprocessed_tasks(root: str | os.PathLike) -> list[str]:
    """The preprocessed task folders (`<key>_2d`, `<key>_3d` holding a config.json) directly in `root`, sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.name.endswith(("_2d", "_3d")) and (p / PLAN_FILE).is_file())


def task_folder(data: str | os.PathLike, task: str | None, dim: int | None) -> Path:
    """The preprocessed task folder that `--data` and `--task` address, as the reference nnU-Net does.

    `--data` is a preprocessed task folder (it, or the folder above it, holds config.json): it is used as given,
    whatever `--task` says. Otherwise it is the data root and `--task` a key written by preprocess.py ("01",
    "005", "kits19", the name of a 2D image set; "1" and "Task01_BrainTumour" mean "01"): the folder
    `DATA/<key>_<dim>d`, by default the 3D one (the 2D one when only that exists).

    Raises:
        UserError: one line naming the folders that do exist and the preprocess.py command that makes the missing one.
    """
    data = Path(data)
    if task is None or plan_path(data) is not None:
        return data
    keys = [task, task_number(task)]
    if task.isdigit():
        keys.append(f"{int(task):03d}")
    dims = [dim] if dim is not None else [3, 2]
    for wanted in dims:
        for key in dict.fromkeys(keys):
            if (data / f"{key}_{wanted}d" / PLAN_FILE).is_file():
                return data / f"{key}_{wanted}d"
    if not data.is_dir():
        raise UserError(f"{data} does not exist: point --data at the data root holding the preprocessed tasks "
                        f"(with --task {task}) or at a preprocessed task folder")
    wanted = f"{keys[1]}_{dims[0]}d"
    found = preprocessed_tasks(data)
    where = f"(found: {', '.join(found)})" if found else "(it holds no preprocessed task)"
    raise UserError(f"no preprocessed task {wanted} in {data} {where}; run preprocess.py --task {task} "
                    f"--dim {dims[0]} --results {data}, or point --data at a preprocessed task folder")
