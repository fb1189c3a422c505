"""A model package's networks as ONNX files, with a description of what each expects.

`scripts/export.py --model PKG --onnx OUT.onnx` writes one file per fold, `OUT_<configuration>_fold<k>.onnx`, and
`OUT.json`, which says for each file how it is fed. An exported network maps a batch of preprocessed patches,
(N, C, D, H, W) float32 in 3D or (N, C, H, W) in 2D, to logits (N, K, ...); the batch and spatial axes are
dynamic, each spatial size a multiple of the network's total stride (`divisible_by`). Everything around the
network is the caller's, as `nnunet.predictor` does it: resampling to the plan's spacing, the plan's
normalisation, sliding windows of the plan's patch size (gaussian-weighted, overlap 0.5), the activation
(softmax over classes, sigmoid per region) and the way back to the source grid.

The exporter is torch's TorchScript-based one (`torch.onnx.export(dynamo=False)`): it needs only the `onnx`
package, where the torch.export-based exporter also needs `onnxscript`.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch

from nnunet.network import set_layout
from nnunet.nn_unet import NNUnet
from nnunet.predictor import Predictor
from utils.errors import UserError
from utils.io import atomic_open, save_json

DEFAULT_OPSET = 17
SPATIAL_NAMES = ("depth", "height", "width")


def divisor(model: NNUnet) -> list[int]:
    """The factor each spatial size must be a multiple of: the product of the network's strides per axis."""
    strides = model.settings.network.strides
    return [math.prod(stride[axis] for stride in strides) for axis in range(model.dim)]


def export_network(model: NNUnet, path: str | os.PathLike, opset: int = DEFAULT_OPSET) -> Path:
    """Write one network as ONNX: input "image" (N, C, *spatial) float32 -> output "logits" (N, K, *spatial).

    The network is traced in evaluation mode on the CPU with a patch of the plan's size; batch and spatial axes
    are left dynamic.
    """
    network = set_layout(model.model.to("cpu").eval(), channels_last=False)
    example = torch.zeros(1, int(model.config["in_channels"]), *model.patch_size)
    names = SPATIAL_NAMES[-model.dim:]
    axes = {0: "batch", **{2 + i: name for i, name in enumerate(names)}}
    path = Path(path)
    with atomic_open(path, "wb") as handle, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter is deprecated
        # Shape checks inside the norms become constants of the trace; the shapes they check stay dynamic.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(network, (example,), handle, dynamo=False, opset_version=opset, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": axes, "logits": axes})
    return path


def export_package(package: str | os.PathLike, output: str | os.PathLike, folds: list[int] | None = None,
                   opset: int = DEFAULT_OPSET) -> list[Path]:
    """Export every fold of every configuration of a package next to `output` (see the module docstring).

    Returns:
        The ONNX files written; `output` with the suffix .json describes them.

    Raises:
        UserError: the package does not check out (`Predictor.from_package`), or the onnx package is missing.
    """
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise UserError("ONNX export needs the onnx package: pip install onnx") from None
    output = Path(output)
    if output.suffix != ".onnx":
        raise UserError(f"--onnx {output}: name a file ending in .onnx")
    predictor = Predictor.from_package(package, folds)
    output.parent.mkdir(parents=True, exist_ok=True)
    written, described = [], []
    for member in predictor.members:
        model = member.model
        path = export_network(model, output.with_name(f"{output.stem}_{member.configuration}_fold{member.fold}.onnx"),
                              opset)
        written.append(path)
        config = model.config
        described.append({
            "file": path.name, "configuration": member.configuration, "fold": member.fold,
            "input": {"name": "image", "layout": "NCDHW" if model.dim == 3 else "NCHW",
                      "channels": int(config["in_channels"]), "modalities": config.get("modalities"),
                      "spacing_mm": list(config["spacing"])[-model.dim:], "patch_size": list(model.patch_size),
                      "divisible_by": divisor(model), "normalization": config["normalization"]},
            "output": {"name": "logits", "channels": model.n_outputs, "activation": model.activation,
                       "labels": config["labels"], "regions": model.regions},
        })
    save_json(output.with_suffix(".json"), {"opset": opset, "networks": described,
                                            "postprocessing": predictor.package.postprocessing.to_dict()})
    return written
