"""Sliding windows, 2D slice stacking and flip test-time augmentation."""

import itertools
from typing import NamedTuple

import numpy as np
import pytest
import torch

from nnunet.inference import flip_axes, predict_volume


class Pointwise(torch.nn.Module):
    """A 1x1 convolution: the same at every position, so it commutes with flips and windows."""

    def __init__(self, dim: int, channels: int = 2, classes: int = 3):
        super().__init__()
        conv = torch.nn.Conv3d if dim == 3 else torch.nn.Conv2d
        self.conv = conv(channels, classes, 1)
        torch.nn.init.normal_(self.conv.weight, std=2.0)

    def forward(self, x):
        return self.conv(x)


class Positional(Pointwise):
    """Adds a ramp along the last axis to class 1: not flip-equivariant."""

    def forward(self, x):
        out = self.conv(x)
        ramp = torch.linspace(-3, 3, x.shape[-1])
        out[:, 1] = out[:, 1] + ramp
        return out


@pytest.mark.parametrize("overlap, blend", [(0.5, "gaussian"), (0.25, "constant"), (0.0, "gaussian")])
def test_windows_of_a_pointwise_network_equal_the_whole_image(overlap, blend):
    torch.manual_seed(0)
    network = Pointwise(3)
    volume = torch.randn(1, 2, 19, 23, 30)
    with torch.no_grad():
        result = predict_volume(network, volume, [8, 16, 16], overlap=overlap, blend=blend, batch_size=3)
        expected = network(volume)
    torch.testing.assert_close(result, expected, atol=1e-4, rtol=1e-4)


def test_2d_network_predicts_each_slice():
    torch.manual_seed(0)
    network = Positional(2)
    volume = torch.randn(1, 2, 5, 12, 10)
    with torch.no_grad():
        result = predict_volume(network, volume, [12, 10], batch_size=2)
        expected = torch.stack([network(volume[:, :, z]) for z in range(5)], dim=2)
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)


def test_flip_combinations():
    assert len(flip_axes(3)) == 8 and len(flip_axes(2)) == 4
    assert flip_axes(2) == [(), (2,), (3,), (2, 3)]


class TTACase(NamedTuple):
    network: torch.nn.Module
    volume: torch.Tensor  # (1, 2, 6, 8, 10)
    patch: list[int]  # the whole volume: one window
    plain: torch.Tensor  # softmax probabilities without TTA
    augmented: torch.Tensor  # ... and with it


def tta_case(network_type: type[Pointwise], dim: int) -> TTACase:
    """A seeded `network_type(dim)` and one volume, predicted with and without flip TTA."""
    torch.manual_seed(0)
    network = network_type(dim)
    volume = torch.randn(1, 2, 6, 8, 10)
    patch = [6, 8, 10][-dim:]
    with torch.no_grad():
        plain = predict_volume(network, volume, patch, activation="softmax")
        augmented = predict_volume(network, volume, patch, activation="softmax", tta=True)
    return TTACase(network, volume, patch, plain, augmented)


