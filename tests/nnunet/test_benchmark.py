"""Benchmark mode (`main.py --benchmark`): timed steps after the warmup, perf.json, DLLogger record, errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

import main
from nnunet import benchmark as benchmark_module
from nnunet.benchmark import PERF_FILE, RandomBatches, StepTimer, benchmark_loader, random_batch, task_plan
from tests.conftest import TINY_FILTERS
from utils import logger
from utils.args import loader_settings, parse_main_args
from utils.logger import read_logs, time_batches

KEYS = {"mode", "device", "devices", "dim", "patch_size", "in_channels", "batch_size", "global_batch_size", "amp",
        "amp_dtype", "warmup", "steps", "data", "throughput", "latency_mean", "latency_90", "latency_95", "latency_99",
        "peak_memory_mib"}


class StepCounter(pl.Callback):
    """Counts every training and prediction step the benchmark's trainer runs, warmup included."""

    def __init__(self) -> None:
        self.counts = {"train": 0, "predict": 0}

    def on_train_batch_end(self, *args) -> None:
        self.counts["train"] += 1

    def on_predict_batch_end(self, *args) -> None:
        self.counts["predict"] += 1


def check_record(record: dict, steps: int, batch: int) -> None:
    assert KEYS <= set(record)
    assert record["steps"] == steps and record["global_batch_size"] == batch and record["device"] == "cpu"
    # Throughput is the global batch over the mean step time.
    assert record["throughput"] == pytest.approx(batch / (record["latency_mean"] / 1000))
    assert 0 < record["latency_90"] <= record["latency_95"] <= record["latency_99"]


def test_train_on_random_volumes_times_the_steps_after_the_warmup(tmp_path: Path) -> None:
    counter = StepCounter()
    counts = counter.counts
    argv = ["--benchmark", "--exec_mode", "train", "--task", "04", "--train_batches", "3", "--warmup", "2",
            "--batch_size", "2", "--results", str(tmp_path), "--seed", "0", *TINY_FILTERS]
    assert main.main(argv, callbacks=[counter]) == 0
    assert counts["train"] == 5  # 2 warmup + 3 timed
    record = json.loads((tmp_path / PERF_FILE).read_text())
    check_record(record, steps=3, batch=2)
    assert record["mode"] == "train" and record["patch_size"] == [40, 56, 40] and record["in_channels"] == 1
    assert record["amp_dtype"] is None and record["peak_memory_mib"] is None  # FP32; no CUDA memory on the CPU
    logged = [r for r in read_logs(tmp_path / "logs.json") if r["step"] == "benchmark"]
    assert len(logged) == 1 and logged[0]["data"]["throughput"] == pytest.approx(record["throughput"])
    assert not list(tmp_path.glob(".*tmp"))  # perf.json was written atomically


def test_predict_2d_with_amp_on_random_volumes(tmp_path: Path) -> None:
    counter = StepCounter()
    counts = counter.counts
    argv = ["--benchmark", "--exec_mode", "predict", "--task", "04", "--dim", "2", "--test_batches", "4",
            "--warmup", "1", "--batch_size", "4", "--amp", "--results", str(tmp_path), *TINY_FILTERS]
    assert main.main(argv, callbacks=[counter]) == 0
    assert counts["predict"] == 5
    record = json.loads((tmp_path / PERF_FILE).read_text())
    check_record(record, steps=4, batch=4)
    assert record["dim"] == 2 and record["patch_size"] == [56, 40] and record["amp"] is True
    assert record["amp_dtype"] == "bf16"


@pytest.mark.parametrize("mode", ["train", "predict"])
def test_on_a_preprocessed_task(synthetic_task, tmp_path: Path, mode: str) -> None:
    counter = StepCounter()
    counts = counter.counts
    argv = ["--benchmark", "--exec_mode", mode, "--data", str(synthetic_task.preprocessed(3)), "--results",
            str(tmp_path), "--train_batches", "2", "--test_batches", "2", "--warmup", "1", "--batch_size", "2",
            "--nfolds", "4", "--num_workers", "1", "--seed", "0", *TINY_FILTERS]
    assert main.main(argv, callbacks=[counter]) == 0
    assert counts[mode] == 3
    record = json.loads((tmp_path / PERF_FILE).read_text())
    check_record(record, steps=2, batch=2)
    assert record["data"] == str(synthetic_task.preprocessed(3)) and record["in_channels"] == 2


def test_step_timer_excludes_the_warmup_and_synchronises_only_an_accelerator(monkeypatch) -> None:
    clock = iter([10.0, 10.5, 11.5, 13.0])
    monkeypatch.setattr(benchmark_module.time, "perf_counter", lambda: next(clock))
    synchronised = []
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda device=None: synchronised.append(device))
    cpu = SimpleNamespace(device=torch.device("cpu"))
    timer = StepTimer(warmup=2)
    for batch_idx in range(5):
        timer.on_train_batch_start(None, cpu, None, batch_idx)
    timer.on_train_epoch_end(None, cpu)
    assert timer.step_seconds == [0.5, 1.0, 1.5] and synchronised == []

    clock = iter([1.0, 2.0, 4.0])
    cuda = SimpleNamespace(device=torch.device("cuda", 0))
    timer = StepTimer(warmup=1)
    for batch_idx in range(3):
        timer.on_predict_batch_start(None, cuda, None, batch_idx)
    timer.on_predict_epoch_end(None, cuda)
    assert timer.step_seconds == [1.0, 2.0] and len(synchronised) == 3


