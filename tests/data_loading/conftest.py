"""Tiny preprocessed task folders (docs/data_format.md) built with np.save, and parsed arguments."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from utils.args import loader_settings, main_parser
from utils.settings import LoaderSettings

SHAPE = (24, 32, 32)
PATCH = (16, 16, 16)
CHANNELS = 2
# The blob of `blob_label`: voxels [start, end) along (D, H, W).
BLOB = ((10, 12), (4, 6), (20, 22))


def blob_label(shape=SHAPE, blob=BLOB, value: int = 1) -> np.ndarray:
    """(1, D, H, W) uint8 background with one small box of `value`."""
    label = np.zeros((1, *shape), np.uint8)
    label[0, blob[0][0]:blob[0][1], blob[1][0]:blob[1][1], blob[2][0]:blob[2][1]] = value
    return label


def write_case(folder: Path, case: str, image: np.ndarray | None, label: np.ndarray | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if image is not None:
        np.save(folder / f"{case}_x.npy", image.astype(np.float32))
    if label is not None:
        np.save(folder / f"{case}_y.npy", label.astype(np.uint8))


def write_config(folder: Path, patch=PATCH, channels: int = CHANNELS, dim: int | None = None, n_class: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "task": "99", "task_name": "Task99_Test", "dim": dim or len(patch), "in_channels": channels,
        "modalities": {str(c): "MRI" for c in range(channels)},
        "labels": {str(k): f"class{k}" for k in range(n_class)}, "n_class": n_class,
        "spacing": [1.0] * len(patch), "patch_size": list(patch), "batch_size": 2,
    }
    (folder / "config.json").write_text(json.dumps(config))


def indexed_image(index: int, shape=SHAPE, channels: int = CHANNELS, seed: int = 0) -> np.ndarray:
    """Channel 0: noise; channel 1: the constant `index + 1`, so a patch tells which case it came from."""
    image = np.random.default_rng(seed + index).normal(size=(channels, *shape)).astype(np.float32)
    image[1] = index + 1
    return image


@pytest.fixture
def make_task(tmp_path: Path) -> Callable[..., Path]:
    """Builder of a labelled task folder: `make_task(n_cases=6, ...)` -> folder."""

    def build(n_cases: int = 6, shape=SHAPE, patch=PATCH, channels: int = CHANNELS, name: str = "99_3d",
              label: Callable[[int], np.ndarray] | None = None,
              image: Callable[[int], np.ndarray] | None = None, test_cases: int = 0) -> Path:
        folder = tmp_path / name
        write_config(folder, patch, channels)
        for index in range(n_cases):
            case_image = image(index) if image else indexed_image(index, shape, channels)
            case_label = label(index) if label else blob_label(shape, value=1 + index % 2)
            write_case(folder, f"case_{index:03d}", case_image, case_label)
        for index in range(test_cases):
            write_case(folder / "test", f"test_{index:03d}", indexed_image(100 + index, shape, channels), None)
        return folder

    return build


def make_args(data: Path, *extra: str, **overrides) -> LoaderSettings:
    """Loader settings of `main_parser()` arguments for `data` with small defaults for tests; keyword overrides
    (LoaderSettings fields) win."""
    args = main_parser().parse_args(["--data", str(data), "--num_workers", "2", "--seed", "1", *extra])
    return loader_settings(args).replace(**overrides)
