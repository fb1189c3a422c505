import math

import numpy as np
import pytest

from data_preprocessing import configs
from data_preprocessing.network_plan import features_per_stage
from data_preprocessing.planner import (
    kernels_strides,
    plan_patch_size,
    suggest_batch_size,
    target_spacing,
    total_strides,
)


@pytest.mark.parametrize("task", sorted(configs.SPACINGS))
def test_msd_plans_downsample_to_min_fmap_and_divide_the_patch(task):
    patch = configs.PATCH_SIZES[f"{task}_3d"]
    kernels, strides = kernels_strides(patch, configs.SPACINGS[task], min_fmap=4, depth=6)
    assert len(kernels) == len(strides)
    assert strides[0] == [1, 1, 1]
    for size, stride in zip(patch, total_strides(strides)):
        assert size % stride == 0
        assert size // stride >= 4


@pytest.mark.parametrize(
    "patch, spacing, kernels, strides",
    [
        # isotropic 128^3: five halvings to 4^3, every kernel 3
        ([128, 128, 128], [1, 1, 1], [[3, 3, 3]] * 6, [[1, 1, 1]] + [[2, 2, 2]] * 5),
        # prostate: 3.6 mm slices, 0.62 mm in-plane; in-plane only until spacings even out
        ([20, 320, 256], [3.6, 0.62, 0.62],
         [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
         [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]),
        # 2D: 48 stops halving at 6 (6 / 2 < min_fmap) while 64 goes on to 4
        ([64, 48], [1.0, 1.0], [[3, 3]] * 5, [[1, 1], [2, 2], [2, 2], [2, 2], [2, 1]]),
    ],
)
def test_kernels_and_strides_by_hand(patch, spacing, kernels, strides):
    assert kernels_strides(patch, spacing, min_fmap=4, depth=6) == (kernels, strides)


def test_depth_and_min_fmap_limit_the_levels():
    kernels, strides = kernels_strides([128, 128, 128], [1, 1, 1], min_fmap=4, depth=3)
    assert len(strides) == 3
    _, strides = kernels_strides([64, 64, 64], [1, 1, 1], min_fmap=16, depth=6)
    assert total_strides(strides) == [4, 4, 4]


def test_target_spacing_median_and_anisotropic_rule():
    isotropic = np.array([[1.0, 0.8, 0.8], [1.2, 0.7, 0.7], [1.1, 0.9, 0.9]])
    assert target_spacing(isotropic) == pytest.approx([1.1, 0.8, 0.8])
    slices = np.array([[5.0, 0.7, 0.7]] * 5 + [[2.5, 0.7, 0.7]] * 3 + [[1.0, 0.7, 0.7]] * 2)
    target = target_spacing(slices)
    assert target[0] == pytest.approx(np.percentile(slices[:, 0], 10))
    assert target[1:] == pytest.approx([0.7, 0.7])


@pytest.mark.parametrize(
    "median, spacing, budget",
    [([56, 60, 60], [1, 1, 1], 128**3), ([300, 512, 512], [0.8, 0.7, 0.7], 128**3),
     ([24, 400, 380], [3.6, 0.6, 0.6], 96**3), ([180, 220, 200], [1, 1, 1], 64**3), ([480, 500], [1, 1], 512**2)],
)
def test_patch_fits_the_budget_and_the_network_strides(median, spacing, budget):
    patch = plan_patch_size(median, spacing, voxel_budget=budget)
    assert math.prod(patch) <= budget
    _, strides = kernels_strides(patch, spacing)
    for size, stride in zip(patch, total_strides(strides)):
        assert size % stride == 0
    assert all(p <= max(m, 1) * 1.5 + 16 for p, m in zip(patch, median))


def test_small_median_shape_is_covered_whole():
    assert plan_patch_size([56, 60, 60], [1, 1, 1]) == [56, 64, 64]


def test_batch_size_and_filters():
    assert suggest_batch_size([128, 128, 128]) == 2
    assert suggest_batch_size([64, 64, 64]) == 8
    assert features_per_stage(6, 3) == [32, 64, 128, 256, 320, 320]
    assert features_per_stage(7, 2) == [32, 64, 128, 256, 512, 512, 512]
