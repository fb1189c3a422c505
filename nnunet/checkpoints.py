"""Checkpoints: writing them atomically, the last and best ones, and reading, checking and rebuilding from them.

A checkpoint holds, beside Lightning's weights, optimizer and loop state, the task's plan ("config"), the
model settings (the network's plan after the run's overrides, its dimension, targets and loss) and the
optimisation settings, all as plain values: `torch.load(weights_only=True)` reads it, and the checkpoint
alone rebuilds the network it was trained with.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from data_preprocessing.network_plan import override_network
from data_preprocessing.plans import network_window
from nnunet.nn_unet import CHECKPOINT_FORMAT, NNUnet
from utils.errors import UserError
from utils.io import atomic_open
from utils.settings import InferenceSettings, ModelSettings, OptimSettings

LAST = "last.ckpt"
BEST = "best.ckpt"
# Model flags checked together against a checkpoint: each group changes the network as a whole.
FLAG_GROUPS = (("depth", "min_fmap"), ("deep_supervision", "deep_supr_num"), ("filters",), ("res_block",),
               ("norm",), ("negative_slope",))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint under a temporary name, fsyncs it and renames it into place (`utils.io.atomic_open`).

    A kill or a crash never leaves a truncated checkpoint under the real name; a failed write (no space left)
    raises `WriteError`, one line naming the file, and leaves neither the file nor its temporary.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        with atomic_open(path, "wb") as handle:
            torch.save(checkpoint, handle)


class CheckpointSaver(pl.Callback):
    """Saves `last.ckpt` after every training epoch and `best.ckpt` when the mean Dice improved.

    Runs after the epoch's validation, so both carry that epoch's metrics and early-stopping state.
    Not Lightning's `ModelCheckpoint`: that needs two instances for the two files, and with a monitor it
    warns, or fails, on epochs whose validation logged no Dice (`--skip_first_n_eval`, `--eval_every`); here
    "best" is the module's own best Dice, which is also what resuming restores.
    """

    def __init__(self, dirpath: str | os.PathLike) -> None:
        self.dirpath = Path(dirpath)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        trainer.save_checkpoint(self.dirpath / LAST, weights_only=False)
        if pl_module.best_epoch == trainer.current_epoch:
            trainer.save_checkpoint(self.dirpath / BEST, weights_only=False)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint file safely (tensors and plain types only) with a one-line error if it is not one of
    this version's."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "unsupported global" not in str(error).lower():
            raise UserError(f"{path} is not a readable checkpoint (damaged, or not a checkpoint)") from None
        # torch's message advises loading with weights_only=False, which runs any code the file holds.
        raise UserError(f"{path} is not a safe checkpoint: it holds Python objects beyond tensors and plain "
                        f"values, which could run code when loaded; use a checkpoint written by this program") from None
    except Exception as error:  # torch raises many types for damaged or foreign files
        raise UserError(f"{path} is not a readable checkpoint ({_first_line(error)})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise UserError(f"{path} is not a checkpoint written by this program (no weights or hyper-parameters)")
    hparams = checkpoint["hyper_parameters"]
    if isinstance(hparams, dict) and "args" in hparams and "model" not in hparams:
        raise UserError(f"{path} was written by an earlier version of this program, before checkpoints held their "
                        f"network's plan, and its layers are named differently: retrain with this version")
    if not isinstance(hparams, dict) or hparams.get("format") != CHECKPOINT_FORMAT or \
            not isinstance(hparams.get("config"), dict) or not isinstance(hparams.get("model"), dict) or \
            not isinstance(checkpoint["state_dict"], dict):
        raise UserError(f"{path} is not a checkpoint written by this version of the program (no task plan or "
                        f"model settings of format {CHECKPOINT_FORMAT})")
    return checkpoint


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def stored_settings(checkpoint: dict, path: str | os.PathLike) -> tuple[dict, ModelSettings, OptimSettings]:
    """(task plan, model settings, optimisation settings) stored in a checkpoint of `read_checkpoint`."""
    hparams = checkpoint["hyper_parameters"]
    try:
        model = ModelSettings.from_dict(hparams["model"], f"checkpoint {path}")
        optim = OptimSettings(**{**hparams.get("optim", {}), "lr_steps": tuple(hparams.get("optim", {})
                                                                               .get("lr_steps") or ())})
    except (ValueError, TypeError) as error:
        raise UserError(f"checkpoint {path} holds settings this version cannot read ({error})") from None
    return hparams["config"], model, optim


def check_model_flags(model: ModelSettings, config: dict, flags: dict, path: str | os.PathLike) -> None:
    """Model flags given with a checkpoint must describe the checkpoint's model.

    Args:
        model: the checkpoint's model settings.
        config: its task plan.
        flags: the model flags given on the command line (not None): dim, targets, focal and the network
            overrides of `data_preprocessing.network_plan.OVERRIDES`.

    Raises:
        UserError: one line naming the flag, its value and the checkpoint's.
    """
    if flags.get("dim") is not None and flags["dim"] != model.dim:
        raise UserError(f"checkpoint {path} holds a {model.dim}D network; --dim {flags['dim']} cannot change that "
                        f"(drop --dim, or use a {flags['dim']}D checkpoint)")
    if flags.get("targets") not in (None, model.targets):
        raise UserError(f"--{flags['targets']} contradicts checkpoint {path}, which was trained on {model.targets} "
                        f"targets; drop the flag")
    if flags.get("focal") is not None and flags["focal"] != model.focal:
        raise UserError(f"--focal contradicts checkpoint {path}, which was trained with Dice + cross-entropy; "
                        f"drop the flag")
    window = network_window(config, model.dim)
    spacing = list(config["spacing"])[-model.dim:]
    stored = model.network.to_dict()
    for group in FLAG_GROUPS:
        given = {key: flags[key] for key in group if flags.get(key) not in (None, False)}
        if not given:
            continue
        shown = " ".join(_flag_text(key, value) for key, value in given.items())
        try:
            changed = override_network(model.network, window, spacing, given).to_dict()
        except ValueError:
            changed = None
        if changed != stored:
            fields = [key for key in stored if changed is None or changed[key] != stored[key]] or ["network"]
            described = ", ".join(f"{key} {stored[key]}" for key in fields if key in stored)
            raise UserError(f"{shown} contradicts checkpoint {path}, whose network has {described}; drop the flag "
                            f"(a checkpoint's network cannot be changed)")


def _flag_text(key: str, value: Any) -> str:
    """A flag as typed: "--res_block", "--norm batch", "--filters 8 16 32"."""
    if value is True:
        return f"--{key}"
    return f"--{key} " + (" ".join(map(str, value)) if isinstance(value, list | tuple) else str(value))


def check_compatible(checkpoint_config: dict, data_config: dict, path: str | os.PathLike) -> None:
    """A checkpoint must have been trained for the data's channels and classes."""
    for key, what in (("in_channels", "input channels"), ("n_class", "classes")):
        if checkpoint_config.get(key) != data_config.get(key):
            raise UserError(
                f"checkpoint {path} was trained for {checkpoint_config.get(key)} {what} but the data at --data has "
                f"{data_config.get(key)}; use a checkpoint of this task")


