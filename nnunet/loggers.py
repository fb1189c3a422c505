"""Experiment loggers (TensorBoard, CSV, MLflow) through Lightning, beside the DLLogger log.

`build_loggers` makes the Lightning loggers `--logger` names, all writing under the results folder (MLflow into a
SQLite file: no server). `ExperimentLog` feeds them each epoch: losses, the Dice of each class by name, the mean
Dice, the learning rate and, every few evaluations, the overlay of the first validation case as an image.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger

from nnunet.overlay import render_overlay
from utils.errors import UserError

LOGGERS = ("tensorboard", "csv", "mlflow")
MLFLOW_EXPERIMENT = "nnunet"


def mlflow_store(results: str | os.PathLike) -> tuple[str, str]:
    """The MLflow tracking URI and artifact location of a results folder: RESULTS/mlruns/mlflow.db (SQLite, which
    MLflow 3 prefers to its file store) and RESULTS/mlruns/artifacts."""
    folder = Path(results).resolve() / "mlruns"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()


def build_loggers(names: tuple[str, ...] | list[str], results: str | os.PathLike,
                  run_name: str | None = None) -> list[Logger]:
    """The Lightning loggers of `names` ("tensorboard", "csv", "mlflow"), writing under `results`.

    TensorBoard event files go to RESULTS/tensorboard/, the CSV to RESULTS/csv/metrics.csv, MLflow runs to
    RESULTS/mlruns/ (`mlflow_store`, experiment "nnunet").
    """
    loggers: list[Logger] = []
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            try:
                loggers.append(TensorBoardLogger(results, name="tensorboard", version="", default_hp_metric=False))
            except ModuleNotFoundError:
                raise UserError("--logger tensorboard needs the tensorboard package: pip install tensorboard") from None
        elif name == "csv":
            loggers.append(CSVLogger(results, name="csv", version=""))
        elif name == "mlflow":
            try:
                uri, artifacts = mlflow_store(results)
                loggers.append(MLFlowLogger(MLFLOW_EXPERIMENT, run_name=run_name, tracking_uri=uri,
                                            artifact_location=artifacts))
            except ModuleNotFoundError:
                raise UserError("--logger mlflow needs the mlflow package: pip install mlflow") from None
        else:
            raise UserError(f"--logger {name}: unknown; choose from {', '.join(LOGGERS)}")
    return loggers


def epoch_metrics(train_loss: float, evaluated: dict[str, Any], class_names: list[str], learning_rate: float) -> dict:
    """The scalars of one epoch by logger name: loss/train, loss/val, dice/<class name>, dice/mean, learning_rate."""
    metrics = {"loss/train": train_loss, "learning_rate": learning_rate}
    if "dice" in evaluated:
        metrics.update((f"dice/{name}", float(value)) for name, value in zip(class_names, evaluated["dice"]))
        metrics["dice/mean"] = float(evaluated["dice_mean"])
        metrics["loss/val"] = float(evaluated["val_loss"])
    return {key: float(value) for key, value in metrics.items() if np.isfinite(value)}


def flat_params(params: dict[str, Any]) -> dict[str, Any]:
    """Command-line values as loggers take them: lists joined into one string, None as "None"."""
    return {key: " ".join(map(str, value)) if isinstance(value, (list, tuple)) else
            value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in params.items()}


def log_image(logger: Logger, tag: str, image: np.ndarray, epoch: int) -> None:
    """An (H, W, 3) uint8 image in TensorBoard (add_image) or MLflow (an artifact); other loggers take none."""
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(tag, image, epoch, dataformats="HWC")
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_image(logger.run_id, image, f"{tag}/epoch_{epoch:04d}.png")


class ExperimentLog(pl.Callback):
    """Sends each epoch's metrics, and every `image_every` evaluations an overlay, to the Trainer's loggers.

    Args:
        params: the run's command-line values, logged as hyperparameters.
        image_every: evaluations between two overlay images (the first evaluation has one).
    """

    def __init__(self, params: dict[str, Any] | None = None, image_every: int = 5) -> None:
        self.params = params or {}
        self.image_every = image_every
        self.evaluations = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The first validation case's arrays are kept only for loggers that take images.
        pl_module.keep_overlay_case = any(isinstance(lg, (TensorBoardLogger, MLFlowLogger)) for lg in trainer.loggers)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_hyperparams(flat_params(self.params))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        train_loss = pl_module.train_loss_mean()  # collective: every rank calls it
        if not trainer.is_global_zero or not trainer.loggers:
            return
        evaluated = pl_module.epoch_metrics
        epoch = trainer.current_epoch
        metrics = epoch_metrics(train_loss, evaluated, pl_module.class_names,
                                trainer.optimizers[0].param_groups[0]["lr"])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=epoch)
        case = pl_module.overlay_case
        if "dice" in evaluated and case is not None:
            if self.evaluations % self.image_every == 0:
                image = render_overlay(**{**case, "title": f"{case['title']}, epoch {epoch}"}, dpi=60)
                for logger in trainer.loggers:
                    log_image(logger, "overlay", image, epoch)
            self.evaluations += 1
        pl_module.overlay_case = None
        for logger in trainer.loggers:
            logger.save()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for logger in trainer.loggers:
            logger.finalize("success")

    def state_dict(self) -> dict[str, Any]:
        return {"evaluations": self.evaluations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.evaluations = int(state.get("evaluations", 0))
