"""The U-Net: MONAI's DynUNet with nnU-Net's decoder kernels, built from a patch size and spacing.

`build_unet` turns a plan (patch size and spacing, in (D, H, W) or (H, W) order) into a network:
the kernels and strides of each level come from `data_preprocessing.planner.kernels_strides`, so
the same rules pick the network for MSD tasks and for any other dataset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetUpBlock
from monai.networks.nets import DynUNet

from data_preprocessing.planner import default_filters, kernels_strides

NORMS = ("instance", "batch", "group")

# Group norm splits channels into at most this many groups; fewer when the filter counts share no such divisor.
MAX_GROUPS = 16


class UNet(DynUNet):
    """DynUNet whose decoder convolves each level with that level's own kernel.

    DynUNet gives the decoder block that upsamples from level i to level i-1 the kernel of level i.
    nnU-Net convolves the decoder's level i-1 with kernels[i-1], the kernel of the encoder at the same
    resolution. On anisotropic plans the two differ: the full-resolution decoder of a plan with kernels
    (1, 3, 3), (3, 3, 3), ... would convolve 3x3x3 across thick slices, which costs compute and mixes
    slices the encoder deliberately kept apart. Everything else (blocks, deep supervision heads, output
    format, weight initialisation) is DynUNet's.

    Args and outputs are DynUNet's: input (B, C, *spatial); output (B, K, *spatial), or in training mode with
    deep supervision (B, 1 + deep_supr_num, K, *spatial) with the coarser heads interpolated to full size.
    """

    def get_upsamples(self) -> nn.ModuleList:
        in_channels = self.filters[1:][::-1]
        out_channels = self.filters[:-1][::-1]
        strides = self.strides[1:][::-1]
        # The block that lands on level i-1 takes kernel_size[i-1]: the kernels of levels 0 .. n-2, deepest first.
        kernel_size = self.kernel_size[:-1][::-1]
        upsample_kernel_size = self.upsample_kernel_size[::-1]
        return self.get_module_list(
            in_channels,
            out_channels,
            kernel_size,
            strides,
            UnetUpBlock,  # type: ignore[arg-type]
            upsample_kernel_size,
            trans_bias=self.trans_bias,
        )



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


def norm_layer(norm: str, filters: Sequence[int]) -> tuple[str, dict]:
    """MONAI norm spec for `norm` ("instance", "batch" or "group").

    Group norm uses the largest group count up to `MAX_GROUPS` that divides every filter count, since one
    spec serves all levels (32 .. 320 channels by default: 16 groups).
    """
    if norm == "instance":
        return ("INSTANCE", {"affine": True})
    if norm == "batch":
        return ("BATCH", {})
    if norm == "group":
        return ("GROUP", {"num_groups": math.gcd(MAX_GROUPS, *filters)})
    raise ValueError(f"unknown norm {norm!r}; expected one of {', '.join(NORMS)}")


def build_unet(
    in_channels: int,
    out_channels: int,
    patch_size: Sequence[int],
    spacing: Sequence[float],
    *,
    filters: Sequence[int] | None = None,
    depth: int = 6,
    min_fmap: int = 4,
    norm: str = "instance",
    negative_slope: float = 0.01,
    res_block: bool = False,
    deep_supervision: bool = False,
    deep_supr_num: int = 2,
) -> UNet:
    """The U-Net for a plan.

    Args:
        in_channels: image channels C.
        out_channels: output channels K (classes with background, or regions).
        patch_size: input size in voxels, (D, H, W) for a 3D network or (H, W) for a 2D one.
        spacing: voxel spacing of that input in mm, same order.
        filters: channels per level. The number of levels follows from the plan, so a longer list is cut to
            that number (the same `--filters` fit plans of any depth); a shorter one is an error. Default:
            32 doubling per level, capped at 320 (3D) or 512 (2D).
        depth: maximum number of levels, the full-resolution one included.
        min_fmap: an axis is not downsampled below this many voxels.
        norm: "instance" (affine), "batch" or "group".
        negative_slope: slope of every LeakyReLU for negative inputs.
        res_block: residual blocks in the encoder and bottleneck (DynUNet's decoder blocks are plain).
        deep_supervision: in training mode also return the outputs of the `deep_supr_num` decoder levels below
            full resolution.
        deep_supr_num: number of extra outputs; fewer than the number of levels minus one.

    Returns:
        The network; it maps (B, in_channels, *patch_size) to (B, out_channels, *patch_size).

    Raises:
        ValueError: for a plan with fewer than 3 levels, too few filters, or too many deep supervision outputs.
    """
    dim = len(patch_size)
    if dim not in (2, 3) or len(spacing) != dim:
        raise ValueError(f"patch size {list(patch_size)} and spacing {list(spacing)} must both have 2 or 3 axes")
    kernels, strides = kernels_strides(patch_size, spacing, min_fmap, depth)
    n_levels = len(kernels)
    if n_levels < 3:
        raise ValueError(
            f"patch size {list(patch_size)} allows only {n_levels} U-Net levels (at least 3 needed); "
            f"use a larger patch or a smaller --min_fmap"
        )
    if filters is None:
        filters = default_filters(n_levels, dim)
    elif len(filters) < n_levels:
        raise ValueError(f"--filters gives {len(filters)} channel counts but the plan has {n_levels} levels")
    filters = [int(f) for f in filters[:n_levels]]
    if deep_supervision and not 1 <= deep_supr_num < n_levels - 1:
        raise ValueError(
            f"--deep_supr_num {deep_supr_num} must be between 1 and {n_levels - 2} for a plan with {n_levels} levels"
        )
    network = UNet(
        spatial_dims=dim,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernels,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=filters,
        norm_name=norm_layer(norm, filters),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": negative_slope}),
        deep_supervision=deep_supervision,
        deep_supr_num=deep_supr_num,
        res_block=res_block,
    )
    return use_cpu_instance_norm(network)


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
