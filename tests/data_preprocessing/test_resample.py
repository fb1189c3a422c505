import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from data_preprocessing.resample import (
    resample_axis,
    resample_image,
    resample_label,
    resample_probabilities,
    resampled_shape,
    separate_axis,
)


def source_coordinates(old: int, new: int) -> np.ndarray:
    return (np.arange(new) + 0.5) * old / new - 0.5


def grid(shape):
    return np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")


@pytest.mark.parametrize("new_shape", [(40, 45, 20), (10, 30, 64), (20, 31, 40)])
def test_cubic_reproduces_a_quadratic_volume(new_shape):
    old_shape = (20, 30, 40)
    z, y, x = grid(old_shape)
    volume = (2 * z + 3 * y - x + 0.1 * z**2 - 0.05 * x * y)[None]
    result = resample_image(volume, new_shape)
    zz, yy, xx = np.meshgrid(*(source_coordinates(o, n) for o, n in zip(old_shape, new_shape)), indexing="ij")
    expected = 2 * zz + 3 * yy - xx + 0.1 * zz**2 - 0.05 * xx * yy
    inner = tuple(slice(4, n - 4) for n in new_shape)  # kernels clamp at the edges
    assert result.shape == (1, *new_shape)
    np.testing.assert_allclose(result[0][inner], expected[inner], atol=1e-3 * np.abs(expected).max())


def test_linear_axis_matches_numpy_interp():
    line = torch.tensor(np.random.default_rng(0).normal(size=(3, 17)), dtype=torch.float32)
    result = resample_axis(line, 1, 40, order=1).numpy()
    coordinates = np.clip(source_coordinates(17, 40), 0, 16)
    for row in range(3):
        np.testing.assert_allclose(result[row], np.interp(coordinates, np.arange(17), line[row].numpy()), atol=1e-5)


def test_order_zero_repeats_slices():
    volume = np.arange(4, dtype=np.float32).reshape(1, 4, 1, 1) * np.ones((1, 4, 3, 3), np.float32)
    result = resample_image(volume, (8, 3, 3), separate_z=0)
    np.testing.assert_array_equal(result[0, :, 0, 0], [0, 0, 1, 1, 2, 2, 3, 3])


def test_label_resampling_matches_one_hot_interpolation_by_scipy():
    rng = np.random.default_rng(1)
    label = np.zeros((12, 14, 16), np.uint8)
    label[2:9, 3:11, 4:13] = 1
    label[4:7, 5:9, 6:10] = 2
    label[rng.random(label.shape) < 0.05] = 3
    new_shape = (19, 9, 23)
    result = resample_label(label, new_shape, [0, 1, 2, 3])
    coordinates = np.stack(np.meshgrid(*(source_coordinates(o, n) for o, n in zip(label.shape, new_shape)),
                                       indexing="ij"))
    scores = np.stack([map_coordinates((label == c).astype(np.float64), coordinates, order=1, mode="nearest")
                       for c in range(4)])
    expected = scores.argmax(0)
    ties = np.sort(scores, 0)[-1] - np.sort(scores, 0)[-2] < 1e-6
    assert (result[~ties] == expected[~ties]).all()


def test_label_upsampling_then_downsampling_restores_it():
    label = np.zeros((10, 12, 12), np.uint8)
    label[2:8, 3:9, 3:10] = 1
    label[4:6, 5:7, 5:8] = 2
    up = resample_label(label, (20, 24, 12), [0, 1, 2])
    assert set(np.unique(up)) == {0, 1, 2}
    np.testing.assert_array_equal(resample_label(up, label.shape, [0, 1, 2]), label)


def test_probabilities_are_resampled_linearly_and_keep_their_sum():
    probabilities = torch.softmax(torch.randn(3, 6, 7, 8), dim=0)
    result = resample_probabilities(probabilities, (12, 5, 8))
    assert result.shape == (3, 12, 5, 8)
    torch.testing.assert_close(result.sum(0), torch.ones(12, 5, 8))


def test_shapes_and_separate_axis():
    assert resampled_shape([100, 200, 50], [1.0, 0.5, 2.0], [1.0, 1.0, 1.0]) == [100, 100, 100]
    assert separate_axis([3.6, 0.6, 0.6], [3.6, 0.6, 0.6]) == 0
    assert separate_axis([1.0, 1.0, 1.0], [1.0, 1.0, 4.0]) == 2
    assert separate_axis([1.5, 1.0, 1.0], [1.0, 1.0, 1.0]) is None