def test_task_plan_and_random_batch() -> None:
    config = task_plan("1", 3)
    assert config["in_channels"] == 4 and config["n_class"] == 4 and config["patch_size"] == [128, 128, 128]
    assert task_plan("Task05_Prostate", 2)["patch_size"] == [320, 320]
    batch = random_batch(task_plan("04", 3), 3, batch_size=2, labelled=True, seed=1)
    assert batch["image"].shape == (2, 1, 40, 56, 40) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (2, 1, 40, 56, 40) and batch["label"].dtype == torch.uint8
    assert set(batch["label"].unique().tolist()) == {0, 1, 2}
    unlabelled = random_batch(task_plan("04", 2), 2, batch_size=5, labelled=False)
    assert set(unlabelled) == {"image"} and unlabelled["image"].shape == (5, 1, 56, 40)
    batches = RandomBatches(batch, 3)
    assert len(batches) == 3 and all(b is batch for b in batches)


@pytest.mark.parametrize("argv, message", [
    (["--exec_mode", "train", "--task", "99", "--train_batches", "2"], "--task 99 is not an MSD task"),
    (["--exec_mode", "train", "--task", "04"], "needs --train_batches"),
    (["--exec_mode", "predict", "--task", "04"], "needs --test_batches"),
    (["--exec_mode", "evaluate", "--task", "04"], "train or predict"),
])
def test_bad_requests_exit_with_one_line(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    assert main.main(["--benchmark", "--results", str(tmp_path), *argv]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.strip().count("\n") == 0 and message in error
    assert not (tmp_path / PERF_FILE).exists()


def test_predict_with_a_checkpoint(synthetic_task, trained, tmp_path: Path) -> None:
    argv = ["--benchmark", "--exec_mode", "predict", "--data", str(synthetic_task.preprocessed(3)), "--results",
            str(tmp_path), "--test_batches", "2", "--warmup", "1", "--batch_size", "2", "--num_workers", "1",
            "--ckpt_path", str(trained / "checkpoints" / "last.ckpt")]
    assert main.main(argv) == 0
    check_record(json.loads((tmp_path / PERF_FILE).read_text()), steps=2, batch=2)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert main.main([*argv[:-1], str(bad)]) == 1


def test_two_processes_report_the_global_batch(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, str(root / "main.py"), "--benchmark", "--exec_mode", "train", "--task", "04",
               "--dim", "2", "--batch_size", "4", "--train_batches", "2", "--warmup", "1", "--cpu_processes", "2",
               "--results", str(tmp_path), *TINY_FILTERS]
    result = subprocess.run(command, capture_output=True, text=True, cwd=root, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / PERF_FILE).read_text())
    assert record["devices"] == 2 and record["batch_size"] == 4
    check_record(record, steps=2, batch=8)
    assert result.stdout.count("train benchmark (") == 1  # reported by rank 0 only


def test_task_without_a_preprocessed_folder_is_random_volumes_only_with_benchmark(tmp_path) -> None:
    from utils.args import data_source
    from utils.errors import UserError

    benchmark = parse_main_args(["--benchmark", "--task", "04", "--data", str(tmp_path)])
    assert data_source(benchmark) == (str(tmp_path), "04")
    with pytest.raises(UserError, match="no preprocessed task 04_3d"):
        data_source(parse_main_args(["--exec_mode", "train", "--task", "04", "--data", str(tmp_path)]))


def test_time_batches_times_only_the_batches_after_the_warmup(monkeypatch) -> None:
    clock = iter([10.0, 10.5, 11.0, 13.0])
    monkeypatch.setattr(logger.time, "perf_counter", lambda: next(clock))
    batches = iter(range(10))
    assert time_batches(batches, warmup=3, batches=2) == [0.5, 2.0]
    assert next(batches) == 5  # 3 untimed and 2 timed batches were fetched


def test_loader_benchmark_writes_its_record(synthetic_task, tmp_path: Path, capsys) -> None:
    args = parse_main_args(["--data", str(synthetic_task.preprocessed(3)), "--results", str(tmp_path),
                            "--batch_size", "2", "--nfolds", "4", "--num_workers", "1", "--seed", "0"])
    record = benchmark_loader(loader_settings(args), 1, 3, str(tmp_path), "logs.json")
    assert record == json.loads((tmp_path / PERF_FILE).read_text())
    assert record["mode"] == "loader" and record["steps"] == 3 and record["warmup"] == 1
    assert record["throughput"] == pytest.approx(2 / (record["latency_mean"] / 1000))
    assert "patches/s" in capsys.readouterr().out
