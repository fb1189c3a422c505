from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from monai.networks.nets import DynUNet
from torch.utils.flop_counter import FlopCounterMode

from data_preprocessing.configs import PATCH_SIZES, SPACINGS
from nnunet.network import UNet, build_unet, norm_layer

NORM_TYPES = {
    "instance": (nn.InstanceNorm2d, nn.InstanceNorm3d),
    "batch": (nn.BatchNorm2d, nn.BatchNorm3d),
    "group": (nn.GroupNorm,),
}

# patch, spacing, filters, norm, res_block, deep_supervision, deep_supr_num
FORWARD_CASES = [
    ((16, 16, 16), (1.0, 1.0, 1.0), [4, 8, 16], "instance", False, False, 1),
    ((16, 16, 16), (1.0, 1.0, 1.0), [4, 8, 16], "batch", False, True, 1),
    ((16, 16, 16), (1.0, 1.0, 1.0), [4, 8, 16], "group", True, True, 1),
    ((8, 32, 32), (3.0, 1.0, 1.0), [4, 8, 16, 16], "instance", True, False, 1),
    ((32, 32), (1.0, 1.0), [4, 8, 16, 16], "instance", True, False, 1),
    ((32, 32), (1.0, 1.0), [4, 8, 16, 16], "batch", False, True, 2),
    ((32, 32), (1.0, 1.0), [4, 8, 16, 16], "group", False, True, 2),
]


@pytest.mark.parametrize("patch, spacing, filters, norm, res_block, deep_supervision, deep_supr_num", FORWARD_CASES)
def test_forward_backward_shapes(patch, spacing, filters, norm, res_block, deep_supervision, deep_supr_num):
    torch.manual_seed(0)
    model = build_unet(
        2, 3, patch, spacing, filters=filters, norm=norm, res_block=res_block,
        deep_supervision=deep_supervision, deep_supr_num=deep_supr_num,
    )
    image = torch.randn(2, 2, *patch)

    model.train()
    out = model(image)
    expected = (2, 1 + deep_supr_num, 3, *patch) if deep_supervision else (2, 3, *patch)
    assert out.shape == expected
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    model.eval()
    with torch.no_grad():
        assert model(image).shape == (2, 3, *patch)

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase | nn.GroupNorm)]
    assert norms and all(isinstance(m, NORM_TYPES[norm]) for m in norms)
    if norm == "instance":
        assert all(m.affine for m in norms)
    residual = any(hasattr(m, "conv3") for m in model.modules())
    assert residual == res_block


# Levels of the published nnU-Net plans: 6 (the depth cap) except the small hippocampus patches.
EXPECTED_LEVELS = {key: 4 if key.startswith("04") else 6 for key in PATCH_SIZES}


@pytest.mark.parametrize("key", sorted(PATCH_SIZES))
def test_msd_configs_construct(key):
    task, dim = key.split("_")
    patch = PATCH_SIZES[key]
    spacing = SPACINGS[task] if dim == "3d" else SPACINGS[task][1:]
    # The meta device builds full-size networks and traces shapes without allocating or computing anything.
    with torch.device("meta"):
        model = build_unet(4, 3, patch, spacing, deep_supervision=True, deep_supr_num=2)
        assert len(model.downsamples) + 2 == EXPECTED_LEVELS[key]
        cap = 320 if dim == "3d" else 512
        assert model.filters == [min(32 * 2**level, cap) for level in range(EXPECTED_LEVELS[key])]
        assert model.train()(torch.empty(1, 4, *patch)).shape == (1, 3, 3, *patch)


@pytest.mark.parametrize("key", ["04_3d", "04_2d"])
def test_small_msd_configs_forward(key):
    task, dim = key.split("_")
    patch = PATCH_SIZES[key]
    spacing = SPACINGS[task] if dim == "3d" else SPACINGS[task][1:]
    model = build_unet(1, 3, patch, spacing, filters=[4] * 6).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, *patch))
    assert out.shape == (1, 3, *patch) and torch.isfinite(out).all()


def _stock_dynunet(model: UNet) -> DynUNet:
    return DynUNet(
        model.spatial_dims, model.in_channels, model.out_channels, model.kernel_size, model.strides,
        model.upsample_kernel_size, filters=model.filters,
    )


def _forward_flops(model: nn.Module, shape: tuple[int, ...]) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(shape))
    return counter.get_total_flops()


