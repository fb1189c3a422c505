"""Training on one GPU through main.py: FP32 and mixed precision lower the loss and write checkpoints."""

from __future__ import annotations

import pytest
import torch

import main
from nnunet.trainer import build_trainer
from tests.conftest import train_argv
from tests.nnunet.test_training import epoch_records
from utils.args import device_settings, parse_main_args

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("flags, precision", [([], "32-true"), (["--amp"], "16-mixed"),
                                              (["--amp", "--amp_dtype", "bf16"], "bf16-mixed"),
                                              (["--amp", "--amp_dtype", "fp16"], "16-mixed")])
def test_amp_dtype_reaches_the_trainer_on_cuda(flags, precision) -> None:
    assert build_trainer(device_settings(parse_main_args(["--gpus", "1", *flags])), []).precision == precision


@pytest.mark.parametrize("flags", [[], ["--amp"], ["--amp", "--amp_dtype", "bf16"]], ids=["fp32", "fp16", "bf16"])
def test_two_epochs_on_the_gpu_lower_the_loss_and_write_checkpoints(synthetic_task, tmp_path, capsys, flags) -> None:
    argv = train_argv(synthetic_task.preprocessed(3), tmp_path, "--gpus", "1", "--epochs", "2", "--train_batches",
                      "20", "--learning_rate", "5e-3", "--save_ckpt", *flags)
    assert main.main(argv) == 0
    summary = capsys.readouterr().out
    assert "on gpu x1" in summary
    records = epoch_records(tmp_path)
    assert [r["step"] for r in records] == [0, 1]
    losses = [r["data"]["train_loss"] for r in records]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    for name in ("last.ckpt", "best.ckpt"):
        checkpoint = torch.load(tmp_path / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert all(t.device.type == "cpu" for t in checkpoint["state_dict"].values())
