"""DataModule: case discovery, folds, errors, sharding across ranks, determinism, and a run in Lightning."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from data_loading.data_module import SPLIT_SEED, DataModule, split_cases
from tests.data_loading.conftest import PATCH, SHAPE, indexed_image, make_args, write_case, write_config
from utils.args import loader_settings, parse_main_args
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def module(data: Path, *extra: str, rank: int | None = None, world: int | None = None, **overrides) -> DataModule:
    dm = DataModule(make_args(data, *extra, **overrides), global_rank=rank, world_size=world)
    dm.setup("fit")
    return dm


def case_numbers(loader) -> list[int]:
    """Case index of each sample, read from the image's constant channel 1 (index + 1)."""
    return [int(round(float(image[1].median()))) - 1 for batch in loader for image in batch["image"]]


# ---------------------------------------------------------------------------------------------
# Cases and folds
# ---------------------------------------------------------------------------------------------
def test_folds_are_a_fixed_kfold_whatever_the_seed(make_task) -> None:
    data = make_task(n_cases=10)
    folds = [module(data, "--fold", str(k), "--nfolds", "5", seed=k) for k in range(5)]
    cases = [f"case_{i:03d}" for i in range(10)]
    for dm in folds:
        assert sorted(dm.train_cases + dm.val_cases) == cases and not set(dm.train_cases) & set(dm.val_cases)
    assert sorted(c for dm in folds for c in dm.val_cases) == cases  # each case validates exactly once
    again = module(data, "--fold", "2", "--nfolds", "5", seed=99)
    assert again.val_cases == folds[2].val_cases
    # The split is sklearn's KFold with the fixed seed over the sorted ids.
    from sklearn.model_selection import KFold

    expected = [cases[i] for i in list(KFold(5, shuffle=True, random_state=SPLIT_SEED).split(cases))[2][1]]
    assert folds[2].val_cases == expected


def test_one_fold_trains_and_validates_on_all_cases() -> None:
    cases = ["b", "a", "c"]
    assert split_cases(cases, 1, 0) == (["a", "b", "c"], ["a", "b", "c"])


def test_splits_file_overrides_kfold(make_task) -> None:
    data = make_task(n_cases=6)
    splits = [{"val": ["case_000", "case_005"]}, {"train": ["case_001", "case_002"], "val": ["case_003"]}]
    (data / "splits.json").write_text(json.dumps(splits))
    dm = module(data, "--fold", "0")
    assert dm.val_cases == ["case_000", "case_005"]
    assert dm.train_cases == ["case_001", "case_002", "case_003", "case_004"]
    dm = module(data, "--fold", "1")
    assert (dm.train_cases, dm.val_cases) == (["case_001", "case_002"], ["case_003"])
    with pytest.raises(UserError, match="defines 2 folds"):
        module(data, "--fold", "2")
    (data / "splits.json").write_text(json.dumps([{"val": ["case_042"]}]))
    with pytest.raises(UserError, match="case_042"):
        module(data)
    (data / "splits.json").write_text(json.dumps([{"train": ["case_001"], "val": ["case_001"]}]))
    with pytest.raises(UserError, match="both in train and val"):
        module(data)


