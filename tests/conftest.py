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


@pytest.fixture(scope="session")
def model_package(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model package of the `trained` network as two folds (0: best.ckpt; 1: last.ckpt with its weights
    perturbed, so that the two predict differently whichever epoch was best), with the largest-foreground-component
    postprocessing. Tests must not modify it; copy it first."""
    from nnunet.checkpoints import read_checkpoint, stored_settings
    from nnunet.package import Postprocessing, write_package

    checkpoints = trained / "checkpoints"
    config, _, _ = stored_settings(read_checkpoint(checkpoints / "best.ckpt"), checkpoints / "best.ckpt")
    folder = tmp_path_factory.mktemp("package")
    other = read_checkpoint(checkpoints / "last.ckpt")
    generator = torch.Generator().manual_seed(0)
    for tensor in other["state_dict"].values():
        if tensor.is_floating_point() and tensor.numel() > 1:
            tensor += 0.3 * tensor.std() * torch.randn(tensor.shape, generator=generator)
    torch.save(other, folder / "perturbed.ckpt")
    return write_package(folder / "package", config["task"], config["task_name"], config["labels"], None,
                         {"3d": (config, {0: checkpoints / "best.ckpt", 1: folder / "perturbed.ckpt"})},
                         Postprocessing(foreground_largest_component=True), {}, "two folds for the tests",
                         zip_it=False)
