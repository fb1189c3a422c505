"""The LightningModule: the U-Net of the task's plan, trained with Dice + CE, validated on whole volumes."""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn

from data_preprocessing.network_plan import override_network
from data_preprocessing.plans import network_window, task_network
from nnunet.export import to_labels, write_prediction
from nnunet.inference import CaseTooLarge, check_room, predict_volume
from nnunet.loss import DeepSupervisionLoss, RegionLoss, SegmentationLoss
from nnunet.metrics import dice_from_regions, dice_per_class
from nnunet.network import build_network, set_layout
from nnunet.overlay import write_overlay
from nnunet.regions import BRATS_EDEMA, BRATS_MEAN, labels_to_regions, score_names, task_regions
from nnunet.schedules import make_scheduler
from utils.background import Handover, WriteBehind
from utils.errors import UserError
from utils.io import load_json
from utils.settings import InferenceSettings, ModelSettings, OptimSettings

# Whole-case scores of prediction: half precision (nnunet.inference), float16 on the CPU too (bfloat16's 8-bit
# mantissa moves labels at near-ties that float16 keeps).
PREDICTION_DTYPE = torch.float16
PREDICTIONS = "predictions"
# Version of what checkpoints store beside the weights: the plan, the model and optimisation settings.
CHECKPOINT_FORMAT = 2


def model_settings(config: dict, dim: int | None = None, overrides: dict | None = None, targets: str = "labels",
                   focal: bool = False) -> ModelSettings:
    """What to train for a task: its plan's network with the command line's model flags applied.

    Args:
        config: the task's config.json (`data_preprocessing.plans.read_config`).
        dim: the network's dimension (default: the task's).
        overrides: model flags given on the command line (`data_preprocessing.network_plan.OVERRIDES`).
        targets: "labels", "regions" or "brats".
        focal: Dice + focal loss.

    Raises:
        UserError: flags that do not fit the plan.
    """
    dim = dim or config["dim"]
    network = task_network(config, dim)
    window = network_window(config, dim)
    try:
        network = override_network(network, window, list(config["spacing"])[-dim:], overrides or {})
    except ValueError as error:
        raise UserError(str(error)) from None
    return ModelSettings(network=network, dim=dim, targets=targets, focal=focal)


