from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from data_preprocessing.configs import PATCH_SIZES, SPACINGS
from data_preprocessing.network_plan import plan_network
from nnunet.network import UNet, build_network, norm_layer, parameter_count
from utils.settings import NetworkPlan

NORM_TYPES = {
    "instance": (nn.InstanceNorm2d, nn.InstanceNorm3d),
    "batch": (nn.BatchNorm2d, nn.BatchNorm3d),
    "group": (nn.GroupNorm,),
}


def plan(patch, spacing, planner="default", **changes) -> NetworkPlan:
    """The preset's network for a patch, with some fields changed."""
    network = plan_network(list(patch), list(spacing), planner)
    n = network.n_stages
    if "features" in changes:
        changes["features"] = tuple(changes["features"])[:n]
    return network.replace(**changes) if changes else network


def convolutions(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d | nn.Conv3d)]


# patch, spacing, planner, features, norm, heads
FORWARD_CASES = [
    ((16, 16, 16), (1.0, 1.0, 1.0), "default", (4, 8, 16), "instance", 0),
    ((16, 16, 16), (1.0, 1.0, 1.0), "default", (4, 8, 16), "batch", 1),
    ((16, 16, 16), (1.0, 1.0, 1.0), "resenc_m", (4, 8, 16), "group", 1),
    ((8, 32, 32), (3.0, 1.0, 1.0), "resenc_l", (4, 8, 16, 16), "instance", 0),
    ((32, 32), (1.0, 1.0), "resenc_m", (4, 8, 16, 16), "instance", 0),
    ((32, 32), (1.0, 1.0), "default", (4, 8, 16, 16), "batch", 2),
    ((32, 32), (1.0, 1.0), "default", (4, 8, 16, 16), "group", 2),
]


@pytest.mark.parametrize("patch, spacing, planner, features, norm, heads", FORWARD_CASES)
def test_forward_backward_shapes(patch, spacing, planner, features, norm, heads):
    torch.manual_seed(0)
    network = plan(patch, spacing, planner, features=features, norm=norm, deep_supervision_heads=heads)
    model = build_network(2, 3, network)
    image = torch.randn(2, 2, *patch)

    model.train()
    out = model(image)
    assert out.shape == ((2, 1 + heads, 3, *patch) if heads else (2, 3, *patch))
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
    assert residual == (planner != "default")


def test_the_plan_is_the_network():
    """Every field of the plan shows in the built network: features, kernels, strides and blocks per stage."""
    network = NetworkPlan(kind="unet", features=(4, 6, 8, 10), kernels=((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 1, 3)),
                          strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 1, 2)), encoder_blocks=(1, 2, 3, 1),
                          decoder_blocks=(2, 1, 3))
    model = build_network(1, 2, network)
    encoder = [convolutions(stage) for stage in model.encoder]
    assert [len(stage) for stage in encoder] == [1, 2, 3, 1]
    assert [stage[0].out_channels for stage in encoder] == [4, 6, 8, 10]
    assert [list(stage[0].kernel_size) for stage in encoder] == [list(k) for k in network.kernels]
    assert [list(stage[0].stride) for stage in encoder] == [list(s) for s in network.strides]
    # Decoder stages deepest first: stages 2, 1, 0 with 3, 1, 2 convolutions and that stage's own kernel.
    decoder = [convolutions(stage) for stage in model.decoder]
    assert [len(stage) for stage in decoder] == [3, 1, 2]
    assert [list(stage[0].kernel_size) for stage in decoder] == [[3, 3, 3], [3, 3, 3], [1, 3, 3]]
    assert [list(up.conv.stride) for up in model.upsamples] == [[2, 1, 2], [2, 2, 2], [1, 2, 2]]
    assert model(torch.randn(1, 1, 8, 16, 32)).shape == (1, 2, 8, 16, 32)


def test_residual_encoder_has_a_stem_and_residual_blocks_per_stage():
    network = plan((32, 32, 32), (1.0, 1.0, 1.0), "resenc_m", features=(4, 8, 16, 16))
    assert network.encoder_blocks == (1, 3, 4, 6) and network.decoder_blocks == (1, 1, 1)
    model = build_network(1, 2, network)
    assert convolutions(model.stem)[0].out_channels == 4
    assert [len(stage) for stage in model.encoder] == [1, 3, 4, 6]
    assert all(len(convolutions(stage)) == 1 for stage in model.decoder)


# Stages of the published nnU-Net plans: 6 (the depth cap) except the small hippocampus patches.
EXPECTED_STAGES = {key: 4 if key.startswith("04") else 6 for key in PATCH_SIZES}


@pytest.mark.parametrize("key", sorted(PATCH_SIZES))
def test_msd_configs_construct(key):
    task, dim = key.split("_")
    patch = PATCH_SIZES[key]
    spacing = SPACINGS[task] if dim == "3d" else SPACINGS[task][1:]
    # The meta device builds full-size networks and traces shapes without allocating or computing anything.
    with torch.device("meta"):
        network = plan(patch, spacing, deep_supervision_heads=2)
        model = build_network(4, 3, network)
        assert network.n_stages == EXPECTED_STAGES[key]
        cap = 320 if dim == "3d" else 512
        assert list(network.features) == [min(32 * 2**level, cap) for level in range(EXPECTED_STAGES[key])]
        assert model.train()(torch.empty(1, 4, *patch)).shape == (1, 3, 3, *patch)


