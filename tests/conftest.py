"""Fixtures shared by the test folders: a tiny synthetic task, raw and preprocessed once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from data_preprocessing.preprocessor import preprocess_task
from data_preprocessing.synthetic import make_synthetic_task


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` are skipped on a machine without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


# A small network for the training tests: four levels of 8 to 64 channels.
TINY_FILTERS = ["--filters", "8", "16", "32", "64"]


@dataclass(frozen=True)
class SyntheticTask:
    raw: Path  # the folder holding Task00_Synthetic
    data: Path  # the folder holding 00_3d and 00_2d

    @property
    def task_dir(self) -> Path:
        return self.raw / "Task00_Synthetic"

    def preprocessed(self, dim: int = 3) -> Path:
        return self.data / f"00_{dim}d"


@pytest.fixture(scope="session")
def synthetic_task(tmp_path_factory: pytest.TempPathFactory) -> SyntheticTask:
    """Task 00 at the smallest size: 8 training and 2 test cases of about 32^3, preprocessed for 3D and
    2D (training and test modes). Tests must not modify it; copy it first."""
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_task(root / "raw", seed=0, n_cases=8, n_test=2, size=32)
    for dim in (3, 2):
        for mode in ("training", "test"):
            preprocess_task(root / "raw", root / "data", "00", dim=dim, exec_mode=mode)
    return SyntheticTask(root / "raw", root / "data")


def train_argv(data: Path, results: Path, *extra: str) -> list[str]:
    """main.py arguments for a short, reproducible CPU training run of the tiny network (batch 2)."""
    return ["--exec_mode", "train", "--data", str(data), "--results", str(results), "--nfolds", "4",
            "--num_workers", "2", "--seed", "0", "--batch_size", "2", *TINY_FILTERS, *extra]


def module_from_argv(argv: list[str], config: dict):
    """The LightningModule main.py would train for these arguments on a task with this (partial) config."""
    from data_preprocessing.plans import complete_config
    from nnunet.nn_unet import NNUnet, model_settings
    from utils import args as cli

    args = cli.parse_main_args(argv)
    config = complete_config(config, "the test's config")
    model = model_settings(config, args.dim, cli.model_flags(args), cli.targets(args), args.focal)
    return NNUnet(config, model, cli.optim_settings(args), cli.inference_settings(args))


@pytest.fixture(scope="session")
def trained(synthetic_task: SyntheticTask, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results folder after two short epochs with checkpoints (last.ckpt and best.ckpt)."""
    import main

    results = tmp_path_factory.mktemp("trained")
    argv = train_argv(synthetic_task.preprocessed(3), results, "--epochs", "2", "--train_batches", "10",
                      "--learning_rate", "5e-3", "--save_ckpt")
    assert main.main(argv) == 0
    return results
