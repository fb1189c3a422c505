"""Training stopped by SIGTERM, SIGINT or SIGKILL (also in the middle of a checkpoint write) resumes with nothing lost.

Each test runs `main.py` in a subprocess (tests/reliability/interrupted.py adds marker lines), signals it after a
given marker and resumes in this process with --resume_training.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import pytest
import pytorch_lightning as pl
import torch

import main
from data_loading.data_module import DataModule
from nnunet.callbacks import epoch_history
from tests.conftest import train_argv
from utils.args import loader_settings, parse_main_args
from utils.logger import DLLogger, read_logs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TIMEOUT = 240  # seconds: a watchdog for a child that hangs, not a synchronisation


class Child:
    """A subprocess of interrupted.py whose stdout is read line by line."""

    def __init__(self, program: str, argv: list[str], tmp_path: Path, **env: str) -> None:
        self.stderr_path = tmp_path / f"stderr_{program}.txt"
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "interrupted.py"), program, *argv], cwd=ROOT, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.stderr_path, "w"),
            env={**os.environ, "PYTHONPATH": str(ROOT), **env})
        self.watchdog = threading.Timer(TIMEOUT, self.process.kill)
        self.watchdog.start()
        self.lines: list[str] = []

    def wait_for(self, marker: str) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if self.printed(marker):
                return
        pytest.fail(f"the child ended without printing {marker!r}: {self.finish()[1][-2000:]}")

    def printed(self, marker: str) -> bool:
        # The progress bar shares stdout: a marker ends its line, after the bar's text.
        return any(line.endswith(marker) for line in self.lines)

    def signal(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def resume(self) -> None:
        """Let a child paused at PAUSE_AFTER go on (after the test has sent its signal)."""
        self.process.stdin.write("\n")
        self.process.stdin.flush()

    def finish(self) -> tuple[int, str]:
        self.lines += self.process.stdout.read().splitlines()
        code = self.process.wait()
        self.watchdog.cancel()
        return code, self.stderr_path.read_text()


def epoch_steps(results: Path) -> list[int]:
    return [r["step"] for r in read_logs(results / "logs.json") if r["type"] == "LOG" and isinstance(r["step"], int)]


def checkpoint(results: Path) -> dict:
    return torch.load(results / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def adam_steps(state: dict) -> set[float]:
    return {float(s["step"]) for s in state["optimizer_states"][0]["state"].values()}


def test_sigterm_mid_epoch_saves_a_checkpoint_without_save_ckpt_and_resumes(synthetic_task, tmp_path):
    results = tmp_path / "results"
    argv = train_argv(synthetic_task.preprocessed(3), results, "--epochs", "2", "--train_batches", "4",
                      "--scheduler", "cosine")
    child = Child("main", argv, tmp_path, PAUSE_AFTER="STEP 6 EPOCH 1")
    child.wait_for("STEP 6 EPOCH 1")
    child.signal(signal.SIGTERM)
    child.resume()
    code, stderr = child.finish()
    assert code == 128 + signal.SIGTERM, stderr[-2000:]
    assert "training stopped by SIGTERM in epoch 1 after 6 steps" in stderr
    assert not child.printed("STEP 7 EPOCH 1")
    state = checkpoint(results)
    # Mid-epoch: 6 optimizer steps, the second of epoch 1 completed; the cosine schedule has stepped once.
    assert state["global_step"] == 6 and state["epoch"] == 1 and adam_steps(state) == {6.0}
    assert state["lr_schedulers"][0]["last_epoch"] == 1
    assert epoch_steps(results) == [0]

    assert main.main([*argv, "--resume_training"]) == 0
    assert epoch_steps(results) == [0, 1]  # each epoch logged once
    final = checkpoint(results)  # refreshed at the end, so it does not lag behind the resumed run
    assert final["global_step"] == 8 and adam_steps(final) == {8.0}
    assert final["lr_schedulers"][0]["last_epoch"] == 2


def test_sigint_during_validation_finishes_the_epoch_then_stops(synthetic_task, tmp_path):
    results = tmp_path / "results"
    argv = train_argv(synthetic_task.preprocessed(3), results, "--epochs", "3", "--train_batches", "2",
                      "--save_ckpt")
    child = Child("main", argv, tmp_path, PAUSE_AFTER="VALIDATION 0 CASE 0")
    child.wait_for("VALIDATION 0 CASE 0")
    child.signal(signal.SIGINT)
    child.resume()
    code, stderr = child.finish()
    assert code == 128 + signal.SIGINT, stderr[-2000:]
    assert child.printed("VALIDATION 0 CASE 1") and not child.printed("STEP 3 EPOCH 1")
    records = [r for r in read_logs(results / "logs.json") if r["step"] == 0]
    assert len(records) == 1 and len(records[0]["data"]["dice"]) == 3  # validated on both cases and logged
    state = checkpoint(results)
    assert state["global_step"] == 2 and state["epoch"] == 0
    assert state["nnunet"]["best_dice"] == pytest.approx(records[0]["data"]["dice_mean"])
    early_stopping = next(v for k, v in state["callbacks"].items() if k.startswith("EarlyStopping"))
    assert early_stopping["wait_count"] == 0 and float(early_stopping["best_score"]) == pytest.approx(
        records[0]["data"]["dice_mean"])


def test_sigkill_mid_epoch_resumes_from_the_last_complete_checkpoint(synthetic_task, tmp_path):
    results = tmp_path / "results"
    argv = train_argv(synthetic_task.preprocessed(3), results, "--epochs", "2", "--train_batches", "3",
                      "--save_ckpt")
    child = Child("main", argv, tmp_path)
    child.wait_for("STEP 4 EPOCH 1")
    child.signal(signal.SIGKILL)
    code, _ = child.finish()
    assert code == -signal.SIGKILL
    assert checkpoint(results)["global_step"] == 3
    assert main.main([*argv, "--resume_training"]) == 0
    assert epoch_steps(results) == [0, 1]
    assert checkpoint(results)["global_step"] == 6 and adam_steps(checkpoint(results)) == {6.0}


def test_kill_during_a_checkpoint_write_keeps_the_previous_checkpoint(synthetic_task, tmp_path):
    results = tmp_path / "results"
    argv = train_argv(synthetic_task.preprocessed(3), results, "--epochs", "2", "--train_batches", "2",
                      "--save_ckpt")
    # Writes: last.ckpt and best.ckpt after epoch 0, then last.ckpt after epoch 1 is cut half-way by SIGKILL.
    child = Child("main", argv, tmp_path, KILL_AT_WRITE="3")
    code, stderr = child.finish()
    assert code == -signal.SIGKILL, stderr[-2000:]
    assert any("KILL" in line and ".last.ckpt." in line for line in child.lines)
    folder = results / "checkpoints"
    assert len(list(folder.glob(".last.ckpt.*.tmp"))) == 1  # the cut write never took the real name
    assert checkpoint(results)["global_step"] == 2  # epoch 0, complete
    assert epoch_steps(results) == [0, 1]  # epoch 1 was logged before its checkpoint was cut

    assert main.main([*argv, "--resume_training"]) == 0
    assert not list(folder.glob("*.tmp"))
    # Epoch 1 ran again after the resume: the log keeps both records and readers take the later one.
    assert epoch_steps(results) == [0, 1, 1]
    history = epoch_history(results / "logs.json")
    assert sorted(history) == [0, 1]
    assert history[1] == [r["data"] for r in read_logs(results / "logs.json") if r["step"] == 1][-1]
    assert checkpoint(results)["global_step"] == 4


def test_epoch_history_keeps_the_lineage_of_the_latest_records(tmp_path):
    path = tmp_path / "logs.json"
    logger = DLLogger(path)
    for epoch, loss in [(0, 1.0), (1, 0.9), (2, 0.8), (3, 0.7), (1, 0.5), (2, 0.4)]:
        logger.log(epoch, {"train_loss": loss})
    # A run resumed from epoch 0's checkpoint supersedes epochs 1-3 of the earlier run, even those it has not reached.
    assert {e: d["train_loss"] for e, d in epoch_history(path).items()} == {0: 1.0, 1: 0.5, 2: 0.4}


def test_a_log_line_cut_by_a_kill_does_not_swallow_the_next_record(tmp_path):
    path = tmp_path / "logs.json"
    DLLogger(path).log(0, {"train_loss": 1.0})
    with open(path, "a") as handle:
        handle.write('DLLL {"timestamp": 1.0, "type": "LO')  # killed half-way through a line
    DLLogger(path).log(1, {"train_loss": 0.5})
    assert [r["step"] for r in read_logs(path)] == [0, 1]


def test_a_resumed_run_does_not_replay_the_patches_of_the_first_epoch(synthetic_task, tmp_path):
    args = parse_main_args(train_argv(synthetic_task.preprocessed(3), tmp_path, "--train_batches", "1"))

    def first_batch(epoch: int | None) -> torch.Tensor:
        datamodule = DataModule(loader_settings(args))
        if epoch is not None:  # the epoch Lightning restored from a checkpoint
            datamodule.trainer = SimpleNamespace(current_epoch=epoch, global_rank=0, world_size=1, local_rank=0)
        datamodule.setup("fit")
        image = next(iter(datamodule.train_dataloader()))["image"].clone()
        datamodule.teardown("fit")
        return image

    fresh = first_batch(None)
    assert torch.equal(first_batch(0), fresh)
    assert not torch.equal(first_batch(3), fresh)


def test_sigterm_during_prediction_stops_after_the_running_case(trained, synthetic_task, tmp_path,
                                                                capsys):
    class SigtermInFirstCase(pl.Callback):
        def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if batch_idx == 0:
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler is installed while predict runs

    argv = ["--exec_mode", "predict", "--data", str(synthetic_task.preprocessed(3)), "--results", str(tmp_path),
            "--num_workers", "2", "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"), "--save_preds"]
    assert main.main(argv, callbacks=[SigtermInFirstCase()]) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM before the end of --exec_mode predict" in capsys.readouterr().err
    written = list((tmp_path / "predictions").iterdir())
    assert len(written) == 1 and written[0].name.endswith(".nii.gz")  # of two test cases, the first, complete
    assert nib.load(str(written[0])).get_fdata().shape == nib.load(str(next(
        (synthetic_task.task_dir / "imagesTs").glob(written[0].name)))).shape[:3]
