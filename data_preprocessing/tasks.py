"""Opening a raw task whatever its layout: MSD, nnU-Net v2, KiTS19, or a folder of 2D images.

`open_task` is the one entry: it finds the task's folder (`layouts.locate_task`) and reads it with the
reader of its layout (`layouts`), converting a folder of 2D images once into one-slice NIfTI volumes
(`images2d`).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from data_preprocessing import configs
from data_preprocessing.layouts import (
    KITS19,
    PreprocessingError,
    RawTask,
    locate_task,
    read_json_object,
    read_kits19,
    read_msd,
    read_v2,
)
from utils.io import load_json


def open_task(data: str | os.PathLike, task: str, results: str | os.PathLike, dim: int | None = None,
              kits_recipe: str = configs.KITS19_DEFAULT_RECIPE, overwrite: bool = False) -> RawTask:
    """Find and read the raw task of `--task` in `--data`, whatever its layout.

    Args:
        data: the folder holding the raw task folders (for KiTS19: the folder of its case folders).
        task: `--task`: a number, a folder name, or "kits19".
        results: the output root; a folder of 2D images is converted once into `RESULTS/<name>_2d/nifti`.
        dim: the requested dimension, or None for the layout's default (3; 2 for 2D images).
        kits_recipe: the KiTS19 rules, a key of `configs.KITS19_RECIPES`.
        overwrite: convert 2D images again even where a converted file exists.

    Raises:
        PreprocessingError: the task cannot be found or its description is invalid.
    """
    if task.lower() == KITS19:
        return read_kits19(data, kits_recipe, dim)
    folder = locate_task(data, task)
    if (folder / "images").is_dir() and (folder / "masks").is_dir():
        from data_preprocessing import images2d  # Pillow is only needed for this layout

        if dim not in (None, 2):
            raise PreprocessingError(f"{folder} holds 2D images: preprocess it with --dim 2 (or without --dim)")
        converted = images2d.convert_folder(folder, Path(results) / f"{folder.name}_2d" / images2d.CONVERTED,
                                            overwrite)
        raw = read_msd(converted, dim=2)
        return replace(raw, name=folder.name, key=folder.name, layout="images2d", zscore_nonzero=False,
                       png_masks=load_json(converted / "dataset.json").get("png_masks"))
    path = folder / "dataset.json"
    if not path.is_file():
        raise PreprocessingError(f"{path} is missing: a task folder needs a dataset.json (MSD or nnU-Net v2), "
                                 f"or images/ and masks/ folders of 2D images")
    dataset = read_json_object(path)
    if "channel_names" in dataset:
        return read_v2(folder, dataset, dim)
    return read_msd(folder, dataset, dim)
