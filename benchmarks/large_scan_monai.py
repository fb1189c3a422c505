"""Predicts a folder of CT scans the usual MONAI way, with the network of one of our checkpoints.

    python benchmarks/large_scan_monai.py --ckpt_path CKPT --input DIR --output DIR [--tta]

Only the network module and the plan are taken from the checkpoint (`nnunet.checkpoints.model_from_checkpoint`);
everything else is MONAI: LoadImaged, EnsureChannelFirstd, Orientationd (RAS), Spacingd to the plan's spacing,
the plan's CT normalisation as ScaleIntensityRanged (clip to the dataset's foreground percentiles, then
(x - mean) / std: one linear map with clipping), `sliding_window_inference` with the plan's patch, overlap 0.5 and
gaussian blending (sigma 0.125 of the window, as ours), softmax, with --tta the mean over the 8 flips of the
spatial axes, then Invertd back onto the source image (linear), argmax and SaveImaged (uint8, `<case>.nii.gz`).

MONAI arrays are (C, X, Y, Z); our networks were trained on (C, D, H, W) = (C, Z, Y, X), so each window is
transposed on its way into the network and back. Unlike ours, no crop to the non-zero box (a CT scan's air is
not zero) and no outlier fence before normalisation (the clip to the percentiles follows anyway).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="our checkpoint: the network and its plan")
    parser.add_argument("--input", required=True, help="folder of NIfTI scans")
    parser.add_argument("--output", required=True, help="folder for the labels")
    parser.add_argument("--tta", action="store_true", help="average the probabilities over all flips")
    parser.add_argument("--overlap", type=float, default=0.5, help="window overlap")
    parser.add_argument("--sw_batch_size", type=int, default=4, help="windows per forward pass (ours: 4)")
    return parser.parse_args(argv)


class SlicesFirst(torch.nn.Module):
    """A (D, H, W) network applied to (N, C, X, Y, Z) windows."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        return self.network(window.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)


def ct_scaling(normalization: dict) -> dict:
    """ScaleIntensityRanged arguments equal to clipping to [clip_low, clip_high] and then (x - mean) / std."""
    std = max(normalization["std"], 1e-8)
    low, high = normalization["clip_low"], normalization["clip_high"]
    return {"a_min": low, "a_max": high, "b_min": (low - normalization["mean"]) / std,
            "b_max": (high - normalization["mean"]) / std, "clip": True}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from monai.data import DataLoader, Dataset, decollate_batch
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        Orientationd,
        SaveImaged,
        ScaleIntensityRanged,
        Spacingd,
    )

    from nnunet.checkpoints import model_from_checkpoint

    model = model_from_checkpoint(args.ckpt_path)
    config = model.config
    (scheme,) = config["normalization"]
    if scheme["type"] != "ct":
        raise SystemExit(f"{args.ckpt_path}: this script reproduces CT normalisation only, not {scheme['type']}")
    network = SlicesFirst(model.model).eval()
    roi_size = list(config["patch_size"])[::-1]  # (X, Y, Z)
    pre = Compose([
        LoadImaged(keys="image"),
        EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="RAS"),
        Spacingd(keys="image", pixdim=list(config["spacing"])[::-1], mode="bilinear"),
        ScaleIntensityRanged(keys="image", **ct_scaling(scheme)),
    ])
    post = Compose([
        Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
        AsDiscreted(keys="pred", argmax=True),
        SaveImaged(keys="pred", output_dir=args.output, output_postfix="", separate_folder=False,
                   output_dtype="uint8", resample=False, print_log=False),
    ])
    files = [{"image": str(path)} for path in sorted(Path(args.input).glob("*.nii.gz"))]
    loader = DataLoader(Dataset(files, transform=pre), batch_size=1, num_workers=0)
    flips = [axes for count in range(4) for axes in itertools.combinations((2, 3, 4), count)] if args.tta else [()]

    def probabilities(image: torch.Tensor) -> torch.Tensor:
        total = None
        for axes in flips:
            flipped = torch.flip(image, axes) if axes else image
            logits = sliding_window_inference(flipped, roi_size, args.sw_batch_size, network, overlap=args.overlap,
                                              mode="gaussian", sigma_scale=0.125)
            result = torch.softmax(logits, dim=1)
            result = torch.flip(result, axes) if axes else result
            total = result if total is None else total.add_(result)
        return total / len(flips)

    with torch.inference_mode():
        for batch in loader:
            batch["pred"] = probabilities(batch["image"])
            for item in decollate_batch(batch):
                post(item)
    print(f"predicted {len(files)} case(s) into {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
