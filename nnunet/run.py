"""What `main.py` runs: training, evaluation of a checkpoint, prediction and benchmarks.

The one place that picks the device: `accelerator()` decides CPU or CUDA from `--gpus` and what
the machine has, and everything else follows from the Trainer it configures.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from argparse import Namespace
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from tqdm import tqdm

from data_loading.data_module import DataModule
from data_preprocessing.plans import check_plan_memory
from data_preprocessing.preprocessor import case_meta, image_cases, load_case, preprocess_arrays
from nnunet.callbacks import LAST, AtomicCheckpointIO, CheckpointSaver, EpochLogger, FiniteLossGuard
from nnunet.mlperf import MLPerfLogger, MLPerfReport, QualityThreshold
from nnunet.nn_unet import PREDICTIONS, NNUnet
from nnunet.preemption import PreemptionCheckpoint, StopPredictionOnSigterm
from utils.args import accelerator_kind
from utils.errors import UserError
from utils.io import check_writable, remove_stale_temporaries, removing_new_empty_folders

CHECKPOINTS = "checkpoints"


# ----------------------------------------------------------------------------------------------
# Device and trainer
# ----------------------------------------------------------------------------------------------
def accelerator(args: Namespace) -> tuple[str, int]:
    """The Lightning accelerator and its devices per node, checked against the machine.

    ("gpu", --gpus) for CUDA, ("cpu", --cpu_processes) for the CPU, (name, max(--gpus, 1)) for any other
    accelerator named by --accelerator (mps, xpu, ...), which Lightning checks when the Trainer is built.
    """
    kind = accelerator_kind(args)
    if kind == "cpu":
        return "cpu", args.cpu_processes
    devices = max(args.gpus, 1)
    if kind == "gpu":
        if not torch.cuda.is_available():
            raise UserError(f"--gpus {args.gpus} was given but no CUDA device is available; use --gpus 0 for the CPU")
        if devices > torch.cuda.device_count():
            raise UserError(f"--gpus {devices} was given but only {torch.cuda.device_count()} CUDA devices exist")
    return kind, devices


def amp_dtype(args: Namespace) -> str | None:
    """The autocast dtype of the run, "fp16" or "bf16", or None without --amp.

    --amp_dtype when given, else fp16 (with a gradient scaler) on CUDA and bf16 on the CPU.
    """
    if not args.amp:
        return None
    kind = accelerator(args)[0]
    if kind not in ("gpu", "cpu"):
        raise UserError(f"--amp runs on CUDA (fp16 or bf16) or the CPU (bf16); --accelerator {kind} trains in FP32: "
                        f"drop --amp")
    chosen = getattr(args, "amp_dtype", None) or ("fp16" if kind == "gpu" else "bf16")
    if chosen == "fp16" and kind == "cpu":
        raise UserError("--amp_dtype fp16 runs on CUDA only; on the CPU use --amp_dtype bf16 (the default there)")
    return chosen


def precision(args: Namespace) -> str:
    """The Lightning precision: "32-true", or with --amp "16-mixed" (fp16, gradient scaler) or "bf16-mixed"."""
    return {None: "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}[amp_dtype(args)]


def reset_peak_memory(device: torch.device) -> None:
    """Start counting the peak of allocated CUDA memory afresh (nothing to do on other devices)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float | None:
    """The most CUDA memory that tensors held since `reset_peak_memory`, in MiB; None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def build_trainer(args: Namespace, callbacks: list[pl.Callback], max_epochs: int | None = None,
                  **options) -> pl.Trainer:
    """The Trainer for the device of `accelerator`; `options` are further pl.Trainer arguments."""
    kind, devices = accelerator(args)
    distributed = devices * args.nodes > 1
    if kind == "gpu":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    settings = dict(
        accelerator=kind,
        devices=devices,
        num_nodes=args.nodes,
        strategy="ddp" if distributed else "auto",
        precision=precision(args),
        max_epochs=max_epochs if max_epochs is not None else args.epochs,
        check_val_every_n_epoch=args.eval_every,
        num_sanity_val_steps=0,
        gradient_clip_val=args.gradient_clip_val or None,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        logger=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        default_root_dir=args.results,
        enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(),  # a bar redrawn in a log file is noise: per-epoch lines remain
    )
    try:
        return pl.Trainer(**{**settings, **options})
    except (MisconfigurationException, ValueError) as error:  # an accelerator unknown or absent here
        raise UserError(f"--accelerator {kind}: {error}") from None


# ----------------------------------------------------------------------------------------------
# Task and checkpoints
# ----------------------------------------------------------------------------------------------
def load_task_config(data: str | os.PathLike) -> dict:
    """config.json of a preprocessed task folder (or of the task above a val/ or test/ folder)."""
    data = Path(data)
    for folder in (data, data.parent):
        path = folder / "config.json"
        if path.is_file():
            with open(path) as handle:
                return json.load(handle)
    raise UserError(f"{data} has no config.json: point --data at a folder written by preprocess.py")


def check_compatible(checkpoint_config: dict, data_config: dict, path: str) -> None:
    """A checkpoint must have been trained for the data's channels and classes."""
    for key, what in (("in_channels", "input channels"), ("n_class", "classes")):
        if checkpoint_config.get(key) != data_config.get(key):
            raise UserError(
                f"checkpoint {path} was trained for {checkpoint_config.get(key)} {what} but the data at --data has "
                f"{data_config.get(key)}; use a checkpoint of this task")


