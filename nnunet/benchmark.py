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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from data_loading.data_module import DataModule
from data_preprocessing import configs
from data_preprocessing.network_plan import plan_network
from data_preprocessing.planner import suggest_batch_size
from data_preprocessing.plans import network_window, read_config
from nnunet.checkpoints import model_from_checkpoint
from nnunet.network import set_layout
from nnunet.nn_unet import NNUnet, model_settings
from nnunet.trainer import accelerator, amp_dtype, build_trainer, peak_memory_mib, reset_peak_memory
from utils.errors import UserError
from utils.io import save_json
from utils.logger import DLLogger, latency_summary, time_batches
from utils.settings import BenchmarkSettings, DeviceSettings, LoaderSettings, OptimSettings
from utils.task_folders import task_number

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
        dim, in_channels, n_class, labels, spacing (mm, (D, H, W)), patch_size ((D, H, W), or (H, W) in 2D),
        batch_size and network (the default preset's for that patch).
    """
    number = task_number(task)
    if number not in configs.MSD_CHANNELS:
        raise UserError(f"--task {task} is not an MSD task with a known plan; use 01 to 10, or benchmark a "
                        f"preprocessed task with --data")
    classes = configs.MSD_CLASSES[number]
    patch = list(configs.PATCH_SIZES[f"{number}_{dim}d"])
    spacing = list(configs.SPACINGS[number])
    return {
        "task": number,
        "task_name": configs.MSD_TASKS[number],
        "dim": dim,
        "in_channels": configs.MSD_CHANNELS[number],
        "n_class": classes,
        "labels": {str(value): "background" if value == 0 else f"class {value}" for value in range(classes)},
        "spacing": spacing,
        "patch_size": patch,
        "batch_size": suggest_batch_size(patch),
        "planner": "default",
        "network": plan_network(patch, spacing[-dim:]).to_dict(),
    }


def random_batch(config: dict, dim: int, batch_size: int, labelled: bool, seed: int | None = None) -> dict:
    """A batch of random patches for the plan `config`.

    Returns:
        {"image": (B, C, *patch) float32 standard normal, "label": (B, 1, *patch) uint8 in [0, n_class)} with
        B = `batch_size`; without "label" unless `labelled`.
    """
    generator = torch.Generator().manual_seed(seed if seed is not None else 0)
    shape = (batch_size, *network_window(config, dim))
    batch = {"image": torch.randn(shape[0], config["in_channels"], *shape[1:], generator=generator)}
    if labelled:
        batch["label"] = torch.randint(0, config["n_class"], (shape[0], 1, *shape[1:]), generator=generator,
                                       dtype=torch.uint8)
    return batch


def benchmark(bench: BenchmarkSettings, loader: LoaderSettings, device: DeviceSettings, flags: dict | None = None,
              optim: OptimSettings | None = None, callbacks: list[pl.Callback] | None = None) -> dict:
    """Time training or prediction steps and report them (see the module docstring).

    Args:
        bench: mode, warmup and timed steps, batch size, the MSD task of random volumes (or None: the data of
            `loader`), a checkpoint to time, where to report.
        loader: the data of a preprocessed task (unused with `bench.task`).
        device: device and precision.
        flags: model flags (`utils.args.model_flags`): overrides of the plan's network, or checked against the
            checkpoint's.
        optim: the optimiser of a training benchmark.
        callbacks: further Lightning callbacks.

    Returns:
        The perf.json record: mode, device, devices, dim, patch_size, in_channels, batch_size,
        global_batch_size, amp, amp_dtype ("fp16", "bf16" or None), warmup, steps, data, throughput (images/s),
        latency_mean and latency_90/95/99 (ms), and peak_memory_mib: the most CUDA memory tensors held during the
        run (None off CUDA).
    """
    if bench.mode not in ("train", "predict"):
        raise UserError(f"--benchmark times --exec_mode train or predict, not {bench.mode}")
    training = bench.mode == "train"
    flags = flags or {}
    if bench.seed is not None:
        pl.seed_everything(bench.seed, workers=True, verbose=False)
    if bench.task is not None:
        if bench.steps == 0:
            flag = "--train_batches" if training else "--test_batches"
            raise UserError(f"--benchmark with --task needs {flag}, the number of timed steps")
        config = task_plan(bench.task, bench.dim or 3)
        batch_size = bench.batch_size or config["batch_size"]
        batch = random_batch(config, bench.dim or 3, batch_size, training, bench.seed)
        if accelerator(device)[0] == "gpu":
            batch = {key: value.pin_memory() for key, value in batch.items()}  # copied to the GPU asynchronously
        batches = RandomBatches(batch, bench.warmup + bench.steps)
        data = {"train_dataloaders": batches} if training else {"dataloaders": batches}
        source = f"random volumes, task {config['task']} plan"
    else:
        config = read_config(loader.data)
        datamodule = DataModule(loader.replace(mode=bench.mode, benchmark=True, batch_size=bench.batch_size))
        batch_size = datamodule.batch_size
        data = {"datamodule": datamodule}
        source = str(loader.data)
    if bench.ckpt_path:
        model = model_from_checkpoint(bench.ckpt_path, None, config, flags)
    else:
        settings = model_settings(config, bench.dim, flags, flags.get("targets", "labels"), flags.get("focal", False))
        model = NNUnet(config, settings, optim)
    timer = StepTimer(bench.warmup)
    trainer = build_trainer(device, [timer, *(callbacks or [])], results=bench.results, max_epochs=1,
                            limit_val_batches=0, enable_progress_bar=False)
    reset_peak_memory(trainer.strategy.root_device)
    if training:
        trainer.fit(model, **data)
    else:
        trainer.predict(ForwardPass(model.model, model.dim), return_predictions=False, **data)
    if not timer.step_seconds:
        raise UserError(f"no step was timed: the loader gave no batch after the {bench.warmup} warmup steps")
    record = {
        "mode": bench.mode,
        "device": trainer.strategy.root_device.type,
        "devices": trainer.world_size,
        "dim": model.dim,
        "patch_size": model.patch_size,
        "in_channels": config["in_channels"],
        "batch_size": batch_size,
        "global_batch_size": batch_size * trainer.world_size,
        "amp": bool(device.amp),
        "amp_dtype": amp_dtype(device),
        "warmup": bench.warmup,
        "steps": len(timer.step_seconds),
        "data": source,
        **latency_summary(timer.step_seconds, batch_size * trainer.world_size),
        "peak_memory_mib": peak_memory_mib(trainer.strategy.root_device),
    }
    if trainer.is_global_zero:
        print(f"{record['mode']} benchmark ({record['device']} x{record['devices']}, {record['dim']}D patch "
              f"{record['patch_size']}, batch {record['global_batch_size']}, {record['amp_dtype'] or 'fp32'}, "
              f"data: {source}, "
              f"{record['steps']} steps after {record['warmup']}): {record['throughput']:.2f} img/s, "
              f"{latency_line(record)}{memory_note(record)}", flush=True)
        write_record(record, Path(bench.results), bench.logname)
    return record


def benchmark_loader(loader: LoaderSettings, warmup: int, timed: int, results: str, logname: str) -> dict:
    """Patches/s and latency (ms) of the training loader of `loader.data` and fold; written to RESULTS/perf.json.

    Args:
        loader: the task, fold, batch size and sampling of the loader.
        warmup, timed: untimed, then timed batches.

    Returns:
        The perf.json record: mode ("loader"), device, num_workers, dim, patch_size, batch_size, warmup, steps,
        data, throughput (patches/s), latency_mean and latency_90/95/99 (ms).
    """
    # The loader's epoch: the warmup, then the timed batches.
    module = DataModule(loader.replace(mode="train", train_batches=warmup + timed))
    module.setup("fit")
    try:
        seconds = time_batches(module.train_dataloader(), warmup, timed)
    finally:
        module.teardown()
    record = {"mode": "loader", "device": module.device.kind, "num_workers": loader.num_workers, "dim": module.dim,
              "patch_size": module.patch_size, "batch_size": module.batch_size, "warmup": warmup, "steps": timed,
              "data": str(loader.data), **latency_summary(seconds, module.batch_size)}
    print(f"loader benchmark ({module.device.kind}, {loader.num_workers} threads, {module.dim}D patch "
          f"{module.patch_size}, batch {module.batch_size}, {timed} batches after {warmup}): "
          f"{record['throughput']:.2f} patches/s, {latency_line(record)}", flush=True)
    write_record(record, Path(results), logname)
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