def test_brain_tumour_network_has_nnunets_size():
    """The default plan for MSD Task01 (4 channels, 128^3) is nnU-Net's 3D U-Net: about 31 M parameters."""
    with torch.device("meta"):
        model = build_network(4, 4, plan(PATCH_SIZES["01_3d"], SPACINGS["01"]))
    assert 30e6 < parameter_count(model) < 32e6


def _forward_flops(model: nn.Module, shape: tuple[int, ...]) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(shape))
    return counter.get_total_flops()


def test_full_resolution_decoder_keeps_the_thin_slice_kernel():
    """On an anisotropic plan the full-resolution decoder convolves 1x3x3, as its encoder stage does."""
    network = plan((8, 32, 32), (3.0, 1.0, 1.0), features=(4, 8, 16, 16))
    assert network.kernels[0] == (1, 3, 3)
    model = build_network(1, 2, network)
    assert all(list(conv.kernel_size) == [1, 3, 3] for conv in convolutions(model.decoder[-1]))
    wider = build_network(1, 2, network.replace(kernels=((3, 3, 3), *network.kernels[1:])))
    # Only stage 0 differs: its encoder (1 -> f, f -> f) and decoder (2f -> f, f -> f) convolutions lose 27 - 9
    # taps per weight; a convolution costs 2 FLOPs per multiply-add and output voxel.
    voxels, f0 = 8 * 32 * 32, 4
    saved = 2 * voxels * (f0 + f0 * f0 + 2 * f0 * f0 + f0 * f0) * (27 - 9)
    shape = (1, 1, 8, 32, 32)
    assert _forward_flops(wider, shape) - _forward_flops(model, shape) == saved


def test_negative_slope_reaches_every_leaky_relu():
    network = plan((16, 16, 16), (1.0, 1.0, 1.0), "resenc_m", features=(4, 8, 16), negative_slope=0.2,
                   deep_supervision_heads=1)
    model = build_network(1, 2, network)
    activations = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    assert activations and all(m.negative_slope == 0.2 for m in activations)
    assert not [m for m in model.modules() if isinstance(m, nn.ReLU | nn.PReLU | nn.ELU | nn.GELU)]


@pytest.mark.parametrize(
    "features, groups",
    [((32, 64, 128, 256, 320, 320), 16), ((4, 8, 16), 4), ((24, 48, 96), 8), ((6, 12, 24), 2)],
)
def test_group_norm_divides_every_feature_count(features, groups):
    assert norm_layer("group", features) == ("GROUP", {"num_groups": groups})
    with torch.device("meta"):
        model = build_network(1, 2, plan((16, 16, 16), (1.0, 1.0, 1.0), features=features[:3], norm="group"))
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == math_gcd(groups, features[:3]) for m in norms)


def math_gcd(groups: int, features) -> int:
    import math

    return math.gcd(groups, *features)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"features": (4, 8, 16, 32)}, "one entry per stage"),
        ({"deep_supervision_heads": 2}, "from 0 to 1"),
        ({"norm": "layer"}, "'norm' must be one of"),
        ({"kernels": ((2, 3, 3), (3, 3, 3), (3, 3, 3))}, "odd sizes"),
        ({"strides": ((2, 2, 2), (2, 2, 2), (2, 2, 2))}, "strides\\[0\\]"),
        ({"decoder_blocks": (1, 1, 1)}, "one entry per decoder stage"),
        ({"encoder_blocks": (1, 0, 1)}, "block counts"),
        ({"kind": "transformer"}, "'kind' must be one of"),
    ],
)
def test_invalid_plans_are_rejected(changes, message):
    network = plan((16, 16, 16), (1.0, 1.0, 1.0), features=(4, 8, 16))
    with pytest.raises(ValueError, match=message):
        network.replace(**changes)


def test_plan_round_trips_through_json():
    network = plan((8, 32, 32), (3.0, 1.0, 1.0), "resenc_l", deep_supervision_heads=1)
    assert NetworkPlan.from_dict(network.to_dict()) == network
    with pytest.raises(ValueError, match="has no 'strides'"):
        NetworkPlan.from_dict({k: v for k, v in network.to_dict().items() if k != "strides"})
    with pytest.raises(ValueError, match="unknown 'network' key"):
        NetworkPlan.from_dict({**network.to_dict(), "width": 2})


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
    plain = UNet(1, 2, plan((16, 16, 16), (1.0, 1.0, 1.0), features=(4, 8, 16)))
    ours = build_network(1, 2, plan((16, 16, 16), (1.0, 1.0, 1.0), features=(4, 8, 16)))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}


def test_channels_last_layout_gives_the_same_output_and_switches_back_for_training():
    from nnunet.network import set_layout

    torch.manual_seed(0)
    model = build_network(2, 3, plan((16, 32, 32), (1.0, 1.0, 1.0), features=(32, 64, 64, 64))).eval()
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
    two_d = build_network(1, 2, plan((32, 32), (1.0, 1.0), features=(4, 8, 16, 32)))
    strides = [p.stride() for p in two_d.parameters()]
    assert [p.stride() for p in set_layout(two_d, channels_last=True).parameters()] == strides  # 2D: untouched
