"""Training step and sliding-window prediction: ours against MONAI in plain PyTorch and nnU-Net v2.

All three run the same network on the same plan (an MSD task's patch size and spacing from
`data_preprocessing/configs.py`): a 3D U-Net with the planned kernels and strides, two convolutions per
level, instance norm and LeakyReLU, on random volumes drawn once (no data loading is timed).

Training step (forward, Dice + cross-entropy loss, backward, optimizer step, one batch of random patches):
  * ours: `main.py --benchmark --exec_mode train --task NN` in this process (the LightningModule and Trainer);
  * MONAI: `monai.networks.nets.DynUNet` with `monai.losses.DiceCELoss` and Adam in a plain PyTorch loop;
  * nnU-Net v2: `nnUNetTrainer.train_step` (its SGD, gradient clipping and loss), deep supervision off.
Prediction of one volume (sliding windows, overlap --overlap, gaussian blending, no test-time flips):
  * ours: `NNUnet.infer`, as validation and `main.py --exec_mode predict` run it;
  * MONAI: `monai.inferers.sliding_window_inference` over the plain DynUNet, with our window batch;
  * nnU-Net v2: `nnUNetPredictor.predict_sliding_window_return_logits` (one window per forward pass).
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from argparse import Namespace
from pathlib import Path

import torch

from benchmarks import nnunet_v2
from benchmarks.measure import Comparison
from nnunet.benchmark import benchmark, task_plan
from nnunet.nn_unet import NNUnet, model_settings
from utils import args as cli
from utils.args import parse_main_args

MONAI = "MONAI (plain PyTorch)"
FP32_NOTE = "float32: nnU-Net v2 autocasts on CUDA only"


def plan(task: str, filters: list[int] | None) -> tuple[dict, list, list, list[int]]:
    """(task config, kernels, strides, filters) of MSD task `task`'s 3D plan and its default network."""
    config = task_plan(task, 3)
    network = config["network"]
    kernels, strides = network["kernels"], network["strides"]
    filters = list(filters or network["features"])[: len(kernels)]
    return config, kernels, strides, filters


def our_module(args: Namespace, config: dict) -> NNUnet:
    """The LightningModule main.py builds for these arguments and plan."""
    model = model_settings(config, 3, cli.model_flags(args), cli.targets(args), args.focal)
    return NNUnet(config, model, cli.optim_settings(args), cli.inference_settings(args))


def our_args(settings: Namespace, filters: list[int], steps: int, warmup: int, results: Path,
             mode: str = "train") -> Namespace:
    """main.py arguments of our benchmark mode for the harness settings (task, batch, overlap, amp)."""
    argv = ["--benchmark", "--exec_mode", mode, "--task", settings.task, "--batch_size", str(settings.batch_size),
            "--train_batches", str(steps), "--test_batches", str(steps), "--warmup", str(warmup),
            "--results", str(results), "--overlap", str(settings.overlap), "--seed", "0",
            "--filters", *map(str, filters)]
    return parse_main_args([*argv, "--amp"] if settings.amp else argv)


def autocast(enabled: bool):
    """bf16 autocast on the CPU, as `main.py --amp` runs there."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def monai_network(config: dict, kernels: list, strides: list, filters: list[int]) -> torch.nn.Module:
    from monai.networks.nets import DynUNet

    return DynUNet(3, config["in_channels"], config["n_class"], kernels, strides, strides[1:], filters=filters,
                   norm_name=("INSTANCE", {"affine": True}),
                   act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}))


def monai_training_seconds(network: torch.nn.Module, config: dict, batch_size: int, steps: int, warmup: int,
                           amp: bool = False) -> float:
    """Mean seconds of a plain PyTorch training step of `network` after `warmup` untimed ones."""
    from monai.losses import DiceCELoss

    generator = torch.Generator().manual_seed(0)
    image = torch.randn(batch_size, config["in_channels"], *config["patch_size"], generator=generator)
    label = torch.randint(0, config["n_class"], (batch_size, 1, *config["patch_size"]), generator=generator)
    loss_function = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    optimizer = torch.optim.Adam(network.parameters(), lr=8e-4, weight_decay=1e-4)
    network.train()
    seconds = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast(amp):
            loss = loss_function(network(image), label)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            seconds.append(time.perf_counter() - start)
    return statistics.fmean(seconds)


def quiet_lightning() -> None:
    """Lightning's banners and hints, once per Trainer, would bury the table."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning")


