"""Whole-volume inference: sliding windows, 2D slice stacking and flip test-time augmentation."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference

Network = Callable[[torch.Tensor], torch.Tensor]


def sliding_window(network: Network, image: torch.Tensor, patch_size: Sequence[int], overlap: float,
                   blend: str, batch_size: int) -> torch.Tensor:
    """Logits of a network over an image of any size, from overlapping patches.

    Args:
        network: maps (N, C, *patch_size) to (N, K, *patch_size).
        image: (B, C, *spatial); axes smaller than the patch are padded and cropped back.
        patch_size: window size, (D, H, W) or (H, W).
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        blend: "gaussian" (windows weighted towards their centre, as nnU-Net) or "constant".
        batch_size: windows per forward pass.

    Returns:
        (B, K, *spatial) logits, float32.
    """
    return sliding_window_inference(image, list(patch_size), batch_size, network, overlap=overlap, mode=blend,
                                    sigma_scale=0.125, padding_mode="constant", cval=0.0)


def flip_axes(n_spatial: int, first_axis: int = 2) -> list[tuple[int, ...]]:
    """Every combination of flipped spatial axes, the identity first: 8 in 3D, 4 in 2D."""
    axes = range(first_axis, first_axis + n_spatial)
    return [combo for count in range(n_spatial + 1) for combo in itertools.combinations(axes, count)]


def predict_volume(network: Network, volume: torch.Tensor, patch_size: Sequence[int], *, overlap: float = 0.5,
                   blend: str = "gaussian", batch_size: int = 4, tta: bool = False,
                   activation: str | None = None) -> torch.Tensor:
    """Predict a whole volume with a 2D or 3D network.

    Args:
        network: a 3D network when len(patch_size) == 3, else a 2D one applied to each slice.
        volume: (1, C, D, H, W).
        patch_size: the network's window.
        overlap, blend, batch_size: as for `sliding_window` (2D: `batch_size` slices per pass).
        tta: average the activated outputs over every flip of the spatial axes.
        activation: None (logits, only without TTA), "softmax" or "sigmoid".

    Returns:
        (1, K, D, H, W): logits, or probabilities when `activation` is given.
    """
    if tta and activation is None:
        raise ValueError("test-time augmentation averages probabilities: give an activation")
    two_d = len(patch_size) == 2
    # 2D: the slices of the volume become the batch, (D, C, H, W).
    image = volume[0].transpose(0, 1) if two_d else volume

    def infer(batch: torch.Tensor) -> torch.Tensor:
        if two_d:
            chunks = [sliding_window(network, chunk, patch_size, overlap, blend, batch_size)
                      for chunk in torch.split(batch, batch_size)]
            return torch.cat(chunks)
        return sliding_window(network, batch, patch_size, overlap, blend, batch_size)

    def activate(logits: torch.Tensor) -> torch.Tensor:
        if activation == "softmax":
            return torch.softmax(logits.float(), dim=1)
        if activation == "sigmoid":
            return torch.sigmoid(logits.float())
        return logits.float()

    combos = flip_axes(len(patch_size)) if tta else [()]
    output = None
    for axes in combos:
        flipped = torch.flip(image, axes) if axes else image
        result = activate(infer(flipped))
        result = torch.flip(result, axes) if axes else result
        output = result if output is None else output.add_(result)
    output = output / len(combos)
    return output.transpose(0, 1)[None] if two_d else output
