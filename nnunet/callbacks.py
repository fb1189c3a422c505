"""The per-epoch log: a readable line on stdout, DLLogger records, the learning curves."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from nnunet.mlperf import MLPerfReport, mlperf_metrics
from utils.errors import UserError
from utils.io import atomic_open, save_json
from utils.logger import DLLogger, read_logs


class NonFiniteLoss(UserError):
    """The training loss became NaN or infinite: the weights are no longer usable."""


def check_finite_loss(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Raise `NonFiniteLoss` when any rank's running loss sum of the epoch is NaN or infinite (a collective call).

    A NaN in one step makes the sum NaN for the rest of the epoch, so one check at a saving point covers every
    step since the epoch started without a host synchronisation per step.
    """
    bad = not bool(torch.isfinite(pl_module.train_loss_sum).all())
    if trainer.strategy.reduce_boolean_decision(bad, all=False):
        raise NonFiniteLoss(
            f"the training loss became NaN or infinite in epoch {trainer.current_epoch}; stopped without saving, "
            f"so any existing checkpoint is still the last good one: check the input arrays or lower --learning_rate")


class FiniteLossGuard(pl.Callback):
    """Stops training with `NonFiniteLoss` at the end of an epoch whose loss was not finite.

    Add it first: it must run before the callbacks that log the epoch or write `last.ckpt` and `best.ckpt`.
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_finite_loss(trainer, pl_module)



def format_epoch_line(epoch: int, metrics: dict[str, Any], names: list[str] | None = None,
                      mean_name: str = "mean_dice") -> str:
    """One readable line: epoch, Dice per class (D1, D2, ... or `names`), mean Dice, losses, best Dice and epoch."""
    parts = [f"epoch {epoch:4d}"]
    if "dice" in metrics:
        labels = names or [f"D{i + 1}" for i in range(len(metrics["dice"]))]
        parts.append(" ".join(f"{label} {value:.4f}" for label, value in zip(labels, metrics["dice"])))
        absent = metrics.get("dice_absent")
        if absent:
            left_out = ", ".join(labels[index - 1] for index in absent)
            parts.append(f"{mean_name} over classes present in validation {metrics['dice_mean']:.4f} "
                         f"(without {left_out}: in no validation label)")
        else:
            parts.append(f"{mean_name} {metrics['dice_mean']:.4f}")
    parts.append(f"train_loss {metrics['train_loss']:.4f}")
    if "val_loss" in metrics:
        parts.append(f"val_loss {metrics['val_loss']:.4f}")
    if metrics.get("best_epoch", -1) >= 0:
        parts.append(f"best_dice {metrics['best_dice']:.4f} (epoch {metrics['best_epoch']})")
    return " | ".join(parts)


class EpochLogger(pl.Callback):
    """Writes params.json, one DLLogger record and one stdout line per epoch, and learning curves at the end.

    Args:
        results: the results folder.
        logname: the DLLogger file's name in it.
        params: the run's arguments, written to params.json and the log's first record.
        names: names of the Dice scores (BraTS: the TensorFlow reference's), also logged under these names
            with the mean as `MeanDice`; None: D1, D2, ...
        report: an `MLPerfReport`: evaluated epochs are printed and logged as the MLPerf UNet3D reference does.
        line_names: names of the Dice scores in the stdout line only (regions: the regions of dataset.json);
            None: `names`, else D1, D2, ...
    """

    def __init__(self, results: str | os.PathLike, logname: str, params: dict[str, Any],
                 names: list[str] | None = None, report: MLPerfReport | None = None,
                 line_names: list[str] | None = None) -> None:
        self.results = Path(results)
        self.line_names = line_names
        self.params = params
        self.names = names
        self.report = report
        self.logger = DLLogger(self.results / logname)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            save_json(self.results / "params.json", self.params)
            self.logger.log_params(self.params)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        train_loss = pl_module.train_loss_mean()  # collective: every rank calls it
        if not trainer.is_global_zero:
            return
        evaluated = pl_module.epoch_metrics
        metrics = {"train_loss": train_loss, **evaluated,
                   "best_dice": pl_module.best_dice, "best_epoch": pl_module.best_epoch,
                   "learning_rate": trainer.optimizers[0].param_groups[0]["lr"]}
        metrics.pop("cases", None)
        if self.names and "dice" in evaluated:
            metrics.update(zip(self.names, evaluated["dice"]), MeanDice=evaluated["dice_mean"])
        if self.report is not None and "dice" in evaluated:
            record = mlperf_metrics(trainer.current_epoch + 1, {**evaluated, "train_loss": train_loss})
            values = self.report.update(record)
            line = self.report.line(values)
            metrics.update((key, value) for key, value in values.items() if key != "epoch")
        else:
            line = format_epoch_line(trainer.current_epoch, metrics, self.names or self.line_names,
                                     "MeanDice" if self.names else "mean_dice")
        bar = trainer.progress_bar_callback
        if bar is not None and hasattr(bar, "print"):
            bar.print(line)
        else:
            print(line, flush=True)
        self.logger.log(trainer.current_epoch, metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"report": self.report.state_dict()} if self.report is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.report is not None and "report" in state:
            self.report.load_state_dict(state["report"])

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            plot_learning_curves(self.logger.path, self.results / "learning_curves.png")


def epoch_history(log_path: str | os.PathLike) -> dict[int, dict]:
    """The metrics of each epoch in a DLLogger file of one training, across its resumed runs, by epoch.

    A run killed after logging an epoch but before saving its checkpoint logs that epoch again when it is
    resumed, and a run resumed from an older checkpoint logs its epochs again from there. So a record of epoch
    `e` replaces every record of epoch `e` or later written before it: what remains is the history that led to
    the latest record.
    """
    epochs: dict[int, dict] = {}
    for record in read_logs(log_path):
        if record.get("type") == "LOG" and isinstance(record.get("step"), int):
            epoch = record["step"]
            for later in [e for e in epochs if e >= epoch]:
                del epochs[later]
            epochs[epoch] = record["data"]
    return epochs


def plot_learning_curves(log_path: Path, png_path: Path) -> None:
    """Losses and mean Dice per epoch from a DLLogger file (earlier runs of a resumed training included)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = epoch_history(log_path)
    if not epochs:
        return
    order = sorted(epochs)

    def series(key: str) -> tuple[list[int], list[float]]:
        pairs = [(e, epochs[e][key]) for e in order if isinstance(epochs[e].get(key), (int, float))]
        pairs = [(e, v) for e, v in pairs if math.isfinite(v)]
        return [e for e, _ in pairs], [v for _, v in pairs]

    figure, (loss_axes, dice_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "val_loss"):
        loss_axes.plot(*series(key), label=key.replace("_", " "))
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("loss")
    loss_axes.legend()
    dice_axes.plot(*series("dice_mean"), marker=".", label="mean Dice")
    dice_axes.set_xlabel("epoch")
    dice_axes.set_ylabel("validation Dice")
    dice_axes.set_ylim(0, 1)
    dice_axes.legend()
    figure.tight_layout()
    with atomic_open(png_path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=100)
    plt.close(figure)