def test_errors_name_the_folder_or_case(make_task, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        module(tmp_path / "missing")
    empty = tmp_path / "empty"
    write_config(empty)
    with pytest.raises(UserError, match="holds no cases"):
        module(empty)
    data = make_task(n_cases=4)
    (data / "case_001_y.npy").unlink()
    with pytest.raises(UserError, match="case_001.*has no label"):
        module(data)
    data = make_task(n_cases=4, name="other")
    (data / "case_002_x.npy").unlink()
    with pytest.raises(UserError, match="case_002.*has no image"):
        module(data)
    (data / "config.json").unlink()
    with pytest.raises(UserError, match="no config.json"):
        module(data)


def test_fold_errors(make_task) -> None:
    data = make_task(n_cases=4)
    with pytest.raises(UserError, match="--fold 5 must be smaller than --nfolds 5"):
        module(data, "--fold", "5")
    with pytest.raises(UserError, match="--nfolds 5 needs at least 5 cases but there are 4"):
        module(data, "--nfolds", "5")


def test_dimension_errors(make_task) -> None:
    data = make_task(n_cases=3, patch=(16, 16), name="99_2d")
    assert module(data, "--nfolds", "3", "--nvol", "2").patch_size == [16, 16]  # the plan's dimension by default
    with pytest.raises(UserError, match="a 3D network needs data preprocessed with --dim 3"):
        module(data, "--nfolds", "3", "--dim", "3")


def test_shape_errors(make_task) -> None:
    data = make_task(n_cases=3)
    write_case(data, "case_001", None, np.zeros((1, 24, 32, 30), np.uint8))
    with pytest.raises(UserError, match=r"case_001: image shape \(2, 24, 32, 32\) does not match label"):
        module(data, "--nfolds", "3")
    data = make_task(n_cases=3, name="channels")
    write_case(data, "case_000", np.zeros((3, *SHAPE), np.float32), None)
    with pytest.raises(UserError, match="case_000: image has 3 channels but config.json says 2"):
        module(data, "--nfolds", "3")


def test_prediction_folders(make_task, tmp_path: Path) -> None:
    data = make_task(n_cases=3, test_cases=2)
    dm = module(data, "--exec_mode", "predict")
    assert dm.case_dir == data / "test" and dm.test_cases == ["test_000", "test_001"]
    out = list(dm.predict_dataloader())
    assert [b["case_id"] for b in out] == [["test_000"], ["test_001"]]
    assert out[0]["image"].shape == (1, 2, *SHAPE) and "label" not in out[0]
    # A folder of cases below the task is predicted with the task's config; one named val/ gives the
    # validation cases of --fold.
    for index in range(3):
        write_case(data / "val", f"case_{index:03d}", indexed_image(index), None)
    dm = module(data / "val", "--exec_mode", "predict", "--nfolds", "3", "--fold", "1")
    assert dm.task_dir == data and dm.test_cases == split_cases([f"case_{i:03d}" for i in range(3)], 3, 1)[1]
    write_case(data / "other", "case_007", indexed_image(7), None)
    assert module(data / "other", "--exec_mode", "predict").test_cases == ["case_007"]
    without_test = make_task(n_cases=3, name="no_test")
    with pytest.raises(UserError, match="has no test/ folder"):
        module(without_test, "--exec_mode", "predict")
    with pytest.raises(UserError, match="--exec_mode predict"):
        module(data, "--nfolds", "3").test_dataloader()


# ---------------------------------------------------------------------------------------------
# Loaders through the module
# ---------------------------------------------------------------------------------------------
def test_loader_shapes_and_lengths_3d(make_task) -> None:
    data = make_task(n_cases=10)
    dm = module(data, "--batch_size", "2")
    train = dm.train_dataloader()
    assert len(train) == 4  # ceil(8 training cases / 2 per step)
    out = list(train)
    assert len(out) == 4
    assert out[0]["image"].shape == (2, 2, *PATCH) and out[0]["label"].shape == (2, 1, *PATCH)
    val = list(dm.val_dataloader())
    assert len(dm.val_dataloader()) == 2 and [b["case_id"][0] for b in val] == dm.val_cases
    assert val[0]["image"].shape == (1, 2, *SHAPE) and val[0]["label"].shape == (1, 1, *SHAPE)
    assert len(module(data, "--train_batches", "3").train_dataloader()) == 3
    assert len(module(data, "--test_batches", "1").val_dataloader()) == 1


def test_loader_shapes_2d(make_task) -> None:
    data = make_task(n_cases=6)
    dm = module(data, "--dim", "2", "--batch_size", "6", "--nvol", "2")
    assert dm.patch_size == [16, 16]
    train = dm.train_dataloader()
    assert len(dm.train_cases) == 4 and len(train) == 2  # ceil(4 training cases / 2 volumes per step)
    batch = next(iter(train))
    assert batch["image"].shape == (6, 2, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (6, 1, 16, 16) and batch["label"].dtype == torch.uint8
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (1, 2, *SHAPE)
    with pytest.raises(UserError, match="multiple of --nvol"):
        module(data, "--dim", "2", "--batch_size", "5", "--nvol", "2")


def test_2d_volumes_per_batch_default_to_a_divisor_of_the_batch(make_task) -> None:
    data = make_task(n_cases=6)
    assert [module(data, "--dim", "2", "--batch_size", size).nvol for size in ("8", "6", "5")] == [4, 3, 1]


def test_benchmark_loaders(make_task) -> None:
    data = make_task(n_cases=4, test_cases=2)
    dm = module(data, "--benchmark", "--train_batches", "3", "--warmup", "2", "--nfolds", "2")
    train = list(dm.train_dataloader())
    assert len(train) == 5 and train[0]["image"].shape == (2, 2, *PATCH) and "label" in train[0]
    dm = module(data, "--exec_mode", "predict", "--benchmark", "--test_batches", "4", "--warmup", "1",
                "--batch_size", "3")
    test = list(dm.test_dataloader())
    assert len(test) == 5 and test[0]["image"].shape == (3, 2, *PATCH) and set(test[0]) == {"image"}


@pytest.mark.parametrize("batch_size", [2, 6])
def test_2d_predict_benchmark_batches_hold_batch_size_slices(synthetic_task, batch_size: int) -> None:
    # --nvol (default 4) only splits training batches; prediction patches are one slice of each volume.
    data = synthetic_task.preprocessed(2)
    dm = DataModule(loader_settings(parse_main_args([
        "--benchmark", "--exec_mode", "predict", "--data", str(data), "--dim", "2", "--batch_size", str(batch_size),
        "--test_batches", "2", "--warmup", "1", "--num_workers", "1", "--seed", "0"])))
    dm.setup("predict")
    channels, patch = dm.config["in_channels"], dm.patch_size
    assert [tuple(b["image"].shape) for b in dm.predict_dataloader()] == [(batch_size, channels, *patch)] * 3


def foreground_per_patch(data: Path, oversampling: str) -> list[bool]:
    """Whether each training patch of 8 batches of 2 (seed 0) holds any foreground."""
    loader = module(data, "--nfolds", "2", "--batch_size", "2", "--train_batches", "8", "--oversampling",
                    oversampling, "--seed", "0").train_dataloader()
    return [bool(label.amax() > 0) for batch in loader for label in batch["label"]]


def test_oversampling_flag_sets_the_foreground_patches(make_task, monkeypatch) -> None:
    from data_loading import dali_loader

    # Zoom, rotation and scaling can move the blob out of a patch; flips and intensity changes cannot.
    for name in ("ZOOM_PROB", "ROTATION_PROB", "SCALE_PROB"):
        monkeypatch.setattr(dali_loader, name, 0.0)
    data = make_task(n_cases=4)
    always = foreground_per_patch(data, "1.0")
    assert len(always) == 16 and all(always)
    # A uniform 16^3 patch holds the 2^3 blob about one time in five: with this seed some of 16 patches miss it.
    assert not all(foreground_per_patch(data, "0"))


def test_pipelines_run_num_workers_threads(make_task, monkeypatch) -> None:
    from data_loading import data_module

    built = []
    for name in ("training_pipeline", "benchmark_pipeline", "volume_pipeline"):
        def record(*args, _build=getattr(data_module, name), **kwargs):
            built.append(_build(*args, **kwargs))
            return built[-1]

        monkeypatch.setattr(data_module, name, record)
    data = make_task(n_cases=4, test_cases=1)
    dm = module(data, "--nfolds", "2", "--num_workers", "3")
    dm.train_dataloader(), dm.val_dataloader()
    module(data, "--nfolds", "2", "--num_workers", "3", "--benchmark").train_dataloader()
    module(data, "--exec_mode", "predict", "--num_workers", "3").predict_dataloader()
    assert len(built) == 4 and [pipeline.num_threads for pipeline in built] == [3] * 4


def test_no_rotation_flag_turns_rotation_off(make_task, monkeypatch) -> None:
    from data_loading import dali_loader

    for name in ("ROTATION_PROB", "SCALE_PROB"):
        monkeypatch.setattr(dali_loader, name, 1.0)
    for name in ("ZOOM_PROB", "NOISE_PROB", "BLUR_PROB", "BRIGHTNESS_PROB", "CONTRAST_PROB"):
        monkeypatch.setattr(dali_loader, name, 0.0)
    data = make_task(n_cases=4)
    rotated = list(module(data, "--nfolds", "2", "--train_batches", "2").train_dataloader())
    plain = list(module(data, "--nfolds", "2", "--train_batches", "2", "--no_rotation").train_dataloader())
    # Channel 1 is constant per case: only a rotation or scaling (with its 0 fill) makes it vary.
    assert all(torch.all(b["image"][:, 1] >= 1) for b in plain)
    assert any(torch.any(b["image"][:, 1] < 1) for b in rotated)


# ---------------------------------------------------------------------------------------------
# Ranks and determinism
# ---------------------------------------------------------------------------------------------
def test_two_ranks_get_disjoint_shards_that_cover_the_fold(make_task, monkeypatch) -> None:
    from data_loading import dali_loader

    for name in ("ROTATION_PROB", "SCALE_PROB", "NOISE_PROB", "BLUR_PROB", "BRIGHTNESS_PROB", "CONTRAST_PROB"):
        monkeypatch.setattr(dali_loader, name, 0.0)  # keep channel 1 readable as the case index
    data = make_task(n_cases=10)
    ranks = [module(data, "--batch_size", "2", rank=r, world=2) for r in range(2)]
    train = [set(dm.train_shard) for dm in ranks]
    val = [set(dm.val_shard) for dm in ranks]
    assert not train[0] & train[1] and train[0] | train[1] == set(ranks[0].train_cases)
    assert not val[0] & val[1] and val[0] | val[1] == set(ranks[0].val_cases)
    lengths = {len(dm.train_dataloader()) for dm in ranks}
    assert lengths == {2}  # ceil(8 / (2 * 2)), the same on both ranks
    for dm, shard in zip(ranks, train):
        seen = {f"case_{i:03d}" for i in case_numbers(dm.train_dataloader())}
        assert seen <= shard and len(seen) == len(shard)  # one epoch of 4 draws visits its 4 cases
    for dm, shard in zip(ranks, val):
        ids = [b["case_id"][0] for b in dm.val_dataloader()]
        assert sorted(ids) == sorted(shard) and len(dm.val_dataloader()) == len(shard)


def test_more_ranks_than_cases_is_an_error(make_task) -> None:
    data = make_task(n_cases=4)
    with pytest.raises(UserError, match="validation cases for 2 processes"):
        module(data, "--nfolds", "4", rank=0, world=2)


def test_same_seed_same_batches_other_seed_other_batches(make_task) -> None:
    data = make_task(n_cases=6)

    def first_batches(seed: int) -> list[dict]:
        return list(module(data, "--train_batches", "3", seed=seed).train_dataloader())

    first, again, other = first_batches(5), first_batches(5), first_batches(6)
    for a, b in zip(first, again):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(first, other))


# ---------------------------------------------------------------------------------------------
# Lightning
# ---------------------------------------------------------------------------------------------
class TinyModel(pl.LightningModule):
    """One convolution; records what each epoch saw."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(2, 3, 1)
        self.train_steps: dict[int, int] = {}
        self.val_cases: dict[int, list[str]] = {}

    def training_step(self, batch, batch_idx):
        self.train_steps[self.current_epoch] = self.train_steps.get(self.current_epoch, 0) + 1
        logits = self.conv(batch["image"])
        return torch.nn.functional.cross_entropy(logits, batch["label"][:, 0].long())

    def validation_step(self, batch, batch_idx):
        self.val_cases.setdefault(self.current_epoch, []).extend(batch["case_id"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_fit_two_epochs(make_task, capfd) -> None:
    data = make_task(n_cases=10)
    dm = DataModule(make_args(data, "--batch_size", "2"))
    model = TinyModel()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, limit_val_batches=1.0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, use_distributed_sampler=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm)
    messages = [str(w.message) for w in caught] + [capfd.readouterr().err]
    assert not any("reset" in m.lower() for m in messages)
    assert model.train_steps == {0: 4, 1: 4}
    assert {epoch: sorted(cases) for epoch, cases in model.val_cases.items()} == {0: dm.val_cases, 1: dm.val_cases}
    # Validation cut short by Lightning: every epoch still starts with the first case.
    model = TinyModel()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=2, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, use_distributed_sampler=False)
    trainer.fit(model, datamodule=dm)
    assert model.train_steps == {0: 2, 1: 2}
    assert model.val_cases == {0: dm.val_cases[:1], 1: dm.val_cases[:1]}


DDP_SCRIPT = textwrap.dedent("""
    import json, sys
    import pytorch_lightning as pl
    sys.path[:0] = [{repo!r}]
    from data_loading.data_module import DataModule
    from tests.data_loading.conftest import make_args
    from tests.data_loading.test_data_module import TinyModel

    if __name__ == "__main__":
        dm = DataModule(make_args({data!r}, "--batch_size", "2", "--num_workers", "1"))
        model = TinyModel()
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, use_distributed_sampler=False)
        trainer.fit(model, datamodule=dm)
        with open({out!r} + f".{{trainer.global_rank}}", "w") as handle:
            json.dump({{"steps": model.train_steps, "val": model.val_cases, "train_shard": dm.train_shard,
                       "val_cases": dm.val_cases}}, handle)
""")


def test_ddp_two_cpu_processes(make_task, tmp_path: Path) -> None:
    data = make_task(n_cases=10)
    out = tmp_path / "rank"
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO), data=str(data), out=str(out)))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == {"0": 2, "1": 2}  # ceil(8 / (2 * 2)) on both ranks
    assert not set(ranks[0]["train_shard"]) & set(ranks[1]["train_shard"])
    for epoch in ("0", "1"):
        seen = ranks[0]["val"][epoch] + ranks[1]["val"][epoch]
        assert sorted(seen) == ranks[0]["val_cases"]  # every validation case exactly once over both ranks
