"""The U-Net a plan describes, built from MONAI's layers.

`build_network(in_channels, out_channels, plan)` builds exactly the network of a
`data_preprocessing.network_plan.NetworkPlan`: its kind, features, kernels, strides, blocks per stage,
normalisation, activation slope and deep-supervision heads. Nothing is re-planned here; the plan comes
from `config.json` (written by `preprocess.py`, editable) or from a checkpoint.

Not MONAI's DynUNet: it has exactly two convolutions (or one residual block) per stage in the encoder and
the decoder, so neither nnU-Net's residual-encoder presets (1, 3, 4, 6, ... residual blocks per stage, one
convolution per decoder stage) nor an edited block count can be expressed with it, and its decoder takes
each level's kernel from the level below. The layers themselves are MONAI's (`get_conv_layer`,
`UnetResBlock`, `UnetOutBlock`), and so is the weight initialisation of DynUNet (He, slope 0.01).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetOutBlock, UnetResBlock, get_conv_layer

from data_preprocessing.network_plan import NetworkPlan, group_count


class UNet(nn.Module):
    """An encoder-decoder with skip connections, one stage per entry of the plan.

    Encoder stage s maps to `plan.features[s]` channels, its first block downsampling by `plan.strides[s]`
    (a strided convolution, as nnU-Net). Decoder stage s (every stage but the deepest) upsamples the stage
    below with a transposed convolution of kernel and stride `strides[s + 1]`, concatenates the encoder's skip
    and applies `decoder_blocks[s]` convolutions with `kernels[s]`, the encoder's kernel at that resolution.

    Input (B, in_channels, *spatial), each spatial size divisible by the total stride. Output (B, K, *spatial);
    in training mode with `deep_supervision_heads` n > 0, (B, 1 + n, K, *spatial): the full-resolution output
    first, then the n next coarser decoder stages' outputs, interpolated (nearest) to full size.
    """

    def __init__(self, in_channels: int, out_channels: int, plan: NetworkPlan) -> None:
        super().__init__()
        plan.checked()
        self.plan = plan
        self.in_channels, self.out_channels = in_channels, out_channels
        dim = plan.dim
        norm = norm_layer(plan.norm, plan.features)
        act = ("leakyrelu", {"inplace": True, "negative_slope": float(plan.negative_slope)})
        residual = plan.kind == "resenc_unet"

        def conv(cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int] = 1) -> nn.Module:
            return get_conv_layer(dim, cin, cout, kernel_size=kernel, stride=stride, act=act, norm=norm,
                                  bias=True, conv_only=False)

        def stack(cin: int, cout: int, blocks: int, kernel: Sequence[int], stride: Sequence[int]) -> nn.Sequential:
            if residual:
                return nn.Sequential(*[UnetResBlock(dim, cin if b == 0 else cout, cout, kernel, stride if b == 0 else 1,
                                                    norm_name=norm, act_name=act) for b in range(blocks)])
            return nn.Sequential(*[conv(cin if b == 0 else cout, cout, kernel, stride if b == 0 else 1)
                                   for b in range(blocks)])

        features, kernels, strides = plan.features, plan.kernels, plan.strides
        # The residual encoder starts with one convolution to the first stage's width (nnU-Net's stem).
        self.stem = conv(in_channels, features[0], kernels[0]) if residual else nn.Identity()
        encoder_in = [features[0] if residual else in_channels, *features[:-1]]
        self.encoder = nn.ModuleList(
            stack(encoder_in[s], features[s], plan.encoder_blocks[s], kernels[s], strides[s])
            for s in range(plan.n_stages))
        # Decoder stages from the deepest up: index j works at stage n - 2 - j.
        levels = list(range(plan.n_stages - 2, -1, -1))
        self.upsamples = nn.ModuleList(
            get_conv_layer(dim, features[s + 1], features[s], kernel_size=strides[s + 1], stride=strides[s + 1],
                           bias=True, conv_only=True, is_transposed=True) for s in levels)
        # Decoder blocks are plain convolutions in both kinds (the residual presets' decoders are plain too).
        self.decoder = nn.ModuleList(
            nn.Sequential(*[conv(2 * features[s] if b == 0 else features[s], features[s], kernels[s])
                            for b in range(plan.decoder_blocks[s])]) for s in levels)
        # Heads on the finest decoder stage, then on the next coarser ones for deep supervision.
        self.heads = nn.ModuleList(UnetOutBlock(dim, features[s], out_channels)
                                   for s in range(plan.deep_supervision_heads + 1))
        self.apply(initialise)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        skips = []
        x = self.stem(image)
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        decoded = []  # finest last
        for j, (upsample, block) in enumerate(zip(self.upsamples, self.decoder)):
            x = block(torch.cat([upsample(x), skips[-2 - j]], dim=1))
            decoded.append(x)
        output = self.heads[0](decoded[-1])
        if not self.training or len(self.heads) == 1:
            return output
        coarser = [F.interpolate(head(decoded[-2 - i]), size=output.shape[2:])
                   for i, head in enumerate(self.heads[1:])]
        return torch.stack([output, *coarser], dim=1)


def initialise(module: nn.Module) -> None:
    """He initialisation for slope 0.01 and zero biases for every convolution (DynUNet's and nnU-Net's)."""
    if isinstance(module, nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d | nn.ConvTranspose3d):
        nn.init.kaiming_normal_(module.weight, a=0.01)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_network(in_channels: int, out_channels: int, plan: NetworkPlan) -> UNet:
    """The U-Net of a plan, mapping (B, in_channels, *patch) to (B, out_channels, *patch).

    Raises:
        ValueError: a plan whose fields disagree (`NetworkPlan.checked`).
    """
    return use_cpu_instance_norm(UNet(in_channels, out_channels, plan))


def parameter_count(network: nn.Module) -> int:
    return sum(parameter.numel() for parameter in network.parameters())


class _GroupwiseOnCPU:
    """Instance norm computed on the CPU as group norm with one group per channel: the same statistics and result.

    PyTorch's CPU instance norm runs a batch norm over B*C channels and returns a view of it; the in-place
    LeakyReLU that follows then makes autograd copy the whole activation back in the backward pass. Group norm
    with C groups has its own kernel and no view: on 2 cores the norm ran about 3x faster and a 3D training step
    5 % faster (docs/performance.md). CUDA keeps the instance-norm kernel: under autocast group norm runs in
    float32, and no GPU was available to measure the trade.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.device.type == "cpu" and input.dim() == self._get_no_batch_dim() + 1:
            return F.group_norm(input, self.num_features, self.weight, self.bias, self.eps)
        return super().forward(input)