def compare_training(scratch: Path, settings: Namespace) -> list[Comparison]:
    """Mean training-step time (ms) per round of ours, MONAI's loop and nnU-Net v2's trainer, alternating.

    Args:
        settings: the harness's arguments (benchmarks/run_all.py): task, filters, batch_size, steps, warmup,
            repeats, amp, nnunet_python.
    """
    quiet_lightning()
    config, kernels, strides, filters = plan(settings.task, settings.filters)
    stage = f"train step, task {config['task']}, batch {settings.batch_size}{', amp' if settings.amp else ''}"
    python, why = nnunet_v2.find_python(settings.nnunet_python)
    against_monai = Comparison(stage, "step ms", MONAI)
    against_nnunet = Comparison(stage, "step ms", nnunet_v2.PEER, note=why or (FP32_NOTE if settings.amp else ""))
    network = monai_network(config, kernels, strides, filters)
    spec = {**nnunet_v2.network_spec(config, kernels, strides, filters, settings.batch_size), "mode": "train",
            "warmup": settings.warmup, "steps": settings.steps, "threads": torch.get_num_threads()}

    def ours(steps: int) -> float:
        args = our_args(settings, filters, steps, settings.warmup, scratch / "ours_train")
        return benchmark(cli.benchmark_settings(args), cli.loader_settings(args), cli.device_settings(args),
                         cli.model_flags(args), cli.optim_settings(args))["latency_mean"]

    def monai(steps: int) -> float:
        return 1000 * monai_training_seconds(network, config, settings.batch_size, steps, settings.warmup,
                                             settings.amp)

    # One untimed round first: the process's first steps pay one-time costs (kernel selection, allocator growth)
    # that would otherwise fall on whichever contender runs first.
    ours(1), monai(1)
    for _ in range(settings.repeats):
        mine = ours(settings.steps)
        against_monai.ours.append(mine)
        against_monai.theirs.append(monai(settings.steps))
        if python:
            against_nnunet.ours.append(mine)
            seconds = nnunet_v2.time_steps(python, spec, scratch / "nnunet_v2_train")
            against_nnunet.theirs.append(1000 * statistics.fmean(seconds))
        elif not against_nnunet.ours:
            against_nnunet.ours.append(mine)
    return [against_monai, against_nnunet]


def compare_prediction(scratch: Path, settings: Namespace) -> list[Comparison]:
    """Seconds to predict one volume per round: ours, MONAI's sliding_window_inference, nnU-Net v2's predictor.

    Args:
        settings: the harness's arguments: task, filters, volume_shape, overlap, repeats, amp, nnunet_python.
    """
    from monai.inferers import sliding_window_inference

    config, kernels, strides, filters = plan(settings.task, settings.filters)
    shape = list(settings.volume_shape or [2 * size for size in config["patch_size"]])
    stage = f"predict {'x'.join(map(str, shape))}, task {config['task']}{', amp' if settings.amp else ''}"
    args = our_args(settings, filters, 1, 0, scratch / "ours_predict", mode="predict")
    model = our_module(args, config).eval()
    network = monai_network(config, kernels, strides, filters).eval()
    image = torch.randn(1, config["in_channels"], *shape, generator=torch.Generator().manual_seed(0))
    window_batch = args.val_batch_size

    def ours() -> float:
        start = time.perf_counter()
        with autocast(settings.amp):
            model.infer(image)
        return time.perf_counter() - start

    def monai() -> float:
        start = time.perf_counter()
        with autocast(settings.amp):
            sliding_window_inference(image, config["patch_size"], window_batch, network, overlap=settings.overlap,
                                     mode="gaussian", sigma_scale=0.125, padding_mode="constant")
        return time.perf_counter() - start

    python, why = nnunet_v2.find_python(settings.nnunet_python)
    against_monai = Comparison(stage, "s / case", MONAI, note=f"{window_batch} windows per forward pass in both")
    against_nnunet = Comparison(stage, "s / case", nnunet_v2.PEER,
                                note=why or "one window per forward pass" + (f"; {FP32_NOTE}" if settings.amp else ""))
    spec = {**nnunet_v2.network_spec(config, kernels, strides, filters, 2), "mode": "predict",
            "volume_shape": shape, "overlap": settings.overlap, "warmup": 1, "steps": 1,
            "threads": torch.get_num_threads()}
    with torch.inference_mode():
        ours(), monai()  # warmup: first-call allocations and kernel choices
        for _ in range(settings.repeats):
            mine = ours()
            against_monai.ours.append(mine)
            against_monai.theirs.append(monai())
            if python:
                against_nnunet.ours.append(mine)
                seconds = nnunet_v2.time_steps(python, spec, scratch / "nnunet_v2_predict")
                against_nnunet.theirs.append(statistics.fmean(seconds))
            elif not against_nnunet.ours:
                against_nnunet.ours.append(mine)
    return [against_monai, against_nnunet]
