"""The LightningDataModule: finds the cases of a preprocessed task, splits them into folds and
shards them across processes, and hands Lightning the DALI loaders of `dali_loader`.

Folders (docs/data_format.md): `--data` is a preprocessed task folder (`config.json`,
`<case>_x.npy`, `<case>_y.npy`). Training and evaluation use its labelled cases; prediction reads
its `test/` subfolder, or, when `--data` is itself a folder of cases below the task (e.g.
`/data/01_3d/val`), that folder, with `config.json` taken from the task above it; with --fold, a task
folder's own training cases of that fold's validation split, labels included.

Folds: sklearn's KFold with a fixed seed over the sorted case ids, so `--fold k` names the same
cases in every run whatever `--seed` is; a `splits.json` in the task folder overrides it.

Processes: training cases are dealt to ranks (`cases[rank::world]`), each rank drawing only its own,
and every rank runs the same number of steps per epoch. Validation and test cases are dealt the
same way and each rank runs exactly its own, without padding duplicates.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch.distributed as dist
from sklearn.model_selection import KFold

from data_loading.dali_iterator import DaliLoader, training_length
from data_loading.dali_loader import (
    PREFETCH_QUEUE_DEPTH,
    Augmentations,
    Device,
    benchmark_pipeline,
    select_device,
    training_pipeline,
    volume_pipeline,
)
from data_preprocessing.plans import CONFIG, network_window, read_config
from utils.errors import UserError
from utils.io import npy_nonfinite_count, npy_problem, read_npy_header
from utils.settings import LoaderSettings

IMAGE_SUFFIX = "_x.npy"
LABEL_SUFFIX = "_y.npy"
SPLITS = "splits.json"
TEST_FOLDER = "test"
VAL_FOLDER = "val"
# Fixed so that a fold is the same set of cases in every run, whatever --seed.
SPLIT_SEED = 12345
# Seeds of different ranks lie this far apart, so their augmentations are not correlated.
RANK_SEED_STRIDE = 7919
# ... and the seeds of the epochs a training can be resumed at, this far from those of the ranks.
RESUME_SEED_STRIDE = 104729


# ---------------------------------------------------------------------------------------------
# Folders, cases and folds
# ---------------------------------------------------------------------------------------------
def find_cases(folder: Path, labelled: bool) -> list[str]:
    """Sorted case ids of `folder`: each `<case>_x.npy`, paired with `<case>_y.npy` when `labelled`.

    Raises:
        UserError: the folder is missing or empty, or (labelled) an image lacks its label or a label its image.
    """
    if not folder.is_dir():
        raise UserError(f"{folder} does not exist: point --data at a preprocessed task folder such as /data/01_3d")
    images = {p.name[: -len(IMAGE_SUFFIX)] for p in folder.glob(f"*{IMAGE_SUFFIX}") if not p.name.startswith(".")}
    if labelled:
        labels = {p.name[: -len(LABEL_SUFFIX)] for p in folder.glob(f"*{LABEL_SUFFIX}") if not p.name.startswith(".")}
        for case in sorted(images - labels):
            raise UserError(f"{case}: {folder / (case + IMAGE_SUFFIX)} has no label {case + LABEL_SUFFIX}; "
                            f"re-run preprocess.py --exec_mode training or remove the image")
        for case in sorted(labels - images):
            raise UserError(f"{case}: {folder / (case + LABEL_SUFFIX)} has no image {case + IMAGE_SUFFIX}; "
                            f"re-run preprocess.py --exec_mode training or remove the label")
    if not images:
        raise UserError(f"{folder} holds no cases (<case>{IMAGE_SUFFIX}): run preprocess.py for this task first")
    return sorted(images)


def check_case(folder: Path, case: str, in_channels: int | None, labelled: bool) -> None:
    """Shapes and types from the .npy headers: image (C, D, H, W) float32, label (1, D, H, W) uint8; finite voxels."""
    image_path = folder / (case + IMAGE_SUFFIX)
    # Headers and file sizes only: a file cut short or damaged is named here rather than failing inside DALI.
    for path in (image_path, folder / (case + LABEL_SUFFIX)) if labelled else (image_path,):
        problem = npy_problem(path)
        if problem:
            raise UserError(f"{case}: {path} {problem}; re-run preprocess.py")
    image = read_npy_header(image_path)
    label = read_npy_header(folder / (case + LABEL_SUFFIX)) if labelled else None
    if len(image.shape) != 4 or image.dtype != np.float32:
        raise UserError(f"{case}: image {image_path.name} is {image.dtype} {image.shape}, expected float32 "
                        f"(C, D, H, W); re-run preprocess.py")
    if in_channels is not None and image.shape[0] != in_channels:
        raise UserError(f"{case}: image has {image.shape[0]} channels but {CONFIG} says {in_channels}; "
                        f"re-run preprocess.py")
    if label is not None and (label.dtype != np.uint8 or tuple(label.shape) != (1, *image.shape[1:])):
        raise UserError(f"{case}: image shape {tuple(image.shape)} does not match label {label.dtype} shape "
                        f"{tuple(label.shape)} (expected uint8 (1, {', '.join(map(str, image.shape[1:]))}))")
    # One pass over the image: a single NaN would otherwise turn a prediction into background or the weights
    # into NaN without any error.
    nonfinite = npy_nonfinite_count(image_path)
    if nonfinite:
        raise UserError(f"{case}: image {image_path} holds {nonfinite} NaN or infinite value(s); re-run "
                        f"preprocess.py from the raw images (with --overwrite)")


def read_splits(path: Path, cases: list[str], fold: int) -> tuple[list[str], list[str]]:
    """Training and validation cases of `fold` from a splits.json (see docs/data_format.md).

    The file is a list with one entry per fold, `{"train": [case ids], "val": [case ids]}`; without
    "train", every case not in "val" trains.
    """
    try:
        splits = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not readable JSON ({error})") from None
    if not isinstance(splits, list) or not all(isinstance(entry, dict) and "val" in entry for entry in splits):
        raise UserError(f"{path} must be a list of {{\"train\": [...], \"val\": [...]}}, one entry per fold")
    if fold >= len(splits):
        raise UserError(f"--fold {fold} is out of range: {path} defines {len(splits)} folds")
    known = set(cases)
    val = sorted(splits[fold]["val"])
    train = sorted(splits[fold]["train"]) if "train" in splits[fold] else [c for c in cases if c not in set(val)]
    for case in [*train, *val]:
        if case not in known:
            raise UserError(f"{path} fold {fold} names case {case}, which is not in {path.parent}")
    overlap = set(train) & set(val)
    if overlap:
        raise UserError(f"{path} fold {fold} has cases both in train and val: {', '.join(sorted(overlap))}")
    if not train or not val:
        raise UserError(f"{path} fold {fold} needs at least one training and one validation case")
    return train, val


def split_cases(cases: list[str], nfolds: int, fold: int) -> tuple[list[str], list[str]]:
    """Training and validation cases of `fold` of a KFold split over the sorted case ids.

    `nfolds == 1` trains and validates on all cases (a final model without held-out cases).
    """
    if fold >= nfolds:
        raise UserError(f"--fold {fold} must be smaller than --nfolds {nfolds}")
    if nfolds > len(cases):
        raise UserError(f"--nfolds {nfolds} needs at least {nfolds} cases but there are {len(cases)}; lower --nfolds")
    cases = sorted(cases)
    if nfolds == 1:
        return cases, cases
    train_index, val_index = list(KFold(n_splits=nfolds, shuffle=True, random_state=SPLIT_SEED).split(cases))[fold]
    return [cases[i] for i in train_index], [cases[i] for i in val_index]


def prediction_folders(data: Path, fold_validation: bool = False) -> tuple[Path, Path]:
    """(task folder with config.json, folder of the cases to predict) for --exec_mode predict; with
    `fold_validation` a task folder is itself the folder of cases (its training cases, narrowed to a fold)."""
    if (data / CONFIG).is_file() and fold_validation:
        return data, data
    if (data / CONFIG).is_file():
        test = data / TEST_FOLDER
        if not test.is_dir():
            raise UserError(f"{data} has no {TEST_FOLDER}/ folder: preprocess the test images with preprocess.py "
                            f"--exec_mode test, or point --data at a folder of cases such as {data / 'val'}")
        return data, test
    if (data.parent / CONFIG).is_file():
        return data.parent, data
    if not data.is_dir():
        raise UserError(f"{data} does not exist: point --data at a preprocessed task folder such as /data/01_3d")
    raise UserError(f"neither {data} nor its parent has {CONFIG}: point --data at a task folder written by "
                    f"preprocess.py")


def placement_from_environment() -> tuple[int, int, int]:
    """(global rank, world size, local rank) of this process from torch.distributed, (0, 1, 0) without it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


