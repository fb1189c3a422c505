"""Training-loader throughput: this project's DALI pipeline next to an equivalent MONAI pipeline.

    python benchmarks/loader.py [--data DIR] [--batch_size 2] [--num_workers 2] [--batches 20] [--warmup 3]

Both loaders read the same training cases of a preprocessed task (`<case>_x.npy`, `<case>_y.npy`)
on the CPU with the same number of workers, draw patches of the task's patch size with the same
foreground oversampling, and apply the same augmentations with the same probabilities: zoom,
rotation, scaling, three flips, noise, blur, brightness and contrast. Without --data, synthetic
cases (4 channels, an organ-like sphere with a lesion) are written to a temporary folder first.
It prints patches/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_loading import dali_loader  # noqa: E402
from data_loading.data_module import DataModule  # noqa: E402
from utils.args import (  # noqa: E402
    Formatter,
    default_workers,
    loader_settings,
    main_parser,
    non_negative_int,
    positive_int,
    probability,
)
from utils.errors import UserError  # noqa: E402
from utils.logger import latency_summary, time_batches  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Formatter)
    parser.add_argument("--data", default=None, help="preprocessed task folder (default: synthetic cases)")
    parser.add_argument("--batch_size", type=positive_int, default=2, help="patches per batch")
    parser.add_argument("--num_workers", type=positive_int, default=default_workers(),
                        help="DALI threads, and MONAI DataLoader worker processes")
    parser.add_argument("--batches", type=positive_int, default=20, help="timed batches")
    parser.add_argument("--warmup", type=non_negative_int, default=3, help="batches before timing starts")
    parser.add_argument("--oversampling", type=probability, default=0.4, help="foreground probability of a patch")
    parser.add_argument("--cases", type=positive_int, default=8, help="synthetic cases (without --data)")
    parser.add_argument("--shape", type=positive_int, nargs=3, default=[144, 144, 144],
                        help="synthetic case size (D H W) in voxels")
    parser.add_argument("--channels", type=positive_int, default=4, help="synthetic case channels")
    parser.add_argument("--patch_size", type=positive_int, nargs=3, default=[128, 128, 128],
                        help="synthetic task patch (D H W)")
    parser.add_argument("--loaders", nargs="+", choices=["dali", "monai"], default=["dali", "monai"])
    return parser.parse_args(argv)


def write_synthetic_task(folder: Path, cases: int, shape: list[int], patch_size: list[int], channels: int = 4,
                         seed: int = 0) -> Path:
    """`cases` volumes with a sphere (label 1) holding a smaller sphere (label 2), and a config.json."""
    rng = np.random.default_rng(seed)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    for index in range(cases):
        centre = [rng.uniform(0.3 * s, 0.7 * s) for s in shape]
        radius = np.sqrt(sum((axis - c) ** 2 for axis, c in zip(grid, centre)))
        label = np.zeros((1, *shape), np.uint8)
        label[0][radius < 0.15 * min(shape)] = 1
        label[0][radius < 0.05 * min(shape)] = 2
        image = rng.standard_normal((channels, *shape), dtype=np.float32) + label.astype(np.float32)
        np.save(folder / f"case_{index:03d}_x.npy", image)
        np.save(folder / f"case_{index:03d}_y.npy", label)
    config = {"dim": 3, "in_channels": channels, "n_class": 3, "patch_size": list(patch_size),
              "spacing": [1.0, 1.0, 1.0], "labels": {"0": "background", "1": "organ", "2": "lesion"}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def dali_training_loader(args: argparse.Namespace, data: Path, batches: int) -> DataModule:
    main_args = main_parser().parse_args([
        "--data", str(data), "--batch_size", str(args.batch_size), "--num_workers", str(args.num_workers),
        "--oversampling", str(args.oversampling), "--nfolds", "1", "--seed", "0", "--train_batches", str(batches)])
    module = DataModule(loader_settings(main_args))
    module.setup("fit")
    return module


def monai_training_loader(args: argparse.Namespace, module: DataModule):
    """MONAI dictionary transforms matching `dali_loader`'s augmentations, in a MONAI DataLoader."""
    from monai.data import DataLoader, Dataset, NumpyReader
    from monai.transforms import (
        Compose,
        LoadImaged,
        RandAdjustContrastd,
        RandAffined,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandRotated,
        RandScaleIntensityd,
        RandZoomd,
    )

    keys = ["image", "label"]
    spatial_modes = ("bilinear", "nearest")
    angle = math.radians(dali_loader.ROTATION_DEGREES)
    blur = dali_loader.BLUR_SIGMA
    scale_low, scale_high = dali_loader.SCALE_RANGE
    transforms = Compose([
        LoadImaged(keys, reader=NumpyReader(channel_dim=0), image_only=True),
        RandCropByPosNegLabeld(keys, label_key="label", spatial_size=module.patch_size, pos=args.oversampling,
                               neg=1.0 - args.oversampling, num_samples=1, allow_smaller=True),
        # Our zoom crops 0.7-1.0 of the patch and resizes it back: a magnification of 1-1/0.7.
        RandZoomd(keys, prob=dali_loader.ZOOM_PROB, min_zoom=1.0, max_zoom=1.0 / dali_loader.ZOOM_RANGE[0],
                  mode=("trilinear", "nearest"), keep_size=True),
        RandRotated(keys, range_x=angle, range_y=angle, range_z=angle, prob=dali_loader.ROTATION_PROB,
                    mode=spatial_modes, padding_mode="zeros", keep_size=True),
        RandAffined(keys, prob=dali_loader.SCALE_PROB, scale_range=[(scale_low - 1.0, scale_high - 1.0)] * 3,
                    mode=spatial_modes, padding_mode="zeros"),
        *[RandFlipd(keys, prob=dali_loader.FLIP_PROB, spatial_axis=axis) for axis in range(3)],
        RandGaussianNoised("image", prob=dali_loader.NOISE_PROB, std=dali_loader.NOISE_SIGMA[1]),
        RandGaussianSmoothd("image", sigma_x=blur, sigma_y=blur, sigma_z=blur, prob=dali_loader.BLUR_PROB),
        RandScaleIntensityd("image", factors=dali_loader.BRIGHTNESS_RANGE[1] - 1.0, prob=dali_loader.BRIGHTNESS_PROB),
        RandAdjustContrastd("image", gamma=dali_loader.CONTRAST_RANGE, prob=dali_loader.CONTRAST_PROB),
    ])
    transforms.set_random_state(seed=0)
    folder = module.case_dir
    files = [{"image": str(folder / f"{case}_x.npy"), "label": str(folder / f"{case}_y.npy")}
             for case in module.train_cases]
    return DataLoader(Dataset(files, transforms), batch_size=args.batch_size, shuffle=True,
                      num_workers=args.num_workers, persistent_workers=True)