class InstanceNorm2d(_GroupwiseOnCPU, nn.InstanceNorm2d):
    """nn.InstanceNorm2d (affine, no running statistics) with the CPU kernel of `_GroupwiseOnCPU`."""


class InstanceNorm3d(_GroupwiseOnCPU, nn.InstanceNorm3d):
    """nn.InstanceNorm3d (affine, no running statistics) with the CPU kernel of `_GroupwiseOnCPU`."""


def use_cpu_instance_norm(module: nn.Module) -> nn.Module:
    """Replace, in place, every affine instance norm without running statistics by the classes above.

    The replacements share the original parameters, so weights, initialisation and state-dict keys are unchanged.
    """
    for name, child in module.named_children():
        kind = {nn.InstanceNorm2d: InstanceNorm2d, nn.InstanceNorm3d: InstanceNorm3d}.get(type(child))
        if kind is not None and child.affine and not child.track_running_stats:
            replacement = kind(child.num_features, eps=child.eps, affine=True)
            replacement.weight, replacement.bias = child.weight, child.bias
            setattr(module, name, replacement)
        else:
            use_cpu_instance_norm(child)
    return module


def norm_layer(norm: str, features: Sequence[int]) -> tuple[str, dict]:
    """MONAI norm spec for `norm` ("instance", "batch" or "group").

    Group norm uses the largest group count up to 16 that divides every stage's features, since one spec
    serves all stages (32 .. 320 channels by default: 16 groups).
    """
    if norm == "instance":
        return ("INSTANCE", {"affine": True})
    if norm == "batch":
        return ("BATCH", {})
    if norm == "group":
        return ("GROUP", {"num_groups": group_count(features)})
    raise ValueError(f"unknown norm {norm!r}")


def set_layout(network: nn.Module, channels_last: bool) -> nn.Module:
    """Store a 3D network's weights channels-last (NDHWC) or contiguous (NCDHW), in place.

    Activations follow the weights' layout. On the CPU a 3D network's forward pass ran about 15 % faster
    channels-last, its training step slower (docs/performance.md), so inference on the CPU switches to it and
    training switches back. 2D networks and parameters other than 3D kernels are left as they are.
    """
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    # Outside inference mode: weights copied inside it would become inference tensors, which training rejects.
    with torch.inference_mode(False):
        for parameter in network.parameters():
            # Strides, not is_contiguous: a kernel with one input channel passes both layouts' checks, and
            # convolutions pick their layout from the strides.
            if parameter.dim() == 5 and parameter.stride() != _strides(parameter.shape, channels_last):
                parameter.data = torch.empty_like(parameter.data, memory_format=layout).copy_(parameter.data)
    return network


def _strides(shape: Sequence[int], channels_last: bool) -> tuple[int, ...]:
    """Strides of a dense (N, C, D, H, W) tensor stored NCDHW, or NDHWC when `channels_last`."""
    n, c, d, h, w = shape
    if channels_last:
        return (d * h * w * c, 1, h * w * c, w * c, c)
    return (c * d * h * w, d * h * w, h * w, w, 1)
