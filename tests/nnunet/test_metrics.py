"""Dice per class, Dice of regions and HD95 against values computed another way."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice
from scipy.ndimage import binary_erosion
from scipy.spatial.distance import cdist

from nnunet.metrics import class_counts, dice_from_regions, dice_per_class, hd95

# (pred, target, n_class, expected Dice of classes 1..n_class-1), worked by hand.
HAND_CASES = [
    # class 1: |P|=2, |T|=1, |P∩T|=1 -> 2/3; class 2: |P|=2, |T|=3, |P∩T|=2 -> 4/5; class 3 absent from both -> 1.
    ([[0, 1, 1], [2, 2, 0]], [[0, 1, 2], [2, 2, 0]], 4, [2 / 3, 4 / 5, 1.0]),
    # class 1 only in the target -> 0; class 2 only in the prediction -> 0.
    ([0, 0, 2, 2], [1, 1, 0, 0], 3, [0.0, 0.0]),
    # identical maps -> 1 everywhere, also for the empty class 2.
    ([[[0, 1], [1, 3]]], [[[0, 1], [1, 3]]], 4, [1.0, 1.0, 1.0]),
    # background only: every foreground class is empty on empty.
    ([0, 0, 0], [0, 0, 0], 3, [1.0, 1.0]),
]


@pytest.mark.parametrize("pred, target, n_class, expected", HAND_CASES)
def test_dice_per_class_hand_worked(pred, target, n_class, expected):
    dice = dice_per_class(torch.tensor(pred), torch.tensor(target), n_class)
    assert dice.shape == (n_class - 1,)
    assert dice.tolist() == pytest.approx(expected)


def test_dice_per_class_matches_monai_one_hot():
    generator = torch.Generator().manual_seed(0)
    n_class = 4
    target = torch.randint(0, n_class, (12, 10, 9), generator=generator)
    pred = torch.where(torch.rand(target.shape, generator=generator) < 0.7, target,
                       torch.randint(0, n_class, target.shape, generator=generator))

    def one_hot(labels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(labels, n_class).permute(3, 0, 1, 2)[None].float()

    reference = compute_dice(one_hot(pred), one_hot(target), include_background=False)[0]
    dice = dice_per_class(pred.to(torch.uint8), target.to(torch.uint8), n_class)
    assert dice.tolist() == pytest.approx(reference.tolist(), abs=1e-6)


def test_dice_per_class_counts_match_numpy():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 3, size=(7, 8, 9))
    pred = rng.integers(0, 3, size=(7, 8, 9))
    intersection, pred_count, target_count = class_counts(torch.from_numpy(pred), torch.from_numpy(target), 3)
    for c in range(3):
        assert intersection[c] == np.sum((pred == c) & (target == c))
        assert pred_count[c] == np.sum(pred == c)
        assert target_count[c] == np.sum(target == c)


def test_dice_per_class_accepts_a_leading_singleton_axis_and_bool():
    pred = torch.tensor([[0, 1, 1, 0]], dtype=torch.bool)
    target = torch.tensor([[0, 1, 0, 0]], dtype=torch.bool)
    assert dice_per_class(pred[None], target[None], 2).tolist() == pytest.approx([2 / 3])
    assert dice_per_class(pred, target, 2).tolist() == pytest.approx([2 / 3])


@pytest.mark.parametrize(
    "pred, target, n_class, message",
    [
        (torch.tensor([0, 3]), torch.tensor([0, 1]), 3, "outside"),
        (torch.tensor([0, -1]), torch.tensor([0, 1]), 3, "outside"),
        (torch.tensor([0, 1]), torch.tensor([0, 1, 1]), 3, "shape"),
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), 3, "integer dtype"),
    ],
)
def test_dice_per_class_rejects_bad_input(pred, target, n_class, message):
    with pytest.raises(ValueError, match=message):
        dice_per_class(pred, target, n_class)


def test_dice_from_regions_overlapping_regions():
    # BraTS-like regions of a label map: whole tumour {1, 2, 3}, tumour core {2, 3}, enhancing {3}.
    target = torch.tensor([0, 1, 1, 2, 3, 3, 0, 0])
    pred = torch.tensor([0, 1, 2, 2, 2, 3, 1, 0])
    regions = [(1, 2, 3), (2, 3), (3,)]

    def masks(labels: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.isin(labels, torch.tensor(region)) for region in regions])

    dice = dice_from_regions(masks(pred), masks(target))
    # whole: |P|=6, |T|=5, |P∩T|=5 -> 10/11; core: |P|=4, |T|=3, |P∩T|=3 -> 6/7; enhancing: 1, 2, 1 -> 2/3.
    assert dice.tolist() == pytest.approx([10 / 11, 6 / 7, 2 / 3])


def test_dice_from_regions_empty_rules():
    pred = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    target = torch.tensor([[0, 0, 0], [0, 0, 0], [0, 1, 0]], dtype=torch.bool)
    # region 0 empty in both -> 1; region 1 only predicted -> 0; region 2 only in the target -> 0.
    assert dice_from_regions(pred, target).tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="regions"):
        dice_from_regions(pred, target[:2])


def test_hd95_anisotropic_spacing_hand_computed():
    # Two parallel lines along the last axis, one voxel apart on axis 0 and two on axis 1: every surface
    # voxel lies sqrt((1 * 3.0)^2 + (2 * 0.5)^2) = sqrt(10) mm from the other line, in both directions.
    pred = np.zeros((4, 5, 10), dtype=bool)
    target = np.zeros_like(pred)
    pred[1, 2, :] = True
    target[0, 0, :] = True
    assert hd95(pred, target, (3.0, 0.5, 1.0)) == pytest.approx(math.sqrt(10), rel=1e-6)
    # The same masks with the spacing axes swapped give another distance, so the axis order matters.
    assert hd95(pred, target, (1.0, 0.5, 3.0)) == pytest.approx(math.sqrt(2), rel=1e-6)


def test_hd95_interpolated_percentile_hand_computed():
    # Target: 20 voxels on a line. Prediction: the same line with its last voxel moved 2 voxels along
    # axis 0 (6 mm at 3 mm spacing). Prediction -> target: nineteen 0s and one 6 mm; the 95th percentile,
    # linearly interpolated at rank 0.95 * 19 = 18.05, is 0.05 * 6 = 0.3 mm. Target -> prediction: the
    # last target voxel is 1 mm from its neighbour on the line, 0.05 * 1 = 0.05 mm. The larger is 0.3 mm.
    target = np.zeros((3, 1, 20), dtype=bool)
    target[0, 0, :] = True
    pred = target.copy()
    pred[0, 0, 19] = False
    pred[2, 0, 19] = True
    # MONAI interpolates in float32: the rank 18.05 is itself rounded, hence the looser tolerance.
    assert hd95(pred, target, (3.0, 1.0, 1.0)) == pytest.approx(0.3, rel=1e-4)


def brute_force_hd95(pred: np.ndarray, target: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Surface voxels by erosion, all pairwise distances in mm, the larger directed 95th percentile."""
    points = [np.argwhere(mask ^ binary_erosion(mask)) * np.asarray(spacing) for mask in (pred, target)]
    distances = cdist(points[0], points[1])
    return max(np.percentile(distances.min(axis=1), 95), np.percentile(distances.min(axis=0), 95))