def check_same_geometry(checkpoint_config: dict, data_config: dict, path: str | os.PathLike) -> None:
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


def model_from_checkpoint(path: str | os.PathLike, inference: InferenceSettings | None = None,
                          data_config: dict | None = None, flags: dict | None = None) -> NNUnet:
    """Rebuild the network a checkpoint was trained with and load its weights.

    Args:
        path: the checkpoint.
        inference: run-time settings (windows, TTA, outputs); these are the command line's, not the checkpoint's.
        data_config: the plan of the data to evaluate or predict, checked against the checkpoint's.
        flags: model flags given on the command line, which must agree with the checkpoint (`check_model_flags`).
    """
    checkpoint = read_checkpoint(path)
    config, model_settings, optim = stored_settings(checkpoint, path)
    if data_config is not None:
        check_compatible(config, data_config, path)
        check_same_geometry(config, data_config, path)
    check_model_flags(model_settings, config, flags or {}, path)
    model = NNUnet(config, model_settings, optim, inference)
    mismatch = state_dict_mismatch(model, checkpoint["state_dict"])
    if mismatch:
        raise UserError(f"checkpoint {path} does not fit the network it describes ({mismatch})")
    model.load_state_dict(checkpoint["state_dict"])
    model.best_dice = float(checkpoint.get("nnunet", {}).get("best_dice", 0.0))
    model.best_epoch = int(checkpoint.get("nnunet", {}).get("best_epoch", -1))
    return model


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


def network_difference(model: NNUnet, checkpoint: dict, path: str | os.PathLike) -> str | None:
    """How the checkpoint's network differs from the model's ("features [..] in the checkpoint, [..] here")."""
    _, stored, _ = stored_settings(checkpoint, path)
    ours, theirs = model.settings.network.to_dict(), stored.network.to_dict()
    fields = [key for key in ours if ours[key] != theirs[key]]
    if stored.dim != model.dim:
        return f"a {stored.dim}D network in the checkpoint, {model.dim}D here"
    return "; ".join(f"{key} {theirs[key]} in the checkpoint, {ours[key]} here" for key in fields) or None


def load_weights(model: NNUnet, path: str | os.PathLike) -> None:
    """Start training from a checkpoint's weights (same network), not from its optimizer state."""
    checkpoint = read_checkpoint(path)
    check_compatible(checkpoint["hyper_parameters"]["config"], model.config, path)
    difference = network_difference(model, checkpoint, path) or state_dict_mismatch(model, checkpoint["state_dict"])
    if difference:
        raise UserError(f"checkpoint {path} has another network than the plan and flags of this run ({difference})")
    model.load_state_dict(checkpoint["state_dict"])


def check_fits(model: NNUnet, checkpoint: dict, path: str | os.PathLike) -> None:
    """A checkpoint to resume from must be of this task and hold exactly this run's network."""
    check_compatible(checkpoint["hyper_parameters"]["config"], model.config, path)
    check_same_geometry(checkpoint["hyper_parameters"]["config"], model.config, path)
    difference = network_difference(model, checkpoint, path) or state_dict_mismatch(model, checkpoint["state_dict"])
    if difference:
        raise UserError(f"checkpoint {path} has another network than the plan and flags of this run ({difference}); "
                        f"resume with the flags it was trained with")
