"""Postprocessing of label maps: keep only the largest connected component of the foreground or of a class.

nnU-Net's rule, decided on the cross-validation (`scripts/select_model.py`): a step is adopted only where it
raises the cross-validated Dice; `apply` runs the adopted steps on a prediction's label map.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component (faces, edges and corners connect) of a boolean mask; empty stays empty."""
    components, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def keep_largest_foreground(labels: np.ndarray) -> np.ndarray:
    """Labels with every foreground voxel outside the largest foreground component set to background."""
    kept = labels.copy()
    kept[(labels > 0) & ~largest_component(labels > 0)] = 0
    return kept


def keep_largest_of_label(labels: np.ndarray, value: int) -> np.ndarray:
    """Labels with the voxels of `value` outside its largest component set to background."""
    kept = labels.copy()
    mask = labels == value
    kept[mask & ~largest_component(mask)] = 0
    return kept


def apply(labels: np.ndarray, foreground_largest_component: bool = False,
          largest_component_labels: tuple[int, ...] | list[int] = ()) -> np.ndarray:
    """The adopted steps on a label map (any shape): the foreground step first, then each label's."""
    if foreground_largest_component:
        labels = keep_largest_foreground(labels)
    for value in largest_component_labels:
        labels = keep_largest_of_label(labels, int(value))
    return labels
