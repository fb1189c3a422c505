"""The MLPerf UNet3D (KiTS19) recipe: its log line, the quality-threshold stop and compliant logging.

The MLPerf training reference reports, after each evaluation, `L1 dice` (kidney), `L2 dice`
(tumour), `mean_dice`, `eval_loss` and `train_loss`, together with the same values at the best
evaluation so far prefixed `TOP_`, and stops a run once the mean Dice reaches the quality target
(0.908). With `--mlperf_log FILE` the run also writes the events of the `mlperf-logging` package
(run start and stop, epochs, evaluations, hyper-parameters).
"""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl

from utils.errors import UserError

# The reference's recipe: SGD with a linear warmup from 1e-4 over 200 epochs to 0.8 and no decay,
# batch 2 of 128^3 patches, foreground oversampling 0.4, evaluation by 128^3 windows with overlap 0.5
# and gaussian weighting every 20 epochs from epoch 1000, and a stop at a mean Dice of 0.908.
QUALITY_THRESHOLD = 0.908


def mlperf_metrics(epoch: int, metrics: dict[str, Any]) -> dict[str, float]:
    """The reference's names for one evaluation: epoch, `L<i> dice` per class, mean_dice, eval_loss, train_loss."""
    record: dict[str, float] = {"epoch": epoch}
    for index, value in enumerate(metrics["dice"]):
        record[f"L{index + 1} dice"] = float(value)
    record["mean_dice"] = float(metrics["dice_mean"])
    record["eval_loss"] = float(metrics["val_loss"])
    record["train_loss"] = float(metrics["train_loss"])
    return record


class MLPerfReport:
    """Keeps the best evaluation (by mean Dice) and formats the reference's line with its `TOP_` values."""

    def __init__(self) -> None:
        self.best: dict[str, float] = {}

    def update(self, record: dict[str, float]) -> dict[str, float]:
        if not self.best or record["mean_dice"] > self.best["mean_dice"]:
            self.best = dict(record)
        return {**record, **{f"TOP_{key}": value for key, value in self.best.items()}}

    @staticmethod
    def line(values: dict[str, float]) -> str:
        return "  ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                         for key, value in values.items())

    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = dict(state.get("best", {}))


