"""Pre-emption: stop training cleanly on SIGTERM or SIGINT, leaving a checkpoint to resume from.

Schedulers (SLURM, Kubernetes, spot instances) send SIGTERM a little while before they kill a job, and a user
stops a run with Ctrl+C (SIGINT). Either signal is only noted when it arrives. At the end of the running training
step the processes agree to stop, `checkpoints/last.ckpt` is written atomically (also without `--save_ckpt`: the
work of the run would otherwise be lost) and training ends with `Preempted`; a signal that arrives in an epoch's
last step or during its validation stops at the end of that epoch instead, once the epoch is validated on every
case, logged and saved. `main.py` then exits with status 128 + the signal number (143 for SIGTERM, 130 for
SIGINT), the shell convention for "ended by a signal", so that a job script can tell a pre-empted run from a
finished one and rerun it with `--resume_training`.

A second signal stops at once with the handler that was there before training (for SIGINT Python's
KeyboardInterrupt, for SIGTERM usually the default: the process ends, and the last complete checkpoint stays).

Lightning installs its own SIGTERM handler when `fit` starts; it would stop in the middle of a validation, whose
partial Dice would then be taken for the epoch's. This callback replaces it while training runs (Lightning
restores the handlers it found when `fit` returns).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException

from nnunet.callbacks import check_finite_loss
from nnunet.checkpoints import LAST

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, checkpoint: Path, epoch: int, step: int) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        self.epoch = epoch
        self.step = step
        name = signal.Signals(signum).name
        super().__init__(f"training stopped by {name} in epoch {epoch} after {step} steps; saved {checkpoint}: "
                         f"continue with --resume_training")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class PreemptionCheckpoint(pl.Callback):
    """Turns SIGTERM and SIGINT into a checkpoint at the next safe point and a `Preempted` exception.

    Add it after the callbacks that act at the end of an epoch (the epoch log, `CheckpointSaver`), so that an
    epoch that ends before the stop is logged and saved first.

    Args:
        dirpath: the checkpoint folder; the checkpoint is `dirpath/last.ckpt`.
        refresh_at_end: rewrite an existing `last.ckpt` when training ends, so that a checkpoint left by an
            earlier pre-emption never lags behind the run that resumed from it (for runs that do not save
            `last.ckpt` every epoch, i.e. without --save_ckpt).
    """

    def __init__(self, dirpath: str | os.PathLike, refresh_at_end: bool = False) -> None:
        self.dirpath = Path(dirpath)
        self.refresh_at_end = refresh_at_end
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------------------------------
    # Handlers
    # ------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before Lightning registers its handlers: these are what a second signal falls back to.
        if stage == "fit" and _main_thread():
            self._previous = {signum: signal.getsignal(signum) for signum in SIGNALS}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.received = None
        if _main_thread():
            for signum in SIGNALS:
                signal.signal(signum, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            self._restore()
            signal.raise_signal(signum)
            return
        self.received = signum
        # Only async-signal-safe work here; the message says what the process is about to do.
        os.write(2, f"\n{signal.Signals(signum).name} received: stopping after this step "
                    f"(send it again to stop at once)\n".encode())

    def _restore(self) -> None:
        if _main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore()

    # ------------------------------------------------------------------------------------------
    # Stopping points
    # ------------------------------------------------------------------------------------------
    def _stop_requested(self, trainer: pl.Trainer) -> bool:
        # Every process must take the same decision at the same step: saving is collective under DDP.
        return trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)

    def _stop(self, trainer: pl.Trainer) -> None:
        check_finite_loss(trainer, trainer.lightning_module)  # never replace a good checkpoint with NaN weights
        path = self.dirpath / LAST
        trainer.save_checkpoint(path, weights_only=False)
        signum = self.received if self.received is not None else int(signal.SIGTERM)  # a peer's signal under DDP
        raise Preempted(signum, path, trainer.current_epoch, trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # After the epoch's last step the epoch ends first (validation, log, checkpoint): Lightning, resuming from
        # a checkpoint taken here, would go on with the next epoch and leave this one unvalidated and unlogged.
        if batch_idx + 1 < trainer.num_training_batches and self._stop_requested(trainer):
            self._stop(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A signal that arrived during the epoch's validation: the epoch is complete, logged and saved.
        if self._stop_requested(trainer):
            self._stop(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.refresh_at_end and (self.dirpath / LAST).is_file():
            trainer.save_checkpoint(self.dirpath / LAST, weights_only=False)


class StopPredictionOnSigterm(pl.Callback):
    """Ends prediction after the running case when SIGTERM arrives.

    Lightning notes the signal during `predict` but its prediction loop goes on to the last case, so a scheduler's
    SIGTERM would be ignored until it kills the job. Each case's files are written atomically: the cases written
    before the stop are complete and the others absent. `main.py` exits with status 143.
    """

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.received_sigterm:
            raise SIGTERMException


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