def test_decoder_uses_each_levels_own_kernel():
    model = build_unet(1, 2, (8, 32, 32), (3.0, 1.0, 1.0), filters=[4, 8, 16, 16])
    assert model.kernel_size == [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    stock = _stock_dynunet(model)
    # upsamples[j] lands on level n - 2 - j (deepest first).
    n_levels = len(model.kernel_size)
    for j, (ours, theirs) in enumerate(zip(model.upsamples, stock.upsamples)):
        level = n_levels - 2 - j
        for conv in (ours.conv_block.conv1.conv, ours.conv_block.conv2.conv):
            assert list(conv.kernel_size) == model.kernel_size[level]
        assert list(theirs.conv_block.conv1.conv.kernel_size) == model.kernel_size[level + 1]
    assert model.upsamples[-1].conv_block.conv1.conv.kernel_size == (1, 3, 3)
    assert stock.upsamples[-1].conv_block.conv1.conv.kernel_size == (3, 3, 3)

    # Only the full-resolution decoder differs: its two convolutions (2f -> f, f -> f) lose 27 - 9 taps per
    # weight; a convolution costs 2 FLOPs per multiply-add and output voxel.
    voxels, f0 = 8 * 32 * 32, 4
    saved = 2 * voxels * (2 * f0 * f0 + f0 * f0) * (27 - 9)
    shape = (1, 1, 8, 32, 32)
    assert _forward_flops(stock, shape) - _forward_flops(model, shape) == saved


def test_isotropic_plan_matches_stock_dynunet():
    model = build_unet(1, 2, (16, 16, 16), (1.0, 1.0, 1.0), filters=[4, 8, 16])
    stock = _stock_dynunet(model)
    assert [p.shape for p in model.parameters()] == [p.shape for p in stock.parameters()]


def test_negative_slope_reaches_every_leaky_relu():
    model = build_unet(1, 2, (16, 16, 16), (1.0, 1.0, 1.0), filters=[4, 8, 16], res_block=True,
                       deep_supervision=True, deep_supr_num=1, negative_slope=0.2)
    activations = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    # Input block, one encoder block, bottleneck and two decoder blocks: one activation module each.
    assert len(activations) == 5
    assert all(m.negative_slope == 0.2 for m in activations)
    other = [m for m in model.modules() if isinstance(m, nn.ReLU | nn.PReLU | nn.ELU | nn.GELU)]
    assert not other


@pytest.mark.parametrize(
    "filters, groups",
    [(None, 16), ([4, 8, 16], 4), ([24, 48, 96], 8), ([6, 12, 24], 2)],
)
def test_group_norm_divides_every_filter_count(filters, groups):
    assert norm_layer("group", filters or [32, 64, 128, 256, 320, 320]) == ("GROUP", {"num_groups": groups})
    with torch.device("meta"):
        model = build_unet(1, 2, (16, 16, 16), (1.0, 1.0, 1.0), filters=filters, norm="group")
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == groups and m.num_channels % groups == 0 for m in norms)


def test_extra_filters_are_cut_to_the_plan():
    model = build_unet(1, 2, (16, 16, 16), (1.0, 1.0, 1.0), filters=[4, 8, 16, 32, 64])
    assert model.filters == [4, 8, 16]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"filters": [4, 8]}, "3 levels"),
        ({"deep_supervision": True, "deep_supr_num": 2}, "between 1 and 1"),
        ({"norm": "layer"}, "unknown norm"),
        ({"min_fmap": 8}, "only 2 U-Net levels"),
    ],
)
def test_invalid_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_unet(1, 2, (16, 16, 16), (1.0, 1.0, 1.0), **kwargs)


def test_patch_and_spacing_must_agree():
    with pytest.raises(ValueError, match="2 or 3 axes"):
        build_unet(1, 2, (16, 16, 16), (1.0, 1.0))


@pytest.mark.parametrize("dim", [2, 3])
def test_cpu_instance_norm_matches_torch_in_value_gradient_and_state_dict(dim):
    from nnunet.network import use_cpu_instance_norm

    torch.manual_seed(0)
    reference = (nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d)(6, affine=True)
    nn.init.normal_(reference.weight)
    nn.init.normal_(reference.bias)
    holder = use_cpu_instance_norm(nn.Sequential(reference))
    replacement = holder[0]
    assert type(replacement) is not type(reference) and isinstance(replacement, type(reference))
    assert replacement.weight is reference.weight  # the same parameters, so the same checkpoints
    image = torch.randn(2, 6, *([7, 8, 9] if dim == 3 else [10, 11]), requires_grad=True)
    expected = nn.functional.instance_norm(image, weight=reference.weight, bias=reference.bias)
    actual = replacement(image)
    assert torch.allclose(actual, expected, atol=1e-5)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), image)
    (grad_actual,) = torch.autograd.grad(actual.square().sum(), image)
    assert torch.allclose(grad_actual, grad_expected, atol=1e-4)
    plain = DynUNet(3, 1, 2, [[3, 3, 3]] * 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [[2, 2, 2]] * 2, filters=[4, 8, 16],
                    norm_name=("INSTANCE", {"affine": True}))
    ours = build_unet(1, 2, (16, 16, 16), (1.0, 1.0, 1.0), filters=[4, 8, 16])
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}


def test_channels_last_layout_gives_the_same_output_and_switches_back_for_training():
    from nnunet.network import set_layout

    torch.manual_seed(0)
    model = build_unet(2, 3, (16, 32, 32), (1.0, 1.0, 1.0), filters=[32, 64, 64, 64]).eval()
    image = torch.randn(2, 2, 16, 32, 32)
    with torch.inference_mode():
        expected = model(image)
        set_layout(model, channels_last=True)
        kernels = [p for p in model.parameters() if p.dim() == 5]
        assert all(p.stride()[1] == 1 for p in kernels)  # channels innermost, even with one input channel
        actual = model(image)
    assert torch.allclose(actual, expected, atol=1e-4)
    set_layout(model, channels_last=False)
    assert all(p.is_contiguous() and not p.is_inference() for p in model.parameters())
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(image).mean().backward()  # weights converted inside inference mode would be rejected here
    optimizer.step()
    two_d = build_unet(1, 2, (32, 32), (1.0, 1.0), filters=[4, 8, 16, 32])
    strides = [p.stride() for p in two_d.parameters()]
    assert [p.stride() for p in set_layout(two_d, channels_last=True).parameters()] == strides  # 2D: untouched
