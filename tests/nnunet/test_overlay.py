"""The overlay PNG: distinct class colours with a legend, slices over the foreground, label beside prediction."""

import numpy as np
from PIL import Image

from nnunet.overlay import class_colour, render_overlay, slice_positions, write_overlay


def tiny_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = np.random.default_rng(0).normal(size=(12, 20, 24)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[3:9, 5:12, 6:14] = 1
    label[5:8, 12:16, 10:18] = 2
    prediction = label.copy()
    prediction[3] = 0
    return image, prediction, label


def colours_in(pixels: np.ndarray) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in row) for row in np.unique(pixels.reshape(-1, 3), axis=0)}


def test_overlay_png_has_each_class_colour(tmp_path):
    image, prediction, label = tiny_case()
    path = tmp_path / "case_overlay.png"
    write_overlay(path, image, prediction, label, class_names=["liver", "tumour"], title="case_0",
                  spacing=[2.0, 1.0, 1.0], dpi=40)
    pixels = np.asarray(Image.open(path).convert("RGB"))
    found = colours_in(pixels)
    for value in (1, 2):  # the legend's patches are drawn in the class colours, unblended
        assert tuple(round(255 * c) for c in class_colour(value, 2)) in found
    assert class_colour(1, 2) != class_colour(2, 2)
    # Each label slice beside its prediction: twice as wide as the prediction alone.
    assert Image.open(path).width > 1.6 * render_overlay(image, prediction, dpi=40).shape[1]


def test_slices_spread_over_the_foreground_extent():
    mask = np.zeros((40, 4, 4), bool)
    mask[10:31] = True
    assert slice_positions(mask, 0, 3) == [15, 20, 25]
    assert slice_positions(np.zeros((9, 4, 4), bool), 0, 3) == [2, 4, 6]
    assert slice_positions(mask, 1, 3) == [1, 2]
