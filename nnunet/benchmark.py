"""Benchmark mode: training or prediction steps timed after a warmup, reported as throughput and latency.

`python main.py --benchmark --exec_mode train|predict ...` runs `--warmup` untimed steps, then
`--train_batches` (training) or `--test_batches` (prediction) timed ones, and reports images/s (global
batch / mean step time) and the step latency mean and 90th/95th/99th percentiles in ms: printed, appended
to the DLLogger log (`--logname`) and written to `perf.json` in `--results`.

Data: the benchmark loaders of a preprocessed task (`--data`; patches without augmentation), or with
`--task NN` random volumes of the patch size, channels and classes of MSD task NN's plan, drawn once and
reused every step so that only the model is timed.

A training step is a full one (forward, loss, backward, optimizer step); a prediction step is the network's
forward pass on a batch of `--batch_size` patches, as in NVIDIA's reference. Sliding-window inference of a
whole volume is that forward pass repeated over the windows, plus the blending.

`benchmark_loader` (`scripts/benchmark.py --mode loader`) times the training loader of `--data` alone, with
its augmentations, in patches/s.
"""

from __future__ import annotations

import time
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from data_loading.data_module import DataModule
from data_preprocessing import configs
from nnunet.network import set_layout
from nnunet.nn_unet import NNUnet, network_patch_size
from nnunet.run import (
    accelerator,
    amp_dtype,
    build_trainer,
    load_task_config,
    model_from_checkpoint,
    peak_memory_mib,
    reset_peak_memory,
)
from utils.errors import UserError
from utils.io import save_json
from utils.logger import DLLogger, latency_summary, time_batches

PERF_FILE = "perf.json"