def check_same_geometry(checkpoint_config: dict, data_config: dict, path: str) -> None:
    """Evaluating or predicting needs data resampled as the checkpoint's training data was: the same grid in mm."""
    if checkpoint_config.get("dim") != data_config.get("dim"):
        raise UserError(f"checkpoint {path} was trained on data preprocessed for {checkpoint_config.get('dim')}D but "
                        f"the data at --data was preprocessed for {data_config.get('dim')}D; preprocess it with "
                        f"--dim {checkpoint_config.get('dim')}")
    trained, given = checkpoint_config.get("spacing"), data_config.get("spacing")
    if trained is None or given is None or len(trained) != len(given) or \
            any(abs(a - b) > 1e-3 * max(abs(a), abs(b), 1e-6) for a, b in zip(trained, given)):
        raise UserError(f"checkpoint {path} was trained on data resampled to {trained} mm but the data at --data is "
                        f"resampled to {given} mm; preprocess it with the checkpoint's task plan")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint file safely (tensors and plain types only) with a clear error if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower():
            raise UserError(f"{path} is not a readable checkpoint ({_first_line(error)})") from None
        # torch's message advises loading with weights_only=False, which runs any code the file holds.
        raise UserError(f"{path} is not a safe checkpoint: it holds Python objects beyond tensors and plain "
                        f"values, which could run code when loaded; use a checkpoint written by this program") from None
    except Exception as error:  # torch raises many types for damaged or foreign files
        raise UserError(f"{path} is not a readable checkpoint ({_first_line(error)})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise UserError(f"{path} is not a checkpoint written by this program (no weights or hyper-parameters)")
    hparams = checkpoint["hyper_parameters"]
    if not isinstance(hparams, dict) or not isinstance(hparams.get("config"), dict) or \
            not isinstance(hparams.get("args"), dict) or not isinstance(checkpoint["state_dict"], dict):
        raise UserError(f"{path} is not a checkpoint written by this program (no task plan or arguments)")
    return checkpoint


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def model_from_checkpoint(path: str | os.PathLike, args: Namespace | None = None,
                          data_config: dict | None = None) -> NNUnet:
    """Rebuild the network a checkpoint was trained with and load its weights.

    The architecture and task come from the checkpoint; run-time flags (overlap, blend, batch sizes, TTA,
    results) come from `args` when given.
    """
    checkpoint = read_checkpoint(path)
    hparams = checkpoint["hyper_parameters"]
    config = hparams["config"]
    if data_config is not None:
        check_compatible(config, data_config, str(path))
        check_same_geometry(config, data_config, str(path))
    stored = dict(hparams["args"])
    trained_dim = stored.get("dim") or config.get("dim")
    if args is not None and args.dim is not None and args.dim != trained_dim:
        raise UserError(f"checkpoint {path} holds a {trained_dim}D network; --dim {args.dim} cannot change that "
                        f"(drop --dim, or use a {args.dim}D checkpoint)")
    if args is not None:
        for key in ("overlap", "blend", "val_batch_size", "tta", "save_preds", "save_probs", "overlay", "results",
                    "data", "exec_mode", "amp", "amp_dtype", "gpus", "num_workers", "input", "benchmark",
                    "test_batches", "warmup", "fold", "nfolds"):
            stored[key] = getattr(args, key)
    try:
        model = NNUnet(stored, config)
    except (KeyError, AttributeError, TypeError) as error:  # a plan or arguments missing entries this version needs
        raise UserError(f"checkpoint {path} lacks a setting this program needs ({type(error).__name__}: {error}); "
                        f"it was written by another version or program") from None
    mismatch = state_dict_mismatch(model, checkpoint["state_dict"])
    if mismatch:
        raise UserError(f"checkpoint {path} does not fit the network it describes ({mismatch})")
    model.load_state_dict(checkpoint["state_dict"])
    model.best_dice = float(checkpoint.get("nnunet", {}).get("best_dice", 0.0))
    model.best_epoch = int(checkpoint.get("nnunet", {}).get("best_epoch", -1))
    return model


def load_weights(model: NNUnet, path: str | os.PathLike) -> None:
    """Start training from a checkpoint's weights (same architecture), not from its optimizer state."""
    checkpoint = read_checkpoint(path)
    check_compatible(checkpoint["hyper_parameters"]["config"], model.config, str(path))
    mismatch = state_dict_mismatch(model, checkpoint["state_dict"])
    if mismatch:
        raise UserError(f"checkpoint {path} has another architecture than the network of these flags ({mismatch})")
    model.load_state_dict(checkpoint["state_dict"])


def state_dict_mismatch(model: NNUnet, state_dict: dict) -> str | None:
    """The first tensor whose name or shape differs between the network and a checkpoint's weights, or None."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    stored = {name: tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
              for name, tensor in state_dict.items()}
    for name in sorted(expected.keys() | stored.keys()):
        if expected.get(name) != stored.get(name):
            return (f"{name}: {stored.get(name, 'missing')} in the checkpoint, "
                    f"{expected.get(name, 'absent')} in the network")
    return None


def check_fits(model: NNUnet, checkpoint: dict, path: str | os.PathLike) -> None:
    """A checkpoint to resume from must be of this task and hold exactly the tensors of this network."""
    check_compatible(checkpoint["hyper_parameters"]["config"], model.config, str(path))
    check_same_geometry(checkpoint["hyper_parameters"]["config"], model.config, str(path))
    mismatch = state_dict_mismatch(model, checkpoint["state_dict"])
    if mismatch:
        raise UserError(f"checkpoint {path} has another architecture than the network of these flags ({mismatch}); "
                        f"resume with the flags it was trained with")


# ----------------------------------------------------------------------------------------------
# Modes
# ----------------------------------------------------------------------------------------------
def train(args: Namespace) -> NNUnet:
    config = load_task_config(args.data)
    if isinstance(config.get("patch_size"), list):  # before any output: an absurd plan fails here, not in DALI
        patch = config["patch_size"][-(args.dim or config.get("dim", 3)):]
        check_plan_memory(patch, int(config.get("in_channels", 1)), args.batch_size,
                          str(Path(args.data) / "config.json"))
    results = Path(args.results)
    checkpoints = results / CHECKPOINTS
    # Before any work: a results folder that cannot be written would otherwise fail after the first epoch.
    check_writable(checkpoints)
    if args.mlperf_log:
        check_mlperf_log(Path(args.mlperf_log))
    remove_stale_temporaries(checkpoints)  # left by a run killed while writing a checkpoint
    if args.seed is not None:
        pl.seed_everything(args.seed, workers=True, verbose=False)
    model = NNUnet(vars(args), config)
    resume = None
    if args.resume_training:
        resume = Path(args.ckpt_path) if args.ckpt_path else checkpoints / LAST
        if not resume.is_file():
            raise UserError(f"--resume_training: no checkpoint at {resume}; train without it or pass --ckpt_path")
        # Clear errors for a damaged file or another task or network before Lightning loads it.
        check_fits(model, read_checkpoint(resume), resume)
    elif args.ckpt_path:
        load_weights(model, args.ckpt_path)
    datamodule = DataModule(args)
    callbacks: list[pl.Callback] = [
        FiniteLossGuard(),  # first: an epoch whose loss is not finite is neither logged nor saved
        EpochLogger(results, args.logname, vars(args), names=model.class_names if args.brats else None,
                    report=MLPerfReport() if args.log_line == "mlperf" else None),
        EarlyStopping(monitor="dice_mean", mode="max", patience=args.patience, strict=False,
                      check_on_train_epoch_end=False),
    ]
    if args.quality_threshold is not None:
        callbacks.append(QualityThreshold(args.quality_threshold))
    if args.mlperf_log:
        callbacks.append(MLPerfLogger(args.mlperf_log, args, len(datamodule.train_cases), len(datamodule.val_cases),
                                      model.patch_size, args.quality_threshold))
    if args.save_ckpt:
        callbacks.append(CheckpointSaver(checkpoints))
    # Last: an epoch that ends is logged and saved before a pending stop.
    callbacks.append(PreemptionCheckpoint(checkpoints, refresh_at_end=not args.save_ckpt))
    trainer = build_trainer(args, callbacks)
    print_run_summary(args, model, datamodule)
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume) if resume else None,
                weights_only=True if resume else None)
    return model


def check_mlperf_log(path: Path) -> None:
    """--mlperf_log must name a file in a writable folder (events are appended to it)."""
    if path.is_dir():
        raise UserError(f"--mlperf_log {path} is a folder; name a file")
    check_writable(path.resolve().parent)


@rank_zero_only
def print_run_summary(args: Namespace, model: NNUnet, datamodule: DataModule) -> None:
    """One line before training: network, device, precision, fold and where the results go."""
    kind, devices = accelerator(args)
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"training a {model.dim}D U-Net ({parameters:.2f} M parameters, patch {model.patch_size}, "
          f"{model.n_outputs} {model.activation} outputs) on {kind} x{devices * args.nodes}, {precision(args)}; "
          f"fold {args.fold}: {len(datamodule.train_cases)} training and {len(datamodule.val_cases)} validation "
          f"cases; results in {args.results}", flush=True)


def evaluate(args: Namespace) -> dict:
    if not args.ckpt_path:
        raise UserError("--exec_mode evaluate needs --ckpt_path, the checkpoint to validate")
    config = load_task_config(args.data)
    model = model_from_checkpoint(args.ckpt_path, args, config)
    trainer = build_trainer(args, [])
    trainer.validate(model, datamodule=DataModule(args), verbose=False)
    metrics = model.epoch_metrics
    if trainer.is_global_zero:
        print(format_dice_table(model.class_names, metrics, "MeanDice" if args.brats else "mean"))
    return metrics


def format_dice_table(names: list[str], metrics: dict, mean_name: str = "mean") -> str:
    rows = [f"{'class':<24} {'Dice':>8}"]
    rows += [f"D{i + 1} {name:<21} {value:8.4f}" for i, (name, value) in enumerate(zip(names, metrics["dice"]))]
    absent = metrics.get("dice_absent")
    note = f"  (without {', '.join(names[i - 1] for i in absent)}: in no validation label)" if absent else ""
    rows.append(f"{mean_name:<24} {metrics['dice_mean']:8.4f}{note}")
    rows.append(f"{'validation loss':<24} {metrics['val_loss']:8.4f}  ({metrics['cases']} cases)")
    return "\n".join(rows)


def predict(args: Namespace) -> list[str]:
    """Predict the preprocessed cases of --data (its test/ folder, or a val/ folder), or the raw images of --input."""
    if not args.ckpt_path:
        raise UserError("--exec_mode predict needs --ckpt_path, the checkpoint to predict with")
    if args.save_preds or args.save_probs or args.overlay:
        check_writable(Path(args.results) / PREDICTIONS)  # before any case is predicted
    if args.input:
        return predict_raw(args)
    config = load_task_config(args.data)
    model = model_from_checkpoint(args.ckpt_path, args, config)
    datamodule = DataModule(args)
    model.meta_dir = str(datamodule.case_dir)
    trainer = build_trainer(args, [StopPredictionOnSigterm()])
    trainer.predict(model, datamodule=datamodule, return_predictions=False)
    cases = datamodule.test_cases
    if trainer.is_global_zero:
        report_predictions(args, len(cases))
    return cases


def predict_raw(args: Namespace) -> list[str]:
    """Preprocess each raw NIfTI image of --input as the checkpoint's task was preprocessed, predict, export."""
    folder = Path(args.input)
    if not folder.is_dir():
        raise UserError(f"--input {folder} is not a folder of NIfTI images")
    model = model_from_checkpoint(args.ckpt_path, args)
    config = model.config
    if accelerator(args)[1] * args.nodes > 1:
        raise UserError("--input predicts in one process: use one device (--gpus 1 or 0, --cpu_processes 1)")
    device = build_trainer(args, []).strategy.root_device
    model.to(device).eval()
    dtype = {None: None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp_dtype(args)]
    cases = image_cases(folder, config["in_channels"])
    label_values = [int(k) for k in config["labels"]]
    for case in tqdm(cases, desc="predicting", unit="case", disable=None):
        loaded = load_case(folder, case, config["in_channels"], label_values)
        image, _, geometry = preprocess_arrays(loaded, config, training=False)
        tensor = torch.from_numpy(image)[None].to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            probabilities = model.infer(tensor, tta=args.tta, activation=model.activation)[0]
        model.export(case.case_id, tensor[0], probabilities, case_meta(case, loaded, geometry))
    report_predictions(args, len(cases))
    return [case.case_id for case in cases]


def report_predictions(args: Namespace, count: int) -> None:
    folder = Path(args.results) / PREDICTIONS
    if args.save_preds or args.save_probs or args.overlay:
        print(f"predicted {count} case(s) into {folder}")
    else:
        print(f"predicted {count} case(s); nothing written (add --save_preds to write NIfTI labels)")


def run(args: Namespace) -> None:
    """Run the mode of `args`; a run that fails leaves none of the results folders it created empty."""
    results = Path(args.results)
    with removing_new_empty_folders(results / CHECKPOINTS, results / PREDICTIONS):
        _run(args)


def _run(args: Namespace) -> None:
    if args.benchmark:
        # Imported here: the benchmark module builds on this one's trainer and checkpoint helpers.
        from nnunet.benchmark import benchmark

        benchmark(args)
    elif args.exec_mode == "train":
        train(args)
    elif args.exec_mode == "evaluate":
        evaluate(args)
    else:
        predict(args)
