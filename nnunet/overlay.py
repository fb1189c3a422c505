"""A picture per case: the classes over slices of the image, the label beside the prediction when there is one.

Each class has its own colour from a qualitative colormap (tab10, tab20 past ten classes) and the legend names
it. The slices are spread over the extent of the foreground, in the three planes of a volume.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from utils.io import atomic_open


def class_colour(value: int, n_classes: int) -> tuple[float, float, float]:
    """The RGB colour (0-1) of foreground class `value` (1, 2, ...) among `n_classes` foreground classes."""
    cmap = colormaps["tab10" if n_classes <= 10 else "tab20"]
    return tuple(float(c) for c in cmap((value - 1) % cmap.N)[:3])


def slice_positions(foreground: np.ndarray, axis: int, count: int = 3) -> list[int]:
    """Indices along `axis` spread evenly inside the extent of the foreground (of the whole array without any).

    Args:
        foreground: boolean mask, e.g. (D, H, W).
        axis: the axis the slices cut.
        count: how many slices at most (fewer when the extent is thinner).
    """
    others = tuple(a for a in range(foreground.ndim) if a != axis)
    present = np.flatnonzero(foreground.any(axis=others))
    first, last = (int(present[0]), int(present[-1])) if present.size else (0, foreground.shape[axis] - 1)
    # Inner points of the extent: the first and last slices of an object hold the least of it.
    fractions = (np.arange(count) + 1) / (count + 1)
    return sorted({int(round(first + f * (last - first))) for f in fractions})


def _take(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(volume, index, axis=axis)


def _colour_layer(labels: np.ndarray, n_classes: int, alpha: float = 0.45) -> np.ndarray:
    """(H, W) label slice -> (H, W, 4) RGBA: each class in its colour, the background transparent."""
    layer = np.zeros((*labels.shape, 4))
    for value in range(1, n_classes + 1):
        mask = labels == value
        layer[mask] = (*class_colour(value, n_classes), alpha)
    return layer


def overlay_figure(image: np.ndarray, prediction: np.ndarray, label: np.ndarray | None = None,
                   class_names: Sequence[str] | None = None, title: str = "",
                   spacing: Sequence[float] | None = None, count: int = 3) -> Figure:
    """The figure: for each plane a row of slices of the prediction, each beside the label's slice if given.

    Args:
        image: (D, H, W) intensities on the labels' grid (e.g. the first channel), or (H, W) for one slice.
        prediction: label map of the same shape, 0 the background.
        label: the reference label map of the same shape, or None.
        class_names: names of the foreground classes 1, 2, ... for the legend; None: "class 1", ...
        title: shown above the panels.
        spacing: voxel size per axis (mm), to draw anisotropic voxels at their true aspect; None: square.
        count: slices per plane.
    """
    maps = [prediction] + ([label] if label is not None else [])
    n_classes = len(class_names) if class_names else max(int(max(m.max() for m in maps)), 1)
    names = list(class_names) if class_names else [f"class {v}" for v in range(1, n_classes + 1)]
    if image.ndim == 2:
        image, maps = image[None], [m[None] for m in maps]
        spacing = (1.0, *spacing) if spacing is not None else None
    spacing = list(spacing) if spacing is not None and len(spacing) == 3 else [1.0] * 3
    planes = [0] if image.shape[0] == 1 else [0, 1, 2]
    foreground = np.logical_or.reduce([m > 0 for m in maps])
    low, high = np.percentile(image, [0.5, 99.5]) if image.size else (0.0, 1.0)
    kinds = (["label"] if label is not None else []) + ["prediction"]
    columns = [(slot, kind) for slot in range(count) for kind in kinds]  # each label slice beside its prediction
    figure = Figure(figsize=(2.2 * len(columns), 2.6 * len(planes) + 0.7))
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(planes), len(columns), squeeze=False)
    for row, axis in enumerate(planes):
        positions = slice_positions(foreground, axis, count)
        in_plane = [a for a in range(3) if a != axis]
        aspect = spacing[in_plane[0]] / spacing[in_plane[1]]
        for panel, (slot, kind) in zip(axes[row], columns):
            panel.set_xticks([])
            panel.set_yticks([])
            if slot >= len(positions):
                panel.set_axis_off()
                continue
            index = positions[slot]
            volume = maps[1] if kind == "label" else maps[0]
            panel.imshow(_take(image, axis, index), cmap="gray", vmin=low, vmax=high, aspect=aspect,
                         interpolation="nearest")
            panel.imshow(_colour_layer(_take(volume, axis, index), n_classes), aspect=aspect, interpolation="nearest")
            where = f"axis {axis}, slice {index}" if len(planes) > 1 else f"slice {index}"
            panel.set_title(f"{kind}\n{where}", fontsize=8)
    handles = [Patch(facecolor=class_colour(v, n_classes), label=names[v - 1]) for v in range(1, n_classes + 1)]
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), frameon=False, fontsize=9)
    if title:
        figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.5 / figure.get_figheight(), 1, 1))
    return figure


def render_overlay(*args, dpi: int = 80, **kwargs) -> np.ndarray:
    """`overlay_figure` as an (H, W, 3) uint8 RGB array (for experiment loggers)."""
    figure = overlay_figure(*args, **kwargs)
    figure.set_dpi(dpi)
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def overlay_png(*args, dpi: int = 80, **kwargs) -> bytes:
    """`overlay_figure` as PNG bytes."""
    buffer = io.BytesIO()
    overlay_figure(*args, **kwargs).savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def write_overlay(path: str | os.PathLike, *args, dpi: int = 80, **kwargs) -> None:
    """Write `overlay_figure(*args, **kwargs)` as a PNG file (atomically)."""
    data = overlay_png(*args, dpi=dpi, **kwargs)
    with atomic_open(path, "wb") as handle:
        handle.write(data)
