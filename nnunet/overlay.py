"""A PNG per case: the prediction's contours over a few slices of the image."""

from __future__ import annotations

import os

import numpy as np

from utils.io import atomic_open


def pick_slices(labels: np.ndarray, count: int = 3) -> list[int]:
    """Slices (axis 0) with the most foreground, in order; evenly spaced ones when there is none."""
    area = (labels > 0).reshape(labels.shape[0], -1).sum(1)
    if not area.any():
        return sorted({int(i) for i in np.linspace(0, labels.shape[0] - 1, count)})
    return sorted(int(i) for i in np.argsort(area)[::-1][:count] if area[i] > 0)


def write_overlay(path: str | os.PathLike, image: np.ndarray, labels: np.ndarray, title: str = "") -> None:
    """Draw each class's contour over the image on a few slices.

    Args:
        path: PNG file to write.
        image: (D, H, W) intensities, e.g. the first channel.
        labels: (D, H, W) label map on the same grid.
        title: shown above the panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slices = pick_slices(labels)
    classes = [int(c) for c in np.unique(labels) if c > 0]
    colours = plt.get_cmap("tab10")
    figure, axes = plt.subplots(1, len(slices), figsize=(4 * len(slices), 4), squeeze=False)
    for axis, index in zip(axes[0], slices):
        axis.imshow(image[index], cmap="gray")
        for number, value in enumerate(classes):
            mask = (labels[index] == value).astype(float)
            if mask.any() and mask.min() == 0:
                axis.contour(mask, levels=[0.5], colors=[colours(number % 10)], linewidths=1.2)
        axis.set_title(f"slice {index}")
        axis.axis("off")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=80)
    plt.close(figure)
