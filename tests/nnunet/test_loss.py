from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from data_preprocessing.network_plan import plan_network
from nnunet.loss import DeepSupervisionLoss, RegionLoss, SegmentationLoss
from nnunet.network import build_network
from nnunet.regions import labels_to_regions, region_class_order, regions_to_labels

SMOOTH = 1e-5  # MONAI DiceLoss's default smoothing of numerator and denominator
BRATS_REGIONS = [[1, 2, 3], [2, 3], [3]]


def batch_dice_loss(probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice per channel with sums over batch and space, averaged over channels."""
    dims = [0, *range(2, probs.dim())]
    intersection = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    return (1 - (2 * intersection + SMOOTH) / (total + SMOOTH)).mean()


def reference_segmentation_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float | None = None):
    probs = logits.softmax(1)
    onehot = F.one_hot(target[:, 0].long(), logits.shape[1]).movedim(-1, 1).float()
    dice = batch_dice_loss(probs[:, 1:], onehot[:, 1:])
    if gamma is None:
        return dice + F.cross_entropy(logits, target[:, 0].long())
    p_true = (probs * onehot).sum(1)
    return dice + (-((1 - p_true) ** gamma) * p_true.log()).mean()


def random_case(shape=(2, 3, 4, 5, 6), seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator)
    target = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=generator).to(torch.uint8)
    return logits, target


def test_hand_worked_case():
    # Equal logits: every voxel is 50/50. Foreground Dice = 2 * (0.5 + 0.5) / (4 * 0.5 + 2) = 0.5; CE = ln 2.
    logits = torch.zeros(1, 2, 4)
    target = torch.tensor([[[0, 0, 1, 1]]], dtype=torch.uint8)
    loss = SegmentationLoss()(logits, target)
    assert loss.item() == pytest.approx(0.5 + math.log(2), abs=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 6), (3, 4, 8, 8), (1, 2, 3, 3, 3)])
def test_segmentation_loss_matches_independent_computation(shape):
    logits, target = random_case(shape)
    loss = SegmentationLoss()(logits, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference_segmentation_loss(logits, target).item(), rel=1e-5)


def test_perfect_logits_reach_the_cross_entropy_floor():
    _, target = random_case((2, 3, 6, 6, 6))
    logits = 20.0 * F.one_hot(target[:, 0].long(), 3).movedim(-1, 1).float()
    loss = SegmentationLoss()(logits, target)
    floor = F.cross_entropy(logits, target[:, 0].long())
    assert floor.item() < 1e-7
    assert loss.item() == pytest.approx(floor.item(), abs=1e-5)


def test_focal_variant():
    logits, target = random_case()
    focal = SegmentationLoss(focal=True)(logits, target)
    assert focal.item() == pytest.approx(reference_segmentation_loss(logits, target, gamma=2.0).item(), rel=1e-5)
    assert focal.item() < SegmentationLoss()(logits, target).item()
    # With gamma 0 the focal term is the cross-entropy.
    gamma0 = SegmentationLoss(focal=True, gamma=0.0)(logits, target)
    assert gamma0.item() == pytest.approx(SegmentationLoss()(logits, target).item(), rel=1e-6)


@pytest.mark.parametrize("focal", [False, True])
def test_bf16_autocast(focal):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(2, 3, 3, padding=1)
    image = torch.randn(2, 2, 6, 6, 6)
    _, target = random_case((2, 3, 6, 6, 6))
    loss_fn = SegmentationLoss(focal=focal)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(image)
        loss = loss_fn(logits, target)
    assert logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # Inside autocast the loss is computed exactly as in float32 from the same (bf16-rounded) logits.
    assert loss.item() == pytest.approx(loss_fn(logits.detach().float(), target).item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(conv.weight.grad).all()


def test_segmentation_loss_rejects_single_channel():
    with pytest.raises(ValueError, match="at least 2 output channels"):
        SegmentationLoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4, dtype=torch.uint8))


def brats_label(seed: int = 0) -> torch.Tensor:
    """(B, 1, D, H, W) labels 0-3 nested like a tumour: enhancing inside core inside whole tumour."""
    generator = torch.Generator().manual_seed(seed)
    label = torch.zeros(2, 1, 8, 8, 8, dtype=torch.uint8)
    label[:, :, 1:7, 1:7, 1:7] = 1
    label[:, :, 2:6, 2:6, 2:6] = 2
    label[:, :, 3:5, 3:5, 3:5] = 3
    noise = torch.randint(0, 4, label.shape, generator=generator).to(torch.uint8)
    return torch.where(torch.rand(label.shape, generator=generator) < 0.2, noise, label)


def test_labels_to_regions_brats():
    label = brats_label()
    masks = labels_to_regions(label, BRATS_REGIONS)
    assert masks.shape == (2, 3, 8, 8, 8) and masks.dtype == torch.bool
    # MSD Task01 labels are ordered so that the regions are thresholds of the label value.
    assert torch.equal(masks[:, 0], label[:, 0] >= 1)
    assert torch.equal(masks[:, 1], label[:, 0] >= 2)
    assert torch.equal(masks[:, 2], label[:, 0] == 3)


def test_regions_round_trip():
    label = brats_label(seed=1)
    masks = labels_to_regions(label, BRATS_REGIONS)
    assert torch.equal(regions_to_labels(masks, BRATS_REGIONS), label)
    probabilities = torch.where(masks, 0.9, 0.1)
    assert torch.equal(regions_to_labels(probabilities, BRATS_REGIONS), label)
    # A single case (1, D, H, W) with the channel axis first.
    single = label[0]
    single_masks = labels_to_regions(single, BRATS_REGIONS, channel_dim=0)
    assert single_masks.shape == (3, 8, 8, 8)
    assert torch.equal(regions_to_labels(single_masks, BRATS_REGIONS, channel_dim=0), single)


def test_regions_to_labels_takes_the_innermost_region_that_is_on():
    # Voxels: nothing; whole only; whole + core; enhancing only; all three; core only.
    masks = torch.tensor(
        [[0, 1, 1, 0, 1, 0], [0, 0, 1, 0, 1, 1], [0, 0, 0, 1, 1, 0]], dtype=torch.bool
    )[None]
    assert regions_to_labels(masks, BRATS_REGIONS)[0, 0].tolist() == [0, 1, 2, 3, 3, 2]
    # Region order in the list does not matter; the sizes decide.
    shuffled = [BRATS_REGIONS[i] for i in (2, 0, 1)]
    assert regions_to_labels(masks[:, [2, 0, 1]], shuffled)[0, 0].tolist() == [0, 1, 2, 3, 3, 2]


def test_region_class_order():
    assert region_class_order(BRATS_REGIONS) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match="adds labels \\[1, 2\\]"):
        region_class_order([[1, 2], [3]])


def test_region_loss_matches_independent_computation():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 8, 8, 8, generator=generator)
    masks = labels_to_regions(brats_label(), BRATS_REGIONS)
    loss = RegionLoss()(logits, masks)
    expected = batch_dice_loss(logits.sigmoid(), masks.float()) + F.binary_cross_entropy_with_logits(
        logits, masks.float()
    )
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert RegionLoss()(logits.bfloat16(), masks).dtype == torch.float32
    with pytest.raises(ValueError, match="differ"):
        RegionLoss()(logits[:, :2], masks)


def test_deep_supervision_weights():
    assert DeepSupervisionLoss.weights(3) == pytest.approx([1 / 1.75, 0.5 / 1.75, 0.25 / 1.75])


@pytest.mark.parametrize("base", [SegmentationLoss(), SegmentationLoss(focal=True)])
def test_deep_supervision_loss_is_the_weighted_sum(base):
    heads = [random_case((2, 3, 4, 4, 4), seed=seed)[0] for seed in range(3)]
    _, target = random_case((2, 3, 4, 4, 4), seed=7)
    stacked = torch.stack(heads, dim=1)
    loss = DeepSupervisionLoss(base)(stacked, target)
    manual = (base(heads[0], target) + 0.5 * base(heads[1], target) + 0.25 * base(heads[2], target)) / 1.75
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    # One output (no deep supervision, or eval mode) goes straight to the base loss.
    assert DeepSupervisionLoss(base)(heads[0], target).item() == pytest.approx(base(heads[0], target).item())


def test_deep_supervision_with_regions_and_network_output():
    network = plan_network([16, 16, 16], [1.0, 1.0, 1.0]).replace(features=(4, 8, 16), deep_supervision_heads=1)
    model = build_network(1, 3, network).train()
    outputs = model(torch.randn(2, 1, 16, 16, 16))
    masks = labels_to_regions(brats_label()[..., :16, :16, :16].repeat(1, 1, 2, 2, 2), BRATS_REGIONS)
    loss = DeepSupervisionLoss(RegionLoss())(outputs, masks)
    manual = (RegionLoss()(outputs[:, 0], masks) + 0.5 * RegionLoss()(outputs[:, 1], masks)) / 1.5
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="do not match"):
        DeepSupervisionLoss(RegionLoss())(outputs[None], masks)
