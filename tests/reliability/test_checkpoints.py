"""Checkpoints are loaded with weights_only=True (AMP scaler included) and foreign ones are refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

import main
from nnunet.checkpoints import AtomicCheckpointIO
from tests.conftest import train_argv


def one_line_error(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error, error
    return error


def edited(trained, tmp_path, edit) -> str:
    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    edit(checkpoint)
    path = tmp_path / "edited.ckpt"
    torch.save(checkpoint, path)
    return str(path)


HEAD = "model.heads.0.conv.conv"


def wider_output(checkpoint):
    checkpoint["state_dict"][f"{HEAD}.weight"] = torch.zeros(4, 16, 1, 1, 1)


def from_an_earlier_version(checkpoint):
    checkpoint["hyper_parameters"] = {"args": {"filters": [8, 16, 32, 64]}, "config": {}}


@pytest.mark.parametrize("edit, message", [
    (wider_output, f"does not fit the network it describes ({HEAD}.weight: (4, 16, 1, 1, 1) in "
                   f"the checkpoint, (4, 8, 1, 1, 1) in the network)"),
    (lambda c: c["state_dict"].pop(f"{HEAD}.bias"), f"({HEAD}.bias: missing in the checkpoint, (4,) in the network)"),
    (lambda c: c["hyper_parameters"].pop("config"), "is not a checkpoint written by this version of the program"),
    (lambda c: c["hyper_parameters"]["model"]["network"].pop("features"),
     "holds settings this version cannot read"),
    (from_an_earlier_version, "was written by an earlier version of this program, before checkpoints held their "
                              "network's plan"),
    (lambda c: c["hyper_parameters"]["config"].update(spacing=[2.0, 2.0, 2.0]),
     "was trained on data resampled to [2.0, 2.0, 2.0] mm but the data at --data is resampled to"),
])
def test_foreign_checkpoints_are_refused_by_evaluate_and_predict(trained, synthetic_task, tmp_path, capsys, edit,
                                                                  message):
    path = edited(trained, tmp_path, edit)
    for mode in ("evaluate", "predict"):
        argv = ["--exec_mode", mode, "--data", str(synthetic_task.preprocessed(3)), "--results", str(tmp_path),
                "--nfolds", "4", "--num_workers", "2", "--ckpt_path", path]
        argv += ["--save_preds"] if mode == "predict" else []  # evaluate writes no files and refuses it
        assert main.main(argv) == 1
        assert message in one_line_error(capsys)
    assert not list(tmp_path.rglob("*.nii.gz"))


def test_a_3d_checkpoint_on_2d_data_is_refused(trained, synthetic_task, tmp_path, capsys):
    argv = ["--exec_mode", "evaluate", "--data", str(synthetic_task.preprocessed(2)), "--results", str(tmp_path),
            "--nfolds", "4", "--num_workers", "2", "--ckpt_path", str(trained / "checkpoints" / "last.ckpt")]
    assert main.main(argv) == 1
    assert "trained on data preprocessed for 3D but the data at --data was preprocessed for 2D" in \
        one_line_error(capsys)


@pytest.mark.parametrize("flags", [["--filters", "16", "32", "64", "128"], ["--res_block"]])
def test_resuming_with_another_network_is_refused_before_training(trained, synthetic_task, tmp_path, capsys, flags):
    results = tmp_path / "results"
    argv = train_argv(synthetic_task.preprocessed(3), results, "--epochs", "3", "--resume_training", "--ckpt_path",
                      str(trained / "checkpoints" / "last.ckpt"), *flags)
    assert main.main(argv) == 1
    error = one_line_error(capsys)
    assert "has another network than the plan and flags of this run" in error
    assert error.endswith("resume with the flags it was trained with")
    assert not (results / "logs.json").exists()


def test_resuming_on_another_task_is_refused(trained, synthetic_task, tmp_path, capsys):
    data = tmp_path / "00_3d"
    shutil.copytree(synthetic_task.preprocessed(3), data)
    config = json.loads((data / "config.json").read_text())
    config["spacing"] = [3.0, 1.0, 1.0]
    (data / "config.json").write_text(json.dumps(config))
    argv = train_argv(data, tmp_path / "results", "--resume_training", "--ckpt_path",
                      str(trained / "checkpoints" / "last.ckpt"))
    assert main.main(argv) == 1
    assert "but the data at --data is resampled to [3.0, 1.0, 1.0] mm" in one_line_error(capsys)


class Linear(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}


def test_fp16_scaler_and_scheduler_states_resume_with_weights_only(tmp_path):
    # fp16 AMP keeps a gradient scaler (on CUDA); its state must survive a weights_only load like the rest.
    loader = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)

    def trainer(epochs: int) -> pl.Trainer:
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
        return pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False,
                          plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler), AtomicCheckpointIO()])

    first = trainer(2)
    first.fit(Linear(), loader)
    first.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["MixedPrecision"]["scale"] == 2048.0 and saved["MixedPrecision"]["_growth_tracker"] == 1

    resumed = trainer(3)
    resumed.fit(Linear(), loader, ckpt_path=str(tmp_path / "last.ckpt"), weights_only=True)
    assert resumed.global_step == 6
    # 6 unskipped steps with growth every 3: the scale doubled twice in all, as in one run of 3 epochs.
    assert resumed.precision_plugin.scaler.get_scale() == 4096.0
    assert resumed.lr_scheduler_configs[0].scheduler.last_epoch == 3
    assert resumed.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