# ---------------------------------------------------------------------------------------------
# The data module
# ---------------------------------------------------------------------------------------------
class DataModule(pl.LightningDataModule):
    """Folds, shards and DALI loaders of a preprocessed task.

    Args:
        settings: the folder, mode, fold and sampling (`utils.settings.LoaderSettings`). The batch size is the
            task plan's unless the settings give one.
        global_rank, world_size, local_rank: this process's place; by default taken from the
            attached Trainer in `setup`, else from torch.distributed, else a single process.

    Loaders (batch contract in docs/data_format.md):
        train: `{"image": (B, C, *patch) float32, "label": (B, 1, *patch) uint8}`; 2D (B, C, H, W).
        val: whole volumes `{"image": (1, C, D, H, W), "label": (1, 1, D, H, W), "case_id": [str]}`.
        test / predict: `{"image": (1, C, D, H, W), "case_id": [str]}`.
        With --benchmark, train and test give patches without augmentation, `warmup + train_batches`
        (`warmup + test_batches`) batches per epoch, so that the timed steps follow the warmup.
    """

    def __init__(self, settings: LoaderSettings, global_rank: int | None = None, world_size: int | None = None,
                 local_rank: int | None = None) -> None:
        super().__init__()
        self.settings = settings
        self._placement = (global_rank, world_size, local_rank)
        data = Path(settings.data)
        self.predicting = settings.mode == "predict"
        if self.predicting:
            self.task_dir, self.case_dir = prediction_folders(data, settings.predict_fold)
        else:
            self.task_dir = self.case_dir = data
        # Predicting a fold's validation cases from the task folder: labelled, so that they are scored too.
        self.fold_validation = self.predicting and self.case_dir == self.task_dir
        self.config = read_config(self.task_dir)
        labelled = not self.predicting or self.fold_validation
        cases = find_cases(self.case_dir, labelled=labelled)
        in_channels = self.config.get("in_channels")
        for case in cases:
            check_case(self.case_dir, case, in_channels, labelled)
        if self.predicting:
            self.train_cases, self.val_cases = [], []
            if self.fold_validation:
                self.test_cases = self.split(cases)[1]
            else:
                self.test_cases = self.fold_cases(cases) if self.case_dir.name == VAL_FOLDER else cases
        else:
            self.train_cases, self.val_cases = self.split(cases)
            self.test_cases = []

        self.dim = settings.dim or int(self.config["dim"])
        self.patch_size = network_window(self.config, self.dim)
        self.batch_size = settings.batch_size or int(self.config["batch_size"])
        # Without --nvol: 4 volumes per 2D batch, or fewer when 4 does not divide the batch (the plan's may not).
        self.nvol = settings.nvol or max(n for n in range(1, 5) if self.batch_size % n == 0)
        if self.dim == 2 and settings.mode == "train" and self.batch_size % self.nvol:
            raise UserError(f"the batch size {self.batch_size} must be a multiple of --nvol {self.nvol} in 2D; "
                            f"set --batch_size or --nvol")
        self.seed = settings.seed if settings.seed is not None else random.SystemRandom().randrange(2**31)
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.device: Device = select_device(self.cuda_devices, 0)
        self._loaders: dict[str, DaliLoader] = {}

    @property
    def cuda_devices(self) -> int:
        """GPUs for the DALI pipelines (0: the CPU pipelines)."""
        return self.settings.cuda_devices

    def split(self, cases: list[str]) -> tuple[list[str], list[str]]:
        """Training and validation cases of --fold: from splits.json when the task has one, else K-fold."""
        splits = self.task_dir / SPLITS
        if splits.is_file():
            return read_splits(splits, cases, self.settings.fold)
        return split_cases(cases, self.settings.nfolds, self.settings.fold)

    def prediction_description(self) -> str:
        """Which cases a prediction reads, for its first line."""
        count, fold = len(self.test_cases), self.settings.fold
        if self.fold_validation:
            return f"the {count} validation cases of fold {fold} of {self.task_dir}"
        if self.case_dir.name == VAL_FOLDER:
            return f"the {count} cases of {self.case_dir} in the validation split of fold {fold}"
        kind = "test " if self.case_dir.name == TEST_FOLDER else ""
        return f"the {count} {kind}cases of {self.case_dir}"

    def fold_cases(self, cases: list[str]) -> list[str]:
        """Of the cases in a val/ folder, those in the validation split of --fold (all of them when the
        task folder holds no training cases to split)."""
        try:
            training = find_cases(self.task_dir, labelled=True)
        except UserError:
            return cases
        validation = set(self.split(training)[1])
        return [case for case in cases if case in validation]

    # -----------------------------------------------------------------------------------------
    # Process placement and shards
    # -----------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        rank, world, local = self._placement
        if rank is None or world is None:
            if self.trainer is not None:
                rank, world, local = self.trainer.global_rank, self.trainer.world_size, self.trainer.local_rank
            else:
                rank, world, local = placement_from_environment()
        local = 0 if local is None else local
        if (rank, world, local) != (self.rank, self.world_size, self.local_rank):
            self._loaders.clear()
        self.rank, self.world_size, self.local_rank = rank, world, local
        self.device = select_device(self.cuda_devices, local)
        if not self.predicting:
            for what, cases in (("training", self.train_cases), ("validation", self.val_cases)):
                if len(cases) < world:
                    raise UserError(f"fold {self.settings.fold} has {len(cases)} {what} cases for {world} processes; "
                                    f"use fewer GPUs or processes, or a smaller --nfolds")
        elif len(self.test_cases) < world:
            raise UserError(f"{self.case_dir} has {len(self.test_cases)} cases for {world} processes; "
                            f"predict with fewer GPUs or processes")

    def teardown(self, stage: str | None = None) -> None:
        # DALI pipelines hold worker threads and buffers until released.
        self._loaders.clear()

    def shard(self, cases: list[str]) -> list[str]:
        """This rank's share of `cases`: every world_size-th case from its rank."""
        return cases[self.rank :: self.world_size]

    @property
    def train_shard(self) -> list[str]:
        return self.shard(self.train_cases)

    @property
    def val_shard(self) -> list[str]:
        return self.shard(self.val_cases)

    @property
    def test_shard(self) -> list[str]:
        return self.shard(self.test_cases)

    # -----------------------------------------------------------------------------------------
    # Loaders
    # -----------------------------------------------------------------------------------------
    def train_dataloader(self) -> DaliLoader:
        if "train" not in self._loaders:
            self._loaders["train"] = self._benchmark_loader(self.train_shard, True) if self.settings.benchmark \
                else self._training_loader()
        return self._loaders["train"]

    def val_dataloader(self) -> DaliLoader:
        if "val" not in self._loaders:
            self._loaders["val"] = self._volume_loader(self.val_shard, labelled=True)
        return self._loaders["val"]

    def test_dataloader(self) -> DaliLoader:
        if not self.predicting:
            raise UserError("test cases are read with --exec_mode predict (from the task's test/ folder)")
        if "test" not in self._loaders:
            self._loaders["test"] = self._benchmark_loader(self.test_shard, False) if self.settings.benchmark \
                else self._volume_loader(self.test_shard, labelled=self.fold_validation)
        return self._loaders["test"]

    def predict_dataloader(self) -> DaliLoader:
        return self.test_dataloader()

    def _files(self, cases: list[str], suffix: str) -> list[str]:
        return [str(self.case_dir / (case + suffix)) for case in cases]

    def _pipeline_options(self, batch_size: int) -> dict:
        return dict(batch_size=batch_size, num_threads=self.settings.num_workers, device_id=self.device.device_id,
                    seed=(self.seed + RANK_SEED_STRIDE * self.rank) % 2**31, prefetch_queue_depth=PREFETCH_QUEUE_DEPTH)

    def _volumes_per_step(self) -> tuple[int, list[int]]:
        """Volumes drawn per step and the crop of each: the patch in 3D, a slab (S, H, W) in 2D.

        In 2D, training draws --nvol volumes of batch_size // nvol slices each; prediction patches
        (the predict benchmark) have no labels to spread over volumes, so each of batch_size volumes
        gives one slice.
        """
        if self.dim == 3:
            return self.batch_size, list(self.patch_size)
        volumes = self.batch_size if self.predicting else self.nvol
        return volumes, [self.batch_size // volumes, *self.patch_size]

    def _training_loader(self) -> DaliLoader:
        volumes, crop_shape = self._volumes_per_step()
        cases = self.train_shard
        options = self._pipeline_options(volumes)
        # A run resumed at epoch e draws from a stream of its own rather than replaying epoch 0's patches
        # (DALI's random state is not in the checkpoint); a run from scratch (e = 0) is unchanged.
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        options["seed"] = (options["seed"] + RESUME_SEED_STRIDE * epoch) % 2**31
        pipeline = training_pipeline(
            image_files=self._files(cases, IMAGE_SUFFIX), label_files=self._files(cases, LABEL_SUFFIX),
            crop_shape=crop_shape, oversampling=self.settings.oversampling,
            augment=Augmentations(rotation=self.settings.rotation), device=self.device,
            shuffle_seed=options["seed"], planar=self.dim == 2, **options)
        length = training_length(len(self.train_cases), volumes, self.world_size, self.settings.train_batches)
        return DaliLoader(pipeline, ["image", "label"], length, slabs=self.dim == 2)

    def _benchmark_loader(self, cases: list[str], labelled: bool) -> DaliLoader:
        volumes, crop_shape = self._volumes_per_step()
        options = self._pipeline_options(volumes)
        pipeline = benchmark_pipeline(
            image_files=self._files(cases, IMAGE_SUFFIX),
            label_files=self._files(cases, LABEL_SUFFIX) if labelled else None,
            crop_shape=crop_shape, device=self.device, shuffle_seed=options["seed"], planar=self.dim == 2,
            **options)
        if labelled:
            timed = training_length(len(self.train_cases), volumes, self.world_size, self.settings.train_batches)
        else:
            timed = self.settings.test_batches or len(cases)
        keys = ["image", "label"] if labelled else ["image"]
        return DaliLoader(pipeline, keys, self.settings.warmup + timed, slabs=self.dim == 2)

    def _volume_loader(self, cases: list[str], labelled: bool) -> DaliLoader:
        if self.settings.test_batches:
            # The reader then cycles through exactly the cases of one epoch.
            cases = cases[: self.settings.test_batches]
        pipeline = volume_pipeline(
            image_files=self._files(cases, IMAGE_SUFFIX),
            label_files=self._files(cases, LABEL_SUFFIX) if labelled else None,
            device=self.device, **self._pipeline_options(1))
        keys = ["image", "label", "path"] if labelled else ["image", "path"]
        return DaliLoader(pipeline, keys, len(cases), ordered=True)