def endless(loader):
    while True:
        yield from loader


def measure(loader, warmup: int, batches: int, batch_size: int) -> dict[str, float]:
    """Patches/s and batch latency (ms) over `batches` batches after `warmup` batches."""
    # MONAI's loader stops after one pass over the cases; DALI's gives exactly warmup + batches.
    return latency_summary(time_batches(endless(loader), warmup, batches), batch_size)


def compare(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Time the loaders of `args.loaders`, print the table, and return each loader's `latency_summary`."""
    with tempfile.TemporaryDirectory(prefix="loader_benchmark_") as scratch:
        if args.data:
            data = Path(args.data)
        else:
            data = write_synthetic_task(Path(scratch), args.cases, args.shape, args.patch_size, args.channels)
        module = dali_training_loader(args, data, args.warmup + args.batches)
        results = {}
        if "dali" in args.loaders:
            results["DALI (this project)"] = measure(module.train_dataloader(), args.warmup, args.batches,
                                                     args.batch_size)
            module.teardown()
        if "monai" in args.loaders:
            results["MONAI"] = measure(monai_training_loader(args, module), args.warmup, args.batches,
                                       args.batch_size)
    print(f"patch {module.patch_size}, batch {args.batch_size}, {args.num_workers} workers, "
          f"{len(module.train_cases)} cases, {args.batches} timed batches after {args.warmup}")
    print(f"{'loader':<22} {'patches/s':>10} {'batch ms (mean)':>16} {'p90':>8}")
    for name, summary in results.items():
        print(f"{name:<22} {summary['throughput']:>10.2f} {summary['latency_mean']:>16.1f} "
              f"{summary['latency_90']:>8.1f}")
    if len(results) == 2:
        dali, monai = results.values()
        print(f"{'ratio DALI / MONAI':<22} {dali['throughput'] / monai['throughput']:>10.2f}")
    return results


def main(argv: list[str] | None = None) -> int:
    try:
        compare(parse_args(argv))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