def test_hd95_matches_brute_force_on_random_blobs():
    rng = np.random.default_rng(3)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in (10, 16, 14)), indexing="ij"), axis=-1)
    for spacing in [(2.5, 0.7, 0.7), (1.0, 1.0, 1.0)]:
        centres = rng.uniform(3, 9, size=(2, 3))
        pred = np.linalg.norm((grid - centres[0]) * [1.0, 0.6, 0.7], axis=-1) < 3.5
        target = np.linalg.norm((grid - centres[1]) * [0.9, 0.5, 0.6], axis=-1) < 3.2
        assert hd95(pred, target, spacing) == pytest.approx(brute_force_hd95(pred, target, spacing), rel=1e-5)


def test_hd95_empty_cases_and_tensor_input():
    empty = np.zeros((3, 4, 5), dtype=bool)
    full = empty.copy()
    full[1, 1:3, 2] = True
    assert hd95(empty, empty, (1.0, 1.0, 1.0)) == 0.0
    assert hd95(full, empty, (1.0, 1.0, 1.0)) == math.inf
    assert hd95(empty, full, (1.0, 1.0, 1.0)) == math.inf
    assert hd95(torch.from_numpy(full), torch.from_numpy(full), (2.0, 1.0, 1.0)) == 0.0
    with pytest.raises(ValueError, match="spacing"):
        hd95(full, full, (1.0, 1.0))