class StepTimer(pl.Callback):
    """Durations of the training or prediction steps that follow `warmup` untimed ones.

    A timestamp is taken at the start of every timed step and once after the last: a step lasts from its
    start to the start of the next, so the time to fetch a batch counts, as it does in an epoch. An accelerator
    (CUDA, ...) is synchronised at those timestamps only (kernels run asynchronously, so a timestamp must
    wait for the work queued before it); on the CPU nothing is synchronised.

    Args:
        warmup: steps of each epoch that run before timing starts.
    """

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.starts: list[float] = []
        self.end: float | None = None

    @staticmethod
    def _now(pl_module: pl.LightningModule) -> float:
        if pl_module.device.type != "cpu":  # kernels run asynchronously on an accelerator
            torch.accelerator.synchronize(pl_module.device)
        return time.perf_counter()

    def _step_start(self, pl_module: pl.LightningModule, batch_idx: int) -> None:
        if batch_idx >= self.warmup:
            self.starts.append(self._now(pl_module))

    def _epoch_end(self, pl_module: pl.LightningModule) -> None:
        if self.starts:
            self.end = self._now(pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_start(pl_module, batch_idx)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end(pl_module)

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                               batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step_start(pl_module, batch_idx)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end(pl_module)

    @property
    def step_seconds(self) -> list[float]:
        """Duration of each timed step in seconds."""
        if self.end is None:
            return []
        return np.diff([*self.starts, self.end]).tolist()


class ForwardPass(pl.LightningModule):
    """The prediction benchmark's step: a network's forward pass on a batch of patches.

    Args:
        network: maps (B, C, *patch_size) to (B, K, *patch_size).
        dim: 2 or 3; a 3D network on the CPU runs channels-last, as `NNUnet.infer` runs it.
    """

    def __init__(self, network: torch.nn.Module, dim: int) -> None:
        super().__init__()
        self.network = network
        self.dim = dim

    def on_predict_start(self) -> None:
        set_layout(self.network, channels_last=self.device.type == "cpu" and self.dim == 3)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # Returned (Lightning warns about None) but not kept: the trainer runs with return_predictions=False.
        return self.network(batch["image"])


class RandomBatches:
    """The same batch `length` times: drawn once, so that the data costs nothing and the model alone is timed.

    Args:
        batch: {"image": (B, C, *patch) float32[, "label": (B, 1, *patch) uint8]}.
        length: batches per epoch.
    """

    def __init__(self, batch: dict[str, torch.Tensor], length: int) -> None:
        self.batch = batch
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for _ in range(self.length):
            yield self.batch


def task_plan(task: str, dim: int) -> dict:
    """A task config (docs/data_format.md) for MSD task `task` from the tables of `data_preprocessing.configs`.

    Args:
        task: "01" .. "10" (or "1", "Task01_BrainTumour").
        dim: 2 or 3.

    Returns:
        dim, in_channels, n_class, labels, spacing (mm, (D, H, W)) and patch_size ((D, H, W), or (H, W) in 2D).
    """
    number = configs.task_number(task)
    if number not in configs.MSD_CHANNELS:
        raise UserError(f"--task {task} is not an MSD task with a known plan; use 01 to 10, or benchmark a "
                        f"preprocessed task with --data")
    classes = configs.MSD_CLASSES[number]
    return {
        "task": number,
        "task_name": configs.MSD_TASKS[number],
        "dim": dim,
        "in_channels": configs.MSD_CHANNELS[number],
        "n_class": classes,
        "labels": {str(value): "background" if value == 0 else f"class {value}" for value in range(classes)},
        "spacing": list(configs.SPACINGS[number]),
        "patch_size": list(configs.PATCH_SIZES[f"{number}_{dim}d"]),
    }


def random_batch(config: dict, dim: int, batch_size: int, labelled: bool, seed: int | None = None) -> dict:
    """A batch of random patches for the plan `config`.

    Returns:
        {"image": (B, C, *patch) float32 standard normal, "label": (B, 1, *patch) uint8 in [0, n_class)} with
        B = `batch_size`; without "label" unless `labelled`.
    """
    generator = torch.Generator().manual_seed(seed if seed is not None else 0)
    shape = (batch_size, *network_patch_size(config, dim))
    batch = {"image": torch.randn(shape[0], config["in_channels"], *shape[1:], generator=generator)}
    if labelled:
        batch["label"] = torch.randint(0, config["n_class"], (shape[0], 1, *shape[1:]), generator=generator,
                                       dtype=torch.uint8)
    return batch


def timed_steps(args: Namespace) -> int:
    return args.train_batches if args.exec_mode == "train" else args.test_batches


def benchmark(args: Namespace) -> dict:
    """Time `--exec_mode train` or `predict` steps and report them (see the module docstring).

    Returns:
        The perf.json record: mode, device, devices, dim, patch_size, in_channels, batch_size,
        global_batch_size, amp, amp_dtype ("fp16", "bf16" or None), warmup, steps, data, throughput (images/s),
        latency_mean and latency_90/95/99 (ms), and peak_memory_mib: the most CUDA memory tensors held during the
        run (None off CUDA).
    """
    if args.exec_mode not in ("train", "predict"):
        raise UserError(f"--benchmark times --exec_mode train or predict, not {args.exec_mode}")
    training = args.exec_mode == "train"
    if args.seed is not None:
        pl.seed_everything(args.seed, workers=True, verbose=False)
    if args.task is not None:
        if timed_steps(args) == 0:
            flag = "--train_batches" if training else "--test_batches"
            raise UserError(f"--benchmark with --task needs {flag}, the number of timed steps")
        config = task_plan(args.task, args.dim or 3)
        batch = random_batch(config, args.dim or 3, args.batch_size, training, args.seed)
        if accelerator(args)[0] == "gpu":
            batch = {key: value.pin_memory() for key, value in batch.items()}  # copied to the GPU asynchronously
        batches = RandomBatches(batch, args.warmup + timed_steps(args))
        data = {"train_dataloaders": batches} if training else {"dataloaders": batches}
        source = f"random volumes, task {config['task']} plan"
    else:
        config = load_task_config(args.data)
        data = {"datamodule": DataModule(args)}
        source = str(args.data)
    if args.ckpt_path:
        model = model_from_checkpoint(args.ckpt_path, args, config)
    else:
        model = NNUnet(vars(args), config)
    timer = StepTimer(args.warmup)
    trainer = build_trainer(args, [timer], max_epochs=1, limit_val_batches=0, enable_progress_bar=False)
    reset_peak_memory(trainer.strategy.root_device)
    if training:
        trainer.fit(model, **data)
    else:
        trainer.predict(ForwardPass(model.model, model.dim), return_predictions=False, **data)
    if not timer.step_seconds:
        raise UserError(f"no step was timed: the loader gave no batch after the {args.warmup} warmup steps")
    record = {
        "mode": args.exec_mode,
        "device": trainer.strategy.root_device.type,
        "devices": trainer.world_size,
        "dim": model.dim,
        "patch_size": model.patch_size,
        "in_channels": config["in_channels"],
        "batch_size": args.batch_size,
        "global_batch_size": args.batch_size * trainer.world_size,
        "amp": bool(args.amp),
        "amp_dtype": amp_dtype(args),
        "warmup": args.warmup,
        "steps": len(timer.step_seconds),
        "data": source,
        **latency_summary(timer.step_seconds, args.batch_size * trainer.world_size),
        "peak_memory_mib": peak_memory_mib(trainer.strategy.root_device),
    }
    if trainer.is_global_zero:
        print(f"{record['mode']} benchmark ({record['device']} x{record['devices']}, {record['dim']}D patch "
              f"{record['patch_size']}, batch {record['global_batch_size']}, {record['amp_dtype'] or 'fp32'}, "
              f"{record['steps']} steps after {record['warmup']}): {record['throughput']:.2f} img/s, "
              f"{latency_line(record)}{memory_note(record)}", flush=True)
        write_record(record, Path(args.results), args.logname)
    return record


def benchmark_loader(args: Namespace) -> dict:
    """Patches/s and latency (ms) of the training loader of --data, fold --fold; written to RESULTS/perf.json.

    Args:
        args: main.py arguments; train_batches timed batches follow warmup untimed ones.

    Returns:
        The perf.json record: mode ("loader"), device, num_workers, dim, patch_size, batch_size, warmup, steps,
        data, throughput (patches/s), latency_mean and latency_90/95/99 (ms).
    """
    args.exec_mode = "train"
    timed = args.train_batches
    args.train_batches = args.warmup + timed  # the loader's epoch: warmup, then the timed batches
    module = DataModule(args)
    module.setup("fit")
    try:
        seconds = time_batches(module.train_dataloader(), args.warmup, timed)
    finally:
        module.teardown()
    record = {"mode": "loader", "device": module.device.kind, "num_workers": args.num_workers, "dim": module.dim,
              "patch_size": module.patch_size, "batch_size": args.batch_size, "warmup": args.warmup, "steps": timed,
              "data": str(args.data), **latency_summary(seconds, args.batch_size)}
    print(f"loader benchmark ({module.device.kind}, {args.num_workers} threads, {module.dim}D patch "
          f"{module.patch_size}, batch {args.batch_size}, {timed} batches after {args.warmup}): "
          f"{record['throughput']:.2f} patches/s, {latency_line(record)}", flush=True)
    write_record(record, Path(args.results), args.logname)
    return record


def memory_note(record: dict) -> str:
    peak = record.get("peak_memory_mib")
    return "" if peak is None else f", peak GPU memory {peak:.0f} MiB"


def latency_line(record: dict) -> str:
    return (f"latency mean {record['latency_mean']:.1f} ms, p90 {record['latency_90']:.1f}, "
            f"p95 {record['latency_95']:.1f}, p99 {record['latency_99']:.1f} ms")


def write_record(record: dict, results: Path, logname: str) -> None:
    """Append a DLLogger record to `results/logname` and write `results/perf.json` (atomically)."""
    DLLogger(results / logname).log("benchmark", record)
    save_json(results / PERF_FILE, record)
