"""The LightningModule: a U-Net planned from the task, trained with Dice + CE, validated on whole volumes."""

from __future__ import annotations

import math
import random
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn

from nnunet.export import to_labels, write_prediction
from nnunet.inference import predict_volume
from nnunet.loss import DeepSupervisionLoss, RegionLoss, SegmentationLoss, labels_to_regions
from nnunet.metrics import dice_from_regions, dice_per_class
from nnunet.network import build_unet, set_layout
from nnunet.overlay import write_overlay
from utils.errors import UserError
from utils.io import load_json

# BraTS (MSD Task01 labels: 1 peritumoral edema, 2 non-enhancing tumour and necrosis, 3 enhancing tumour)
# is trained on the nested regions whole tumour {1, 2, 3}, tumour core {2, 3} and enhancing tumour {3}.
# Validation reports them with the TensorFlow reference's names, plus the edema (label 1: whole tumour
# outside the core) and MeanDice, the mean of TumorCore, PeritumoralEdema and EnhancingTumor (its three
# classes); WholeTumor is reported beside it. MeanDice also selects the best checkpoint.
BRATS_REGIONS = [[1, 2, 3], [2, 3], [3]]
BRATS_SCORES = ["WholeTumor", "TumorCore", "EnhancingTumor", "PeritumoralEdema"]
BRATS_MEAN = [1, 2, 3]  # indices into BRATS_SCORES averaged by MeanDice
BRATS_EDEMA = 1
PREDICTIONS = "predictions"


def network_patch_size(config: dict, dim: int) -> list[int]:
    """The network's window: the task's patch, in-plane only for a 2D network."""
    patch = list(config["patch_size"])
    if dim == 3 and len(patch) == 2:
        raise UserError("a 3D network needs data preprocessed with --dim 3; this task was preprocessed for 2D")
    return patch[-2:] if dim == 2 else patch