class QualityThreshold(pl.Callback):
    """Stops training after the evaluation whose mean Dice reaches `threshold` (>=, as the reference does;
    Lightning's `EarlyStopping(stopping_threshold=...)` stops only above it) and says whether it was reached."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.reached_epoch: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or "dice_mean" not in pl_module.epoch_metrics:
            return
        if pl_module.epoch_metrics["dice_mean"] >= self.threshold:
            self.reached_epoch = trainer.current_epoch
            trainer.should_stop = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if self.reached_epoch is not None:
            print(f"quality threshold {self.threshold} reached: mean Dice {pl_module.best_dice:.4f} after "
                  f"{self.reached_epoch + 1} epochs", flush=True)
        else:
            print(f"quality threshold {self.threshold} not reached: best mean Dice {pl_module.best_dice:.4f}",
                  flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"reached_epoch": self.reached_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reached_epoch = state.get("reached_epoch")


class MLPerfLogger(pl.Callback):
    """MLPerf-compliant events written with the `mlperf-logging` package (rank 0 only).

    The log holds what the training rules (UNet3D, closed division) ask for: submission, init and run
    start and stop with the run's status, hyper-parameters, epochs, and evaluations with their accuracy.
    The submitter fields come from the environment (MLPERF_SUBMISSION_ORG, _PLATFORM, _DIVISION, _STATUS).

    The hyper-parameters come from the module's optimisation and inference settings and the data module's
    loader settings; the cases and window from the data module and the module.

    Args:
        path: the log file.
        threshold: the quality target; the run's status is "success" once it is reached.
    """

    def __init__(self, path: str | os.PathLike, threshold: float | None) -> None:
        try:
            from mlperf_logging import mllog
        except ImportError:
            raise UserError("--mlperf_log needs the mlperf-logging package: pip install mlperf-logging") from None
        self.path = str(path)
        self.threshold = threshold
        self.mllog = mllog
        self.logger = None

    def _log(self, kind: str, key: str, value: Any = None, metadata: dict | None = None) -> None:
        if self.logger is not None:
            getattr(self.logger, kind)(key=key, value=value, metadata=metadata)

    def _epoch(self, trainer: pl.Trainer) -> dict[str, int]:
        return {self.mllog.constants.EPOCH_NUM: trainer.current_epoch + 1}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        constants = self.mllog.constants
        self.mllog.config(filename=self.path)
        self.logger = self.mllog.get_mllogger()
        optim, loader = pl_module.optim, trainer.datamodule.settings
        multistep = optim.scheduler == "multistep"
        environment = os.environ.get
        for key, value in (
            (constants.SUBMISSION_BENCHMARK, constants.UNET3D),
            (constants.SUBMISSION_ORG, environment("MLPERF_SUBMISSION_ORG", "unknown")),
            (constants.SUBMISSION_PLATFORM, environment("MLPERF_SUBMISSION_PLATFORM",
                                                        f"{trainer.world_size}x{trainer.strategy.root_device.type}")),
            (constants.SUBMISSION_DIVISION, environment("MLPERF_SUBMISSION_DIVISION", constants.CLOSED)),
            (constants.SUBMISSION_STATUS, environment("MLPERF_SUBMISSION_STATUS", constants.ONPREM)),
            (constants.CACHE_CLEAR, True),
        ):
            self._log("event", key, value)
        self._log("start", constants.INIT_START)
        seed = trainer.datamodule.seed
        # The last five keys are the UNet3D rules' own; the package has no constants for them.
        for key, value in (
            (constants.SEED, seed),
            (constants.GLOBAL_BATCH_SIZE, trainer.datamodule.batch_size * trainer.world_size),
            (constants.GRADIENT_ACCUMULATION_STEPS, 1),
            (constants.OPT_NAME, optim.optimizer),
            (constants.OPT_BASE_LR, optim.learning_rate),
            (constants.OPT_LR_WARMUP_EPOCHS, optim.lr_warmup_epochs),
            (constants.OPT_LR_DECAY_BOUNDARY_EPOCHS, list(optim.lr_steps) if multistep else []),
            (constants.OPT_LR_DECAY_FACTOR, optim.lr_gamma if multistep else 1.0),
            (constants.OPT_WEIGHT_DECAY, optim.weight_decay),
            ("opt_momentum", optim.momentum),
            ("oversampling", loader.oversampling),
            ("training_input_shape", list(pl_module.patch_size)),
            ("validation_input_shape", list(pl_module.patch_size)),
            ("validation_overlap", pl_module.inference.overlap),
            (constants.TRAIN_SAMPLES, len(trainer.datamodule.train_cases)),
            (constants.EVAL_SAMPLES, len(trainer.datamodule.val_cases)),
        ):
            self._log("event", key, value)
        self._log("end", constants.INIT_STOP)
        self._log("start", constants.RUN_START)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log("start", self.mllog.constants.EPOCH_START, metadata=self._epoch(trainer))

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log("start", self.mllog.constants.EVAL_START, metadata=self._epoch(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or "dice_mean" not in pl_module.epoch_metrics:
            return
        constants = self.mllog.constants
        self._log("event", constants.EVAL_ACCURACY, pl_module.epoch_metrics["dice_mean"], self._epoch(trainer))
        self._log("end", constants.EVAL_STOP, metadata=self._epoch(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log("end", self.mllog.constants.EPOCH_STOP, metadata=self._epoch(trainer))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        constants = self.mllog.constants
        success = self.threshold is not None and pl_module.best_dice >= self.threshold
        self._log("end", constants.RUN_STOP, metadata={constants.STATUS: constants.SUCCESS if success
                                                       else constants.ABORTED})