class NNUnet(pl.LightningModule):
    """nnU-Net as a LightningModule.

    Args:
        config: the preprocessed task's config.json (patch size, spacing, channels, classes, network, ...).
        model: the network, its dimension, targets and loss (`model_settings`).
        optim: optimiser and schedule (training only).
        inference: sliding windows and what prediction writes.

    Checkpoints store the config, the model and the optimisation settings (`on_save_checkpoint`), so a
    checkpoint alone rebuilds the network (`nnunet.checkpoints.model_from_checkpoint`).
    """

    def __init__(self, config: dict, model: ModelSettings, optim: OptimSettings | None = None,
                 inference: InferenceSettings | None = None) -> None:
        super().__init__()
        self.config = config
        self.settings = model
        self.optim = optim or OptimSettings()
        self.inference = inference or InferenceSettings()
        self.dim = model.dim
        self.patch_size = network_window(config, self.dim)
        self.regions = task_regions(model.targets, config)
        self.n_outputs = len(self.regions) if self.regions else config["n_class"]
        self.class_names = score_names(model.targets, config)
        self.label_names = [config["labels"][str(value)] for value in range(1, config["n_class"])]
        # Set by a callback that draws the first validation case: then validation keeps its overlay inputs.
        self.keep_overlay_case = False
        self.overlay_case: dict[str, Any] | None = None
        try:
            self.model = build_network(config["in_channels"], self.n_outputs, model.network)
        except ValueError as error:
            raise UserError(str(error)) from None
        self.base_loss = RegionLoss() if self.regions else SegmentationLoss(focal=model.focal)
        deep = model.network.deep_supervision_heads > 0
        self.loss = DeepSupervisionLoss(self.base_loss) if deep else self.base_loss
        self.best_dice, self.best_epoch = 0.0, -1
        self.epoch_metrics: dict[str, Any] = {}
        self.meta_dir: str | None = None  # where predict_step finds each case's metadata
        self.writer: WriteBehind | None = None  # prediction: the previous case written while the next is predicted
        self.failed_cases: list[str] = []  # prediction: cases too large for the memory left (see check_room)
        self.window_seconds = 0.0  # prediction: time spent in the sliding windows, every case together
        n_scores = len(self.class_names)
        self.mean_indices = BRATS_MEAN if model.targets == "brats" else list(range(n_scores))
        self.register_buffer("train_loss_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("val_dice_sum", torch.zeros(n_scores, dtype=torch.float64), persistent=False)
        self.register_buffer("val_loss_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("val_cases", torch.zeros((), dtype=torch.float64), persistent=False)
        # Validation cases whose label holds each class (region): a class in none is left out of the mean Dice.
        self.register_buffer("val_present", torch.zeros(n_scores, dtype=torch.float64), persistent=False)

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
        if self.optim.skip_first_n_eval:
            # Epochs before the first evaluation run no validation loop at all (no volume is read).
            skipping = self.current_epoch < self.optim.skip_first_n_eval
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

    def infer(self, image: torch.Tensor, tta: bool = False, activation: str | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(1, C, D, H, W) -> (1, K, D, H, W) logits, or probabilities with an activation, in `dtype` (prediction:
        float16, on the device --stitch_device says)."""
        # Channels-last is the faster layout for 3D inference on the CPU (nnunet.network.set_layout).
        set_layout(self.model, channels_last=image.device.type == "cpu" and self.dim == 3)
        return predict_volume(self.model, image, self.patch_size, overlap=self.inference.overlap,
                              blend=self.inference.blend, batch_size=self.inference.batch_size, tta=tta,
                              activation=activation, dtype=dtype, device=self.inference.stitch_device)

    def validation_logits(self, image: torch.Tensor) -> torch.Tensor:
        """(1, C, D, H, W) -> (1, K, D, H, W) logits; with --tta the logits of the flip-averaged probabilities
        (their log for softmax, their logit for sigmoid), so that the loss and the Dice see the averaged prediction."""
        if not self.inference.tta:
            return self.infer(image)
        probabilities = self.infer(image, tta=True, activation=self.activation).float()
        if self.activation == "sigmoid":
            return torch.logit(probabilities, eps=1e-6)
        return probabilities.clamp_min(1e-8).log()

    def case_dice(self, output: torch.Tensor, label: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
        """Dice of each class (or region) for one case; output (1, K, ...) logits (or probabilities, with a
        region `threshold` of 0.5), label (1, 1, ...)."""
        if self.regions:
            predicted, target = output[0] > threshold, labels_to_regions(label, self.regions)[0]
            if self.settings.targets == "brats":  # the edema: whole tumour outside the tumour core
                predicted = torch.cat([predicted, (predicted[0] & ~predicted[1])[None]])
                target = torch.cat([target, (label[0] == BRATS_EDEMA)])
            return dice_from_regions(predicted, target)
        return dice_per_class(output[0].argmax(0), label[0, 0], self.n_outputs)

    def case_presence(self, label: torch.Tensor) -> torch.Tensor:
        """(K,) whether each class (or region) scored by `case_dice` has a voxel in the label (1, 1, ...)."""
        if self.regions:
            present = labels_to_regions(label, self.regions)[0].flatten(1).any(dim=1)
            if self.settings.targets == "brats":
                present = torch.cat([present, (label == BRATS_EDEMA).any()[None]])
            return present
        counts = torch.bincount(label.reshape(-1).long(), minlength=self.n_outputs)
        return counts[1:self.n_outputs] > 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        image, label = batch["image"], batch["label"]
        logits = self.validation_logits(image)
        self.val_loss_sum += self.base_loss(logits, self.targets(label)).detach()
        self.val_dice_sum += self.case_dice(logits, label)
        self.val_present += self.case_presence(label)
        self.val_cases += 1
        validating = self.inference.overlay and self.trainer.state.fn == TrainerFn.VALIDATING
        if validating or (batch_idx == 0 and self.keep_overlay_case):
            case = self.overlay_inputs(batch, logits)
            if batch_idx == 0 and self.keep_overlay_case:
                self.overlay_case = case
            if validating:  # --exec_mode evaluate --overlay: the label beside the prediction
                folder = Path(self.inference.results) / PREDICTIONS
                folder.mkdir(parents=True, exist_ok=True)
                write_overlay(folder / f"{case['title']}_overlay.png", **case)

    def overlay_inputs(self, batch: dict[str, Any], logits: torch.Tensor) -> dict[str, Any]:
        """The `nnunet.overlay.write_overlay` arguments of a validation case: first channel, prediction, label."""
        probabilities = torch.sigmoid(logits[0]) if self.regions else logits[0]
        return {"image": batch["image"][0, 0].float().cpu().numpy(),
                "prediction": to_labels(probabilities, self.regions),
                "label": batch["label"][0, 0].cpu().numpy(), "class_names": self.label_names,
                "title": batch.get("case_id", ["validation case"])[0],
                "spacing": list(self.config["spacing"])[-batch["image"].ndim + 2:]}

    def mean_classes(self, present: list[bool]) -> list[int]:
        """The scores averaged into the mean Dice: those of `mean_indices` present in some validation label.

        A class that no validation case holds scores 1 in every case once the network stops predicting it (Dice
        of two empty maps), which would inflate the mean that selects the best checkpoint; it is left out. When
        no class is present at all, every class counts.
        """
        included = [index for index in self.mean_indices if present[index]]
        return included or list(self.mean_indices)

    def reduced_dice(self) -> tuple[torch.Tensor, float, list[int], torch.Tensor]:
        """(per-class Dice (K,), mean Dice, classes in the mean, totals) over the cases of every process."""
        n_scores = len(self.class_names)
        totals = torch.cat([self.val_dice_sum, self.val_present, self.val_loss_sum[None], self.val_cases[None]])
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        cases = max(float(totals[-1]), 1.0)
        dice = (totals[:n_scores] / cases).float()
        included = self.mean_classes((totals[n_scores:2 * n_scores] > 0).tolist())
        return dice, float(dice[included].mean()), included, totals

    def on_validation_epoch_end(self) -> None:
        dice, mean_dice, included, totals = self.reduced_dice()
        cases = max(float(totals[-1]), 1.0)
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
        # For the monitors (early stopping, plateau schedule); nnunet.loggers.ExperimentLog feeds the loggers.
        self.log("dice_mean", mean_dice, sync_dist=False, logger=False)
        self.log("val_loss", self.epoch_metrics["val_loss"], sync_dist=False, logger=False)

    # ------------------------------------------------------------------------------------------
    # Prediction: whole volumes back onto the source images
    # ------------------------------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> str:
        """One whole case: {"image": (1, C, D, H, W), "case_id": [str]} with, for raw images, its "meta"
        (otherwise read from the preprocessed folder's `<case>_meta.json`). The case's files are written in a
        background thread while the next case is predicted; a case too large for the memory left is reported in
        one line and skipped (`failed_cases`)."""
        case_id = batch["case_id"][0]
        image = batch["image"]
        if isinstance(image, Handover):  # raw images: this step holds the only reference, freed once predicted
            image = image.take().to(self.device)
        try:
            check_room(case_id, image, self.n_outputs, self.patch_size, self.inference.batch_size,
                       self.inference.tta, self.inference.stitch_device, PREDICTION_DTYPE)
        except CaseTooLarge as error:
            print(error, file=sys.stderr, flush=True)
            self.failed_cases.append(case_id)
            return case_id
        started = time.perf_counter()
        probabilities = self.infer(image, tta=self.inference.tta, activation=self.activation,
                                   dtype=PREDICTION_DTYPE)[0]
        self.window_seconds += time.perf_counter() - started
        meta = batch.get("meta") or load_json(Path(self.meta_dir) / f"{case_id}_meta.json")
        if "label" in batch:  # a fold's validation cases: scored on the preprocessed grid
            self.val_dice_sum += self.case_dice(probabilities[None], batch["label"], threshold=0.5)
            self.val_present += self.case_presence(batch["label"])
            self.val_cases += 1
        image = image[0, 0].float().cpu().numpy() if self.inference.overlay else None  # the rest of it is freed
        if self.writer is None:
            self.writer = WriteBehind()
        self.writer.submit(self.export, case_id, image, probabilities, meta)
        return case_id

    def on_predict_epoch_start(self) -> None:
        self.on_validation_epoch_start()
        self.failed_cases, self.window_seconds = [], 0.0

    def on_predict_epoch_end(self) -> None:
        """With labelled cases, `epoch_metrics` gets their Dice per class, its mean and the case count."""
        self.finish_writing()
        self.epoch_metrics = {}
        dice, mean_dice, _, totals = self.reduced_dice()
        if totals[-1] > 0:
            self.epoch_metrics = {"dice": dice.tolist(), "dice_mean": mean_dice, "cases": int(totals[-1])}

    def finish_writing(self) -> None:
        """Wait for the case being written (its error, if any, is raised here)."""
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()

    def export(self, case_id: str, image: np.ndarray | None, probabilities: torch.Tensor, meta: dict) -> None:
        """Write what the flags ask for: labels (--save_preds), probabilities (--save_probs), an overlay of the
        image's first channel (`image`, (D, H, W), given with --overlay)."""
        folder = Path(self.inference.results) / PREDICTIONS
        if self.inference.save_preds or self.inference.save_probs:
            write_prediction(folder, meta, probabilities, self.regions, self.inference.save_probs, self.label_names,
                             self.inference.output_format)
        if self.inference.overlay:
            labels = to_labels(probabilities, self.regions)
            write_overlay(folder / f"{case_id}_overlay.png", image, labels, class_names=self.label_names,
                          title=case_id, spacing=list(self.config["spacing"])[-image.ndim:])

    # ------------------------------------------------------------------------------------------
    # Optimisation
    # ------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        optim = self.optim
        params = self.model.parameters()
        if optim.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=optim.learning_rate, momentum=optim.momentum, nesterov=True,
                                        weight_decay=optim.weight_decay)
        else:
            kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[optim.optimizer]
            optimizer = kind(params, lr=optim.learning_rate, weight_decay=optim.weight_decay)
        scheduler = make_scheduler(optimizer, optim)
        if scheduler is None:
            return {"optimizer": optimizer}
        config = {"scheduler": scheduler, "interval": "epoch"}
        if optim.scheduler == "plateau":
            # Stepped only in evaluated epochs, so --lr_patience counts evaluations, not epochs.
            config.update(monitor="dice_mean", strict=False, frequency=optim.eval_every)
        return {"optimizer": optimizer, "lr_scheduler": config}

    # ------------------------------------------------------------------------------------------
    # Checkpoint state beyond weights, optimizer and scheduler (which Lightning saves)
    # ------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain values only, so that checkpoints load with torch.load(weights_only=True).
        checkpoint["hyper_parameters"] = {"format": CHECKPOINT_FORMAT, "config": self.config,
                                          "model": self.settings.to_dict(), "optim": asdict(self.optim)}
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
