"""The one place that picks the device and builds Lightning's Trainer.

`accelerator()` decides CPU, CUDA or another Lightning accelerator from the device settings and what the
machine has; everything else follows from the Trainer `build_trainer` configures.
"""

from __future__ import annotations

import sys

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from nnunet.checkpoints import AtomicCheckpointIO
from utils.errors import UserError
from utils.settings import DeviceSettings


def default_gpus() -> int:
    """--gpus when it is not given: 1 with CUDA, else 0 (the CPU)."""
    return 1 if torch.cuda.is_available() else 0


def accelerator(device: DeviceSettings) -> tuple[str, int]:
    """The Lightning accelerator and its devices per node, checked against the machine.

    ("gpu", gpus) for CUDA, ("cpu", cpu_processes) for the CPU, (name, max(gpus, 1)) for any other
    accelerator, which Lightning checks when the Trainer is built.
    """
    kind = device.kind
    if kind == "cpu":
        return "cpu", device.cpu_processes
    devices = max(device.gpus, 1)
    if kind == "gpu":
        if not torch.cuda.is_available():
            raise UserError(f"--gpus {device.gpus} was given but no CUDA device is available; use --gpus 0 for the "
                            f"CPU")
        if devices > torch.cuda.device_count():
            raise UserError(f"--gpus {devices} was given but only {torch.cuda.device_count()} CUDA devices exist")
    return kind, devices


def amp_dtype(device: DeviceSettings) -> str | None:
    """The autocast dtype of the run, "fp16" or "bf16", or None without --amp.

    --amp_dtype when given, else fp16 (with a gradient scaler) on CUDA and bf16 on the CPU.
    """
    if not device.amp:
        return None
    kind = accelerator(device)[0]
    if kind not in ("gpu", "cpu"):
        raise UserError(f"--amp runs on CUDA (fp16 or bf16) or the CPU (bf16); --accelerator {kind} trains in FP32: "
                        f"drop --amp")
    chosen = device.amp_dtype or ("fp16" if kind == "gpu" else "bf16")
    if chosen == "fp16" and kind == "cpu":
        raise UserError("--amp_dtype fp16 runs on CUDA only; on the CPU use --amp_dtype bf16 (the default there)")
    return chosen


def precision(device: DeviceSettings) -> str:
    """The Lightning precision: "32-true", or with --amp "16-mixed" (fp16, gradient scaler) or "bf16-mixed"."""
    return {None: "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}[amp_dtype(device)]


def reset_peak_memory(device: torch.device) -> None:
    """Start counting the peak of allocated CUDA memory afresh (nothing to do on other devices)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float | None:
    """The most CUDA memory that tensors held since `reset_peak_memory`, in MiB; None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def build_trainer(device: DeviceSettings, callbacks: list[pl.Callback] | None = None, *,
                  results: str | None = None, max_epochs: int = 1, **options) -> pl.Trainer:
    """The Trainer for the device of `accelerator`.

    Args:
        device: device and precision.
        callbacks: the run's callbacks (tests and benchmarks add theirs here).
        results: Lightning's default root folder.
        max_epochs: epochs of a fit.
        options: further pl.Trainer arguments (check_val_every_n_epoch, gradient_clip_val, limit_val_batches...).
    """
    kind, devices = accelerator(device)
    distributed = devices * device.nodes > 1
    if kind == "gpu":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    settings = dict(
        accelerator=kind,
        devices=devices,
        num_nodes=device.nodes,
        strategy="ddp" if distributed else "auto",
        precision=precision(device),
        max_epochs=max_epochs,
        num_sanity_val_steps=0,
        callbacks=list(callbacks or []),
        plugins=[AtomicCheckpointIO()],
        logger=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        default_root_dir=results,
        enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(),  # a bar redrawn in a log file is noise: per-epoch lines remain
    )
    try:
        return pl.Trainer(**{**settings, **options})
    except (MisconfigurationException, ValueError) as error:  # an accelerator unknown or absent here
        raise UserError(f"--accelerator {kind}: {error}") from None


def free_device_memory(device: torch.device) -> int:
    """Bytes a CUDA device can still allocate (prediction decides from it where a case's scores go)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device from a name, checked to exist (CUDA)."""
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"device {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device}: no CUDA device is available; predict on the cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UserError(f"device {device}: there are {torch.cuda.device_count()} CUDA device(s)")
    return resolved