@pytest.mark.parametrize("dim", [3, 2])
def test_tta_leaves_a_flip_equivariant_network_unchanged(dim):
    case = tta_case(Pointwise, dim)
    torch.testing.assert_close(case.augmented, case.plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dim", [3, 2])
def test_tta_averages_the_flipped_predictions_of_other_networks(dim):
    network, volume, patch, plain, augmented = tta_case(Positional, dim)
    # By hand in numpy: flip the input, predict, flip back, average over every subset of spatial axes.
    array = volume.numpy()
    spatial = [2, 3, 4][-dim:]
    total = np.zeros(plain.shape, np.float64)
    subsets = [s for n in range(dim + 1) for s in itertools.combinations(spatial, n)]
    for axes in subsets:
        flipped = np.flip(array, axes).copy() if axes else array
        with torch.no_grad():
            probabilities = predict_volume(network, torch.from_numpy(flipped), patch, activation="softmax").numpy()
        total += np.flip(probabilities, axes) if axes else probabilities
    np.testing.assert_allclose(augmented.numpy(), total / len(subsets), atol=1e-5)
    assert len(subsets) == 2**dim
    assert not torch.allclose(augmented, plain, atol=1e-3)


def test_tta_needs_an_activation():
    with pytest.raises(ValueError):
        predict_volume(Pointwise(3), torch.zeros(1, 2, 4, 4, 4), [4, 4, 4], tta=True)


def ramp_network(calls: list[int]):
    """Outputs a ramp along the window's last axis, so overlapping windows disagree; records batch sizes."""
    def network(x):
        calls.append(x.shape[0])
        return torch.linspace(0, 1, x.shape[-1]).expand(x.shape[0], 1, *x.shape[2:]).clone()
    return network


@pytest.mark.parametrize("overlap, windows", [(0.0, 2), (0.5, 3)])
def test_overlap_sets_the_number_of_windows(overlap, windows):
    calls = []
    predict_volume(ramp_network(calls), torch.zeros(1, 1, 8, 8, 16), [8, 8, 8], overlap=overlap, batch_size=1)
    assert len(calls) == windows


def test_blend_weights_overlapping_windows():
    outputs = {blend: predict_volume(ramp_network([]), torch.zeros(1, 1, 8, 8, 16), [8, 8, 8], overlap=0.5,
                                     blend=blend, batch_size=1)[0, 0, 4, 4] for blend in ("constant", "gaussian")}
    # Voxel 6 lies in the first window (ramp value 6/7) and the second (2/7): constant weights average them.
    assert outputs["constant"][6].item() == pytest.approx((6 / 7 + 2 / 7) / 2)
    assert not torch.allclose(outputs["constant"], outputs["gaussian"])


def test_an_axis_smaller_than_the_patch_is_padded():
    torch.manual_seed(0)
    network = Pointwise(3)
    volume = torch.randn(1, 2, 5, 23, 30)
    with torch.no_grad():
        result = predict_volume(network, volume, [8, 16, 16], overlap=0.5, batch_size=4)
        expected = network(volume)
    torch.testing.assert_close(result, expected, atol=1e-4, rtol=1e-4)


def test_half_precision_output_stays_close_to_float32():
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(2, 8, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv3d(8, 3, 3, padding=1))
    volume = torch.randn(1, 2, 20, 24, 28)
    with torch.no_grad():
        full = predict_volume(network, volume, [8, 8, 8], activation="softmax", tta=True)
        half = predict_volume(network, volume, [8, 8, 8], activation="softmax", tta=True, dtype=torch.float16)
    assert half.dtype == torch.float16 and half.shape == full.shape
    assert (half.float() - full).abs().max() < 2e-3


@pytest.mark.parametrize("patch", [None, [16, 16, 16]])
def test_labels_agree_with_monai_float32_windows(trained, synthetic_task, patch):
    """The half-precision stitching gives the labels of MONAI's float32 sliding_window_inference (the previous
    prediction path) on the test cases of the trained synthetic task, with its own patch (one window per case)
    and with a smaller one (overlapping windows)."""
    from monai.inferers import sliding_window_inference

    from nnunet.checkpoints import model_from_checkpoint

    model = model_from_checkpoint(trained / "checkpoints" / "best.ckpt")
    patch = patch or list(model.patch_size)
    agree = total = 0
    for path in sorted((synthetic_task.preprocessed(3) / "test").glob("*_x.npy")):
        volume = torch.from_numpy(np.load(path))[None]
        with torch.no_grad():
            reference = sliding_window_inference(volume, patch, 4, model.model, overlap=0.5, mode="gaussian",
                                                 sigma_scale=0.125, padding_mode="constant", cval=0.0)
            ours = predict_volume(model.model, volume, patch, activation="softmax", dtype=torch.float16)
        reference = torch.softmax(reference, dim=1)[0]
        differ = ours[0].argmax(0) != reference.argmax(0)
        # Only near-ties may change: where float32's two best classes are within rounding of each other.
        top2 = reference.topk(2, dim=0).values
        assert bool((top2[0] - top2[1])[differ].le(2e-3).all())
        assert (ours[0].float() - reference).abs().max() < 5e-3
        agree += int((~differ).sum())
        total += differ.numel()
    assert total > 0 and agree / total >= 0.9999
