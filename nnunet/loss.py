"""Training losses: Dice + cross-entropy (or focal) over classes, Dice + BCE over regions, deep supervision.

Every loss takes logits straight from the network and computes in float32, also when the forward
pass ran under bf16/fp16 autocast: the Dice sums over a whole batch lose too much precision in
half precision.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.losses import DiceLoss, FocalLoss


class SegmentationLoss(nn.Module):
    """Soft Dice over the foreground classes plus cross-entropy (or focal loss) over all classes.

    The Dice is nnU-Net's batch Dice: intersections and sums are taken over the whole batch before
    dividing, once per foreground class, and averaged over those classes. Background is left out of the
    Dice (it would dominate it) but not out of the cross-entropy, which is over all K classes.

    Args:
        focal: replace cross-entropy by the softmax focal loss, summed over classes and averaged over
            voxels, so that with gamma 0 it is exactly the cross-entropy.
        gamma: focal exponent; used only with `focal`.
    """

    def __init__(self, focal: bool = False, gamma: float = 2.0) -> None:
        super().__init__()
        self.focal = focal
        self.dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
        if focal:
            # MONAI's DiceFocalLoss would drop background from the focal term too and use a sigmoid focal loss;
            # here the focal term is the softmax one over all classes, as the cross-entropy it replaces.
            self.voxel_loss: nn.Module = FocalLoss(
                include_background=True, to_onehot_y=True, gamma=gamma, use_softmax=True, reduction="none"
            )
        else:
            self.voxel_loss = nn.CrossEntropyLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of one output.

        Args:
            logits: (B, K, *spatial) scores before softmax, any float dtype.
            target: (B, 1, *spatial) class indices, any integer dtype (uint8 from the loader).

        Returns:
            A float32 scalar.
        """
        if logits.shape[1] < 2:
            raise ValueError(f"SegmentationLoss needs at least 2 output channels, got logits of shape {logits.shape}")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            target = target.long()
            dice = self.dice(logits, target)
            if self.focal:
                voxel = self.voxel_loss(logits, target).sum(dim=1).mean()
            else:
                voxel = self.voxel_loss(logits, target[:, 0])
            return dice + voxel


class RegionLoss(nn.Module):
    """Soft Dice plus binary cross-entropy for overlapping regions with sigmoid outputs.

    Each output channel is one region (BraTS: whole tumour, tumour core, enhancing tumour); a voxel can
    belong to several. The Dice is the batch Dice of each region, averaged over regions; the BCE is
    averaged over regions and voxels.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dice = DiceLoss(include_background=True, sigmoid=True, batch=True)
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of one output.

        Args:
            logits: (B, R, *spatial) scores before the sigmoid, any float dtype.
            target: (B, R, *spatial) region masks, bool or float in [0, 1].

        Returns:
            A float32 scalar.
        """
        if logits.shape != target.shape:
            raise ValueError(f"region logits of shape {tuple(logits.shape)} and masks of shape "
                             f"{tuple(target.shape)} differ")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            target = target.float()
            return self.dice(logits, target) + self.bce(logits, target)


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of a loss over the outputs of a deep-supervised network.

    The network in training returns (B, 1 + n, K, *spatial): the full-resolution output first, then the n coarser
    decoder outputs, which the network has already interpolated to full size. Each head is therefore compared with the
    full-resolution label; downsampling the label instead would score the heads on a different target than the
    one they are upsampled to. Head i weighs 1 / 2^i, the weights normalised to sum to 1.

    Args:
        loss: the loss of one output, e.g. `SegmentationLoss()` or `RegionLoss()`.
    """

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    @staticmethod
    def weights(n_heads: int) -> list[float]:
        """Normalised head weights: 1, 1/2, 1/4, ... divided by their sum."""
        raw = [0.5**head for head in range(n_heads)]
        return [weight / sum(raw) for weight in raw]

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of all heads.

        Args:
            outputs: (B, 1 + n, K, *spatial) stacked heads, or (B, K, *spatial) for a single output (a network
                without deep supervision or in eval mode), which is passed to the loss unchanged.
            target: (B, 1, *spatial) labels or (B, R, *spatial) region masks, at full resolution.

        Returns:
            A float32 scalar.
        """
        if outputs.dim() == target.dim():
            return self.loss(outputs, target)
        if outputs.dim() != target.dim() + 1:
            raise ValueError(f"outputs of shape {tuple(outputs.shape)} do not match a target of shape "
                             f"{tuple(target.shape)}")
        heads = torch.unbind(outputs, dim=1)
        return sum(weight * self.loss(head, target) for weight, head in zip(self.weights(len(heads)), heads))