class NNUnet(pl.LightningModule):
    """nnU-Net as a LightningModule.

    Args:
        args: the command-line arguments (utils.args.main_parser) as a dict; kept in checkpoints.
        config: the preprocessed task's config.json (patch size, spacing, channels, classes, ...); kept in
            checkpoints, so a checkpoint alone says how to predict.
    """

    def __init__(self, args: dict, config: dict) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.args = Namespace(**args)
        self.config = config
        self.dim = self.args.dim or config["dim"]
        self.patch_size = network_patch_size(config, self.dim)
        self.regions = self._regions()
        self.n_outputs = len(self.regions) if self.regions else config["n_class"]
        self.class_names = self._class_names()
        try:
            self.model = build_unet(
                config["in_channels"], self.n_outputs, self.patch_size, config["spacing"][-self.dim:],
                filters=self.args.filters, depth=self.args.depth, min_fmap=self.args.min_fmap, norm=self.args.norm,
                negative_slope=self.args.negative_slope, res_block=self.args.res_block,
                deep_supervision=self.args.deep_supervision, deep_supr_num=self.args.deep_supr_num)
        except ValueError as error:
            raise UserError(str(error)) from None
        self.base_loss = RegionLoss() if self.regions else SegmentationLoss(focal=self.args.focal)
        self.loss = DeepSupervisionLoss(self.base_loss) if self.args.deep_supervision else self.base_loss
        self.best_dice, self.best_epoch = 0.0, -1
        self.epoch_metrics: dict[str, Any] = {}
        self.meta_dir: str | None = None  # where predict_step finds each case's metadata
        n_scores = len(self.class_names)
        self.mean_indices = BRATS_MEAN if self.args.brats else list(range(n_scores))
        self.register_buffer("train_loss_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("val_dice_sum", torch.zeros(n_scores, dtype=torch.float64), persistent=False)
        self.register_buffer("val_loss_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("val_cases", torch.zeros((), dtype=torch.float64), persistent=False)
        # Validation cases whose label holds each class (region): a class in none is left out of the mean Dice.
        self.register_buffer("val_present", torch.zeros(n_scores, dtype=torch.float64), persistent=False)

    # ------------------------------------------------------------------------------------------
    # Task description
    # ------------------------------------------------------------------------------------------
    def _regions(self) -> list[list[int]] | None:
        if self.args.brats:
            return BRATS_REGIONS
        if self.args.regions:
            if not self.config.get("regions"):
                raise UserError("--regions needs regions declared in the task's dataset.json (none were found)")
            return [list(region["labels"]) for region in self.config["regions"]]
        return None

    def _class_names(self) -> list[str]:
        if self.args.brats:
            return list(BRATS_SCORES)
        if self.regions:
            return [region["name"] for region in self.config["regions"]]
        return [self.config["labels"][str(value)] for value in range(1, self.n_outputs)]

    @property
    def activation(self) -> str:
        return "sigmoid" if self.regions else "softmax"

    def targets(self, label: torch.Tensor) -> torch.Tensor:
        """The loss target: the label map (B, 1, ...) or its region masks (B, R, ...)."""
        return labels_to_regions(label, self.regions) if self.regions else label

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)

    # ------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self._val_limit = self.trainer.limit_val_batches

    def on_train_epoch_start(self) -> None:
        self.epoch_metrics = {}
        if self.args.skip_first_n_eval:
            # Epochs before the first evaluation run no validation loop at all (no volume is read).
            skipping = self.current_epoch < self.args.skip_first_n_eval
            self.trainer.limit_val_batches = 0 if skipping else self._val_limit
        self.train_loss_sum.zero_()
        self.train_steps.zero_()
        set_layout(self.model, channels_last=False)  # inference may have switched it (see infer)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        image, label = batch["image"], batch["label"]
        loss = self.loss(self.model(image), self.targets(label))
        # Accumulated on the device: no host synchronisation per step.
        self.train_loss_sum += loss.detach()
        self.train_steps += 1
        return loss

    def train_loss_mean(self) -> float:
        """The epoch's mean training loss over every rank (a collective call under DDP)."""
        totals = torch.stack([self.train_loss_sum, self.train_steps])
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        return float(totals[0] / totals[1]) if totals[1] > 0 else math.nan

    # ------------------------------------------------------------------------------------------
    # Validation: whole volumes, per-class Dice averaged over cases
    # ------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.val_dice_sum.zero_()
        self.val_loss_sum.zero_()
        self.val_cases.zero_()
        self.val_present.zero_()

    def infer(self, image: torch.Tensor, tta: bool = False, activation: str | None = None) -> torch.Tensor:
        """(1, C, D, H, W) -> (1, K, D, H, W) logits, or probabilities with an activation."""
        # Channels-last is the faster layout for 3D inference on the CPU (nnunet.network.set_layout).
        set_layout(self.model, channels_last=image.device.type == "cpu" and self.dim == 3)
        return predict_volume(self.model, image, self.patch_size, overlap=self.args.overlap, blend=self.args.blend,
                              batch_size=self.args.val_batch_size, tta=tta, activation=activation)

    def case_dice(self, output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Dice of each class (or region) for one case; output (1, K, ...) logits, label (1, 1, ...)."""
        if self.regions:
            predicted, target = output[0] > 0, labels_to_regions(label, self.regions)[0]
            if self.args.brats:  # the edema: whole tumour outside the tumour core
                predicted = torch.cat([predicted, (predicted[0] & ~predicted[1])[None]])
                target = torch.cat([target, (label[0] == BRATS_EDEMA)])
            return dice_from_regions(predicted, target)
        return dice_per_class(output[0].argmax(0), label[0, 0], self.n_outputs)

    def case_presence(self, label: torch.Tensor) -> torch.Tensor:
        """(K,) whether each class (or region) scored by `case_dice` has a voxel in the label (1, 1, ...)."""
        if self.regions:
            present = labels_to_regions(label, self.regions)[0].flatten(1).any(dim=1)
            if self.args.brats:
                present = torch.cat([present, (label == BRATS_EDEMA).any()[None]])
            return present
        counts = torch.bincount(label.reshape(-1).long(), minlength=self.n_outputs)
        return counts[1:self.n_outputs] > 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        image, label = batch["image"], batch["label"]
        logits = self.infer(image)
        self.val_loss_sum += self.base_loss(logits, self.targets(label)).detach()
        self.val_dice_sum += self.case_dice(logits, label)
        self.val_present += self.case_presence(label)
        self.val_cases += 1

    def mean_classes(self, present: list[bool]) -> list[int]:
        """The scores averaged into the mean Dice: those of `mean_indices` present in some validation label.

        A class that no validation case holds scores 1 in every case once the network stops predicting it (Dice
        of two empty maps), which would inflate the mean that selects the best checkpoint; it is left out. When
        no class is present at all, every class counts.
        """
        included = [index for index in self.mean_indices if present[index]]
        return included or list(self.mean_indices)

    def on_validation_epoch_end(self) -> None:
        n_scores = len(self.class_names)
        totals = torch.cat([self.val_dice_sum, self.val_present, self.val_loss_sum[None], self.val_cases[None]])
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        cases = max(float(totals[-1]), 1.0)
        dice = (totals[:n_scores] / cases).float()
        included = self.mean_classes((totals[n_scores:2 * n_scores] > 0).tolist())
        mean_dice = float(dice[included].mean())
        if self.trainer.state.fn == TrainerFn.FITTING and mean_dice > self.best_dice:
            self.best_dice, self.best_epoch = mean_dice, self.current_epoch
        self.epoch_metrics = {
            "dice": dice.tolist(),
            "dice_mean": mean_dice,
            "val_loss": float(totals[-2] / cases),
            "cases": int(totals[-1]),
        }
        absent = [index for index in self.mean_indices if index not in included]
        if absent:  # named 1-based, as D1, D2, ... in the log lines
            self.epoch_metrics["dice_absent"] = [index + 1 for index in absent]
        # Every rank holds the same reduced values, so logging needs no further synchronisation.
        self.log("dice_mean", mean_dice, sync_dist=False)
        self.log("val_loss", self.epoch_metrics["val_loss"], sync_dist=False)

    # ------------------------------------------------------------------------------------------
    # Prediction: whole volumes back onto the source images
    # ------------------------------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> str:
        case_id = batch["case_id"][0]
        probabilities = self.infer(batch["image"], tta=self.args.tta, activation=self.activation)[0]
        self.export(case_id, batch["image"][0], probabilities, load_json(Path(self.meta_dir) / f"{case_id}_meta.json"))
        return case_id

    def export(self, case_id: str, image: torch.Tensor, probabilities: torch.Tensor, meta: dict) -> None:
        """Write what the flags ask for: labels (--save_preds), probabilities (--save_probs), an overlay."""
        folder = Path(self.args.results) / PREDICTIONS
        if self.args.save_preds or self.args.save_probs:
            write_prediction(folder, meta, probabilities, self.regions, self.args.save_probs)
        if self.args.overlay:
            labels = to_labels(probabilities, self.regions)
            write_overlay(folder / f"{case_id}_overlay.png", image[0].float().cpu().numpy(), labels, case_id)

    # ------------------------------------------------------------------------------------------
    # Optimisation
    # ------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        args = self.args
        params = self.model.parameters()
        if args.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=args.learning_rate, momentum=args.momentum, nesterov=True,
                                        weight_decay=args.weight_decay)
        else:
            kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[args.optimizer]
            optimizer = kind(params, lr=args.learning_rate, weight_decay=args.weight_decay)
        scheduler = make_scheduler(optimizer, args)
        if scheduler is None:
            return {"optimizer": optimizer}
        config = {"scheduler": scheduler, "interval": "epoch"}
        if args.scheduler == "plateau":
            # Stepped only in evaluated epochs, so --lr_patience counts evaluations, not epochs.
            config.update(monitor="dice_mean", strict=False, frequency=args.eval_every)
        return {"optimizer": optimizer, "lr_scheduler": config}

    # ------------------------------------------------------------------------------------------
    # Checkpoint state beyond weights, optimizer and scheduler (which Lightning saves)
    # ------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nnunet"] = {
            "best_dice": self.best_dice,
            "best_epoch": self.best_epoch,
            # The running epoch's loss, so that an epoch resumed from a mid-epoch checkpoint reports its full mean.
            "train_loss_sum": float(self.train_loss_sum),
            "train_steps": float(self.train_steps),
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state()[1].tolist(),
                "numpy_pos": int(np.random.get_state()[2]),
                "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            },
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("nnunet", {})
        self.best_dice = float(state.get("best_dice", 0.0))
        self.best_epoch = int(state.get("best_epoch", -1))
        self.train_loss_sum.fill_(float(state.get("train_loss_sum", 0.0)))
        self.train_steps.fill_(float(state.get("train_steps", 0.0)))
        rng = state.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            np.random.set_state(("MT19937", np.array(rng["numpy"], dtype=np.uint32), rng["numpy_pos"], 0, 0.0))
            version, internal, gauss = rng["python"]
            random.setstate((version, tuple(internal), gauss))


def make_scheduler(optimizer: torch.optim.Optimizer, args: Namespace):
    """The learning-rate schedule of `--scheduler` after `--lr_warmup_epochs` of linear warmup, stepped once
    per epoch; None for a constant rate without warmup.

    Every schedule but plateau is a factor of the base rate per epoch. The warmup rises linearly from
    `--warmup_start_lr` and reaches the base rate in its last epoch, as the MLPerf UNet3D reference's does
    (rate at 1-based epoch e: start + (base - start) * e / warmup); the schedule then starts from its epoch 0.
    """
    epochs = max(1, args.epochs)
    warmup = args.lr_warmup_epochs
    if args.scheduler == "plateau":
        if warmup:
            raise UserError("--lr_warmup_epochs does not combine with --scheduler plateau")
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=args.lr_gamma,
                                                          patience=args.lr_patience)
    if args.scheduler == "multistep" and not args.lr_steps:
        raise UserError("--scheduler multistep needs --lr_steps, the epochs at which the rate drops")
    if args.scheduler == "none" and not warmup:
        return None
    span = max(1, epochs - warmup)  # the epochs the schedule itself runs over
    schedules = {
        "none": lambda epoch: 1.0,
        "cosine": lambda epoch: 0.5 * (1 + math.cos(math.pi * min(epoch / span, 1.0))),
        "poly": lambda epoch: (1 - min(epoch, span) / span) ** 0.9,
        "multistep": lambda epoch: args.lr_gamma ** sum(epoch >= step for step in args.lr_steps or []),
    }
    if args.scheduler not in schedules:
        raise UserError(f"unknown scheduler {args.scheduler}")
    schedule = schedules[args.scheduler]
    start = args.warmup_start_lr / args.learning_rate

    def factor(epoch: int) -> float:
        if epoch < warmup:
            return start + (1 - start) * (epoch + 1) / warmup
        return schedule(epoch - warmup)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
