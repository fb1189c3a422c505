"""The modes `main.py` runs: training, evaluation of a checkpoint, prediction.

Each mode takes the typed settings it needs (built from the command line by `main.py` with `utils.args`)
and, for tests and benchmarks, extra Lightning callbacks. Benchmark mode is `nnunet.benchmark`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from data_loading.raw_images import raw_image_loader
from data_preprocessing.dicom import check_output_format
from data_preprocessing.plans import check_plan_memory, read_config
from nnunet.callbacks import EpochLogger, FiniteLossGuard
from nnunet.checkpoints import LAST, CheckpointSaver, check_fits, load_weights, model_from_checkpoint, read_checkpoint
from nnunet.loggers import ExperimentLog, build_loggers
from nnunet.mlperf import MLPerfLogger, MLPerfReport, QualityThreshold
from nnunet.nn_unet import PREDICTIONS, NNUnet
from nnunet.preemption import PreemptionCheckpoint, StopPredictionOnSigterm
from nnunet.trainer import accelerator, build_trainer, precision
from utils.errors import UserError
from utils.io import check_writable, remove_stale_temporaries
from utils.settings import (
    DeviceSettings,
    InferenceSettings,
    LoaderSettings,
    ModelSettings,
    OptimSettings,
    TrainingSettings,
)

if TYPE_CHECKING:  # the modes import it where they read preprocessed data: predicting raw images needs no DALI
    from data_loading.data_module import DataModule

CHECKPOINTS = "checkpoints"


def train(loader: LoaderSettings, model: ModelSettings, optim: OptimSettings, inference: InferenceSettings,
          device: DeviceSettings, training: TrainingSettings, callbacks: list[pl.Callback] | None = None) -> NNUnet:
    """Train on the fold of `loader`, writing checkpoints and logs to `training.results`."""
    from data_loading.data_module import DataModule

    config = read_config(loader.data)
    if training.seed is not None:  # before the network's weights are drawn
        pl.seed_everything(training.seed, workers=True, verbose=False)
    module = NNUnet(config, model, optim, inference)
    datamodule = DataModule(loader)
    # Before any output: an absurd plan fails here, not in DALI.
    check_plan_memory(module.patch_size, int(config["in_channels"]), datamodule.batch_size,
                      str(Path(loader.data) / "config.json"))
    results = Path(training.results)
    checkpoints = results / CHECKPOINTS
    # Before any work: a results folder that cannot be written would otherwise fail after the first epoch.
    check_writable(checkpoints)
    if training.mlperf_log:
        check_mlperf_log(Path(training.mlperf_log))
    remove_stale_temporaries(checkpoints)  # left by a run killed while writing a checkpoint
    resume = None
    if training.resume:
        resume = Path(training.ckpt_path) if training.ckpt_path else checkpoints / LAST
        if not resume.is_file():
            raise UserError(f"--resume_training: no checkpoint at {resume}; train without it or pass --ckpt_path")
        # Clear errors for a damaged file or another task or network before Lightning loads it.
        saved = read_checkpoint(resume)
        check_fits(module, saved, resume)
        print_resume(resume, saved)
    elif training.ckpt_path:
        load_weights(module, training.ckpt_path)
    run_callbacks: list[pl.Callback] = [
        FiniteLossGuard(),  # first: an epoch whose loss is not finite is neither logged nor saved
        EpochLogger(results, training.logname, training.params,
                    names=module.class_names if model.targets == "brats" else None,
                    line_names=module.class_names if model.targets == "regions" else None,
                    report=MLPerfReport() if training.log_line == "mlperf" else None),
        EarlyStopping(monitor="dice_mean", mode="max", patience=training.patience, strict=False,
                      check_on_train_epoch_end=False),
    ]
    loggers = build_loggers(training.loggers, results, run_name=f"fold_{loader.fold}")
    if loggers:
        run_callbacks.insert(2, ExperimentLog(training.params))
    if training.quality_threshold is not None:
        run_callbacks.append(QualityThreshold(training.quality_threshold))
    if training.mlperf_log:
        run_callbacks.append(MLPerfLogger(training.mlperf_log, training.quality_threshold))
    if training.save_ckpt:
        run_callbacks.append(CheckpointSaver(checkpoints))
    run_callbacks += callbacks or []
    # Last: an epoch that ends is logged and saved before a pending stop.
    run_callbacks.append(PreemptionCheckpoint(checkpoints, refresh_at_end=not training.save_ckpt))
    trainer = build_trainer(device, run_callbacks, results=training.results, max_epochs=optim.epochs,
                            min_epochs=training.min_epochs or None, check_val_every_n_epoch=optim.eval_every,
                            gradient_clip_val=training.gradient_clip_val or None, logger=loggers or False)
    print_run_summary(device, module, datamodule, training.results, loader.fold)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None,
                weights_only=True if resume else None)
    return module


@rank_zero_only
def print_resume(path: Path, checkpoint: dict) -> None:
    """The first line of a resumed run: the checkpoint and the (0-based) epoch training continues with: the
    epochs whose training had ended when it was written (an epoch cut short is run again)."""
    try:
        epoch = int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError, ValueError):
        epoch = int(checkpoint.get("epoch", -1)) + 1
    print(f"resuming from {path} at epoch {epoch}", flush=True)


def check_mlperf_log(path: Path) -> None:
    """--mlperf_log must name a file in a writable folder (events are appended to it)."""
    if path.is_dir():
        raise UserError(f"--mlperf_log {path} is a folder; name a file")
    check_writable(path.resolve().parent)


@rank_zero_only
def print_run_summary(device: DeviceSettings, model: NNUnet, datamodule: DataModule, results: str, fold: int) -> None:
    """One line before training: network, device, precision, fold and where the results go."""
    kind, devices = accelerator(device)
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    network = model.settings.network
    print(f"training a {model.dim}D {network.kind} ({network.n_stages} stages, {parameters:.2f} M parameters, patch "
          f"{model.patch_size}, batch {datamodule.batch_size}, {model.n_outputs} {model.activation} outputs) on "
          f"{kind} x{devices * device.nodes}, {precision(device)}; fold {fold}: {len(datamodule.train_cases)} "
          f"training and {len(datamodule.val_cases)} validation cases; results in {results}", flush=True)


def evaluate(loader: LoaderSettings, checkpoint: str | None, flags: dict, inference: InferenceSettings,
             device: DeviceSettings, callbacks: list[pl.Callback] | None = None) -> dict:
    """Validate a checkpoint on the fold of `loader`; prints and returns the Dice per class and their mean."""
    if not checkpoint:
        raise UserError("--exec_mode evaluate needs --ckpt_path, the checkpoint to validate")
    if inference.save_preds or inference.save_probs or inference.overlay:
        raise UserError(f"--exec_mode evaluate scores fold {loader.fold} and writes no files: to write its "
                        f"validation predictions, preprocess the cases with preprocess.py --exec_mode val and run "
                        f"--exec_mode predict --data TASK/val --fold {loader.fold} --save_preds")
    from data_loading.data_module import DataModule

    model = model_from_checkpoint(checkpoint, inference, read_config(loader.data), flags)
    trainer = build_trainer(device, callbacks)
    trainer.validate(model, datamodule=DataModule(loader), verbose=False)
    metrics = model.epoch_metrics
    if trainer.is_global_zero:
        print(format_dice_table(model.class_names, metrics, "MeanDice" if model.settings.targets == "brats"
                                else "mean"))
    return metrics


def format_dice_table(names: list[str], metrics: dict, mean_name: str = "mean") -> str:
    rows = [f"{'class':<24} {'Dice':>8}"]
    rows += [f"D{i + 1} {name:<21} {value:8.4f}" for i, (name, value) in enumerate(zip(names, metrics["dice"]))]
    absent = metrics.get("dice_absent")
    note = f"  (without {', '.join(names[i - 1] for i in absent)}: in no validation label)" if absent else ""
    rows.append(f"{mean_name:<24} {metrics['dice_mean']:8.4f}{note}")
    rows.append(f"{'validation loss':<24} {metrics['val_loss']:8.4f}  ({metrics['cases']} cases)")
    return "\n".join(rows)


def predict(loader: LoaderSettings, checkpoint: str | None, flags: dict, inference: InferenceSettings,
            device: DeviceSettings, raw_input: str | None = None,
            callbacks: list[pl.Callback] | None = None) -> list[str]:
    """Predict the preprocessed cases of `loader.data` (its test/ folder, a val/ folder, or with
    `loader.predict_fold` a fold's validation cases, whose Dice is printed), or with `raw_input` the raw NIfTI
    images of that folder, through Lightning's predict loop; returns the case ids."""
    if not checkpoint:
        raise UserError("--exec_mode predict needs --ckpt_path, the checkpoint to predict with")
    writes = inference.save_preds or inference.save_probs or inference.overlay
    if writes:
        check_writable(Path(inference.results) / PREDICTIONS)  # before any case is predicted
    trainer_callbacks = [StopPredictionOnSigterm(), *(callbacks or [])]
    started = time.perf_counter()
    if raw_input:
        model = model_from_checkpoint(checkpoint, inference, None, flags)
        if accelerator(device)[1] * device.nodes > 1:
            raise UserError("--input predicts in one process: use one device (--gpus 1 or 0, --cpu_processes 1)")
        images = raw_image_loader(raw_input, model.config, inference.dicom_channels)
        check_output_format(inference.output_format, images.dataset.cases)
        trainer = build_trainer(device, trainer_callbacks)
        try:
            trainer.predict(model, dataloaders=images, return_predictions=False)
        finally:
            model.finish_writing()  # the case being written is completed, also when prediction stops early
        cases = [case.case_id for case in images.dataset.cases]
    else:
        from data_loading.data_module import DataModule

        model = model_from_checkpoint(checkpoint, inference, read_config(loader.data), flags)
        datamodule = DataModule(loader)
        model.meta_dir = str(datamodule.case_dir)
        trainer = build_trainer(device, trainer_callbacks)
        if trainer.is_global_zero:
            print(f"predicting {datamodule.prediction_description()}", flush=True)
        try:
            trainer.predict(model, datamodule=datamodule, return_predictions=False)
        finally:
            model.finish_writing()
        cases = datamodule.test_cases
    wall = time.perf_counter() - started
    if trainer.is_global_zero:
        folder = Path(inference.results) / PREDICTIONS
        if model.epoch_metrics:
            print(format_prediction_dice(model.class_names, model.epoch_metrics))
        done = len(cases) - len(model.failed_cases)
        timing = f"in {wall:.1f} s, {model.window_seconds:.1f} s of it in the network's windows"
        print(f"predicted {done} case(s) into {folder} {timing}" if writes else
              f"predicted {done} case(s) {timing}; nothing written (add --save_preds to write NIfTI labels)")
    if model.failed_cases:
        raise UserError(f"{len(model.failed_cases)} of {len(cases)} case(s) not predicted (see above): "
                        f"{', '.join(model.failed_cases)}")
    return cases


def format_prediction_dice(names: list[str], metrics: dict) -> str:
    """The Dice of predicted validation cases: per class, then the mean."""
    rows = [f"{'class':<24} {'Dice':>8}  (against the preprocessed labels)"]
    rows += [f"D{i + 1} {name:<21} {value:8.4f}" for i, (name, value) in enumerate(zip(names, metrics["dice"]))]
    rows.append(f"{'mean':<24} {metrics['dice_mean']:8.4f}  ({metrics['cases']} cases)")
    return "\n".join(rows)
