"""Learning-rate schedules: a warmup, then constant, cosine, poly, multistep or on-plateau decay."""

from __future__ import annotations

import math

import torch

from utils.errors import UserError
from utils.settings import OptimSettings


def make_scheduler(optimizer: torch.optim.Optimizer, optim: OptimSettings):
    """The learning-rate schedule of `--scheduler` after `--lr_warmup_epochs` of linear warmup, stepped once
    per epoch; None for a constant rate without warmup.

    Every schedule but plateau is a factor of the base rate per epoch. The warmup rises linearly from
    `--warmup_start_lr` and reaches the base rate in its last epoch, as the MLPerf UNet3D reference's does
    (rate at 1-based epoch e: start + (base - start) * e / warmup); the schedule then starts from its epoch 0.
    One LambdaLR of closed-form factors rather than torch's SequentialLR of LinearLR and the decay: LinearLR
    cannot reach the base rate within a one-epoch warmup, and a closed form gives the same rate for a resumed
    epoch as for an uninterrupted run.
    """
    epochs = max(1, optim.epochs)
    warmup = optim.lr_warmup_epochs
    if optim.scheduler == "plateau":
        if warmup:
            raise UserError("--lr_warmup_epochs does not combine with --scheduler plateau")
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=optim.lr_gamma,
                                                          patience=optim.lr_patience)
    if optim.scheduler == "multistep" and not optim.lr_steps:
        raise UserError("--scheduler multistep needs --lr_steps, the epochs at which the rate drops")
    if optim.scheduler == "none" and not warmup:
        return None
    span = max(1, epochs - warmup)  # the epochs the schedule itself runs over
    schedules = {
        "none": lambda epoch: 1.0,
        "cosine": lambda epoch: 0.5 * (1 + math.cos(math.pi * min(epoch / span, 1.0))),
        "poly": lambda epoch: (1 - min(epoch, span) / span) ** 0.9,
        "multistep": lambda epoch: optim.lr_gamma ** sum(epoch >= step for step in optim.lr_steps or []),
    }
    if optim.scheduler not in schedules:
        raise UserError(f"unknown scheduler {optim.scheduler}")
    schedule = schedules[optim.scheduler]
    start = optim.warmup_start_lr / optim.learning_rate

    def factor(epoch: int) -> float:
        if epoch < warmup:
            return start + (1 - start) * (epoch + 1) / warmup
        return schedule(epoch - warmup)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
