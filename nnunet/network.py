"""The U-Net: MONAI's DynUNet with nnU-Net's decoder kernels, built from a patch size and spacing.

`build_unet` turns a plan (patch size and spacing, in (D, H, W) or (H, W) order) into a network:
the kernels and strides of each level come from `data_preprocessing.planner.kernels_strides`, so
the same rules pick the network for MSD tasks and for any other dataset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn as nn
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
    return UNet(
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
