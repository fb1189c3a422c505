"""Peak memory of preprocessing (parent and workers) and of training across epochs.

    python benchmarks/memory.py [--cases 200] [--size 64] [--big 512 512 600] [--jobs 1 2] [--epochs 10]

Preprocessing: writes a raw MSD-format task into a temporary folder (`--cases` cases of about
`--size`^3 voxels and one large case of `--big` voxels (X Y Z) at 0.8 x 0.8 x 1.0 mm, so that it
is resampled to the task's 1 mm grid), then runs `preprocess.py` once for each `--jobs` value in a
fresh process and reports the peak resident memory of the parent process and of the largest worker
(exact peaks from the kernel), and the largest sum over the process tree seen by sampling /proc
every 20 ms. Each peak is also given as a multiple of the largest case's float32 image, the unit of the
bound stated in the README.

Training: trains the tiny network for `--epochs` epochs of `--train_batches` steps on 8 of the
small cases and prints the resident memory after each epoch, and the change from epoch 2 to the
last (`--epochs 0` skips it).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import run_measured  # noqa: E402
from utils.args import Formatter, non_negative_int, positive_int  # noqa: E402

MIB = 2**20
BIG_SPACING = (0.8, 0.8, 1.0)  # (sx, sy, sz) mm: resampled in-plane to the small cases' 1 mm
# Runs preprocess.py and prints its own peak RSS (VmHWM; getrusage's figure for the process itself also counts
# memory of the workers it spawned, measured here at 2 GB for a parent that never held more than 0.25 GB) and its
# largest child's (getrusage), in KiB, as one JSON line (on a line of its own: stderr shares the pipe).
MEASURED_RUN = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import preprocess
code = preprocess.main(sys.argv[2:])
with open("/proc/self/status") as handle:
    own = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print("\\nPEAK " + json.dumps({"code": code, "parent_kb": own, "worker_kb": children}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Formatter)
    parser.add_argument("--cases", type=positive_int, default=200, help="small training cases")
    parser.add_argument("--size", type=positive_int, default=64, help="edge of a small case in voxels (about)")
    parser.add_argument("--big", type=positive_int, nargs=3, default=[512, 512, 600],
                        help="shape (X Y Z) of the one large case")
    parser.add_argument("--jobs", type=positive_int, nargs="+", default=[1, 2], help="preprocess.py --n_jobs values")
    parser.add_argument("--epochs", type=non_negative_int, default=10, help="training epochs (0: no training)")
    parser.add_argument("--train_batches", type=positive_int, default=4, help="training steps per epoch")
    parser.add_argument("--workdir", default=None,
                        help="folder for the data, created if missing (default: a temporary folder)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# The raw task
# ---------------------------------------------------------------------------------------------
def body_and_lesion(shape: tuple[int, ...], centre_shift: float) -> tuple[np.ndarray, np.ndarray]:
    """A smooth image (an ellipsoid body with a brighter sphere; zero outside) and its label (X, Y, Z)."""
    # float32 coordinates: the large case's temporaries stay at 4 bytes per voxel.
    grid = [np.arange(n, dtype=np.float32).reshape([-1 if a == i else 1 for a in range(len(shape))])
            for i, n in enumerate(shape)]
    radius = sum(((axis - np.float32((0.5 + centre_shift) * n)) / np.float32(0.45 * n)) ** 2
                 for axis, n in zip(grid, shape))
    image = np.where(radius < 1.0, np.float32(100.0) + np.float32(20.0) * radius, np.float32(0.0))
    del radius
    lesion = sum(((axis - np.float32((0.5 + centre_shift) * n)) / np.float32(0.15 * n)) ** 2
                 for axis, n in zip(grid, shape)) < 1.0
    image[lesion] = 180.0
    return image, lesion.astype(np.uint8)


def write_task(root: Path, cases: int, size: int, big: list[int]) -> Path:
    """`cases` small cases and one large one, as an MSD task folder `root/Task77_Memory`."""
    import nibabel as nib

    task = root / "Task77_Memory"
    for sub in ("imagesTr", "labelsTr"):
        (task / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    shapes = [(size + int(rng.integers(-size // 8, size // 8 + 1)),) * 2 + (size,) for _ in range(cases)]
    for index, shape in enumerate([*shapes, tuple(big)]):
        large = index == len(shapes)
        name = "large" if large else f"case_{index:03d}"
        image, label = body_and_lesion(shape, centre_shift=0.0 if large else rng.uniform(-0.05, 0.05))
        affine = np.diag([*(BIG_SPACING if large else (1.0, 1.0, 1.0)), 1.0])
        nib.save(nib.Nifti1Image(image, affine), str(task / "imagesTr" / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(task / "labelsTr" / f"{name}.nii.gz"))
        entries.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
        del image, label
    dataset = {"name": "Memory", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "lesion"},
               "numTraining": len(entries), "training": entries, "test": []}
    (task / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return task


# ---------------------------------------------------------------------------------------------
# Measuring a process tree
# ---------------------------------------------------------------------------------------------
def measure_preprocess(task_parent: Path, results: Path, jobs: int) -> dict:
    """Run preprocess.py with --n_jobs `jobs` in a fresh process; peaks in bytes and the wall time in s."""
    command = [sys.executable, "-c", MEASURED_RUN, str(ROOT), "--task", "77", "--dim", "3", "--data",
               str(task_parent), "--results", str(results), "--n_jobs", str(jobs)]
    run = run_measured(command, cwd=str(ROOT))
    lines = run.output.strip().splitlines()
    peaks = [json.loads(line[len("PEAK "):]) for line in lines if line.startswith("PEAK ")]
    if run.returncode != 0 or not peaks or peaks[0]["code"] != 0:
        raise RuntimeError(f"preprocess.py --n_jobs {jobs} failed: {lines[-1] if lines else 'no output'}")
    kib = 1024  # ru_maxrss is in KiB on Linux
    return {"jobs": jobs, "parent": peaks[0]["parent_kb"] * kib, "worker": peaks[0]["worker_kb"] * kib if jobs > 1
            else 0, "tree": run.peak_rss, "seconds": run.seconds}


# ---------------------------------------------------------------------------------------------
# Training across epochs
# ---------------------------------------------------------------------------------------------
def current_rss() -> int:
    """Resident bytes of this process, after glibc has handed its free arenas back to the system where it can, so
    that the figure follows live memory rather than what the allocator keeps cached (which varied by 100 MiB from
    one epoch to the next)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_training(data: Path, results: Path, epochs: int, train_batches: int) -> list[int]:
    """Resident bytes of this process after each of `epochs` tiny training epochs on `data`."""
    import pytorch_lightning as pl

    import main
    from data_preprocessing.plans import read_config

    after_epoch: list[int] = []

    class Resident(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            after_epoch.append(current_rss())

    levels = len(read_config(data)["network"]["strides"])
    filters = [str(min(8 * 2**level, 128)) for level in range(levels)]  # a small network of the plan's depth
    code = main.main(["--exec_mode", "train", "--data", str(data), "--results", str(results), "--nfolds", "4",
                      "--epochs", str(epochs), "--train_batches", str(train_batches), "--num_workers", "2",
                      "--seed", "0", "--batch_size", "2", "--filters", *filters], callbacks=[Resident()])
    if code != 0:
        raise RuntimeError("training for the memory benchmark failed")
    return after_epoch


def training_subset(preprocessed: Path, folder: Path, cases: int = 8) -> Path:
    """A task folder with the config and the first `cases` small cases of `preprocessed` (links, no copies)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_bytes((preprocessed / "config.json").read_bytes())
    for image in sorted(preprocessed.glob("case_*_x.npy"))[:cases]:  # the small cases only
        for suffix in ("_x.npy", "_y.npy", "_meta.json"):
            source = preprocessed / image.name.replace("_x.npy", suffix)
            (folder / source.name).symlink_to(source)
    return folder


# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.workdir is not None:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)  # a named --workdir is created, as the help says
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_task(root / "raw", args.cases, args.size, args.big)
        print(f"raw task: {args.cases} cases of about {args.size}^3 and one of {args.big} voxels "
              f"({time.perf_counter() - start:.0f} s to write)")
        largest = math.prod(args.big) * 4
        resampled = math.prod(round(n * s) for n, s in zip(args.big, BIG_SPACING)) * 4
        print(f"largest case: float32 image {largest / MIB:.0f} MiB as loaded, {resampled / MIB:.0f} MiB resampled "
              f"to 1 mm; label uint8 {largest / 4 / MIB:.0f} MiB")
        print(f"{'n_jobs':>6} {'parent MiB':>11} {'worker MiB':>11} {'tree MiB':>9} {'parent/case':>12} "
              f"{'worker/case':>12} {'time s':>7}")
        report: dict = {"largest_case_bytes": largest, "preprocess": [], "training": []}
        for jobs in args.jobs:
            peaks = measure_preprocess(root / "raw", root / f"out_{jobs}", jobs)
            report["preprocess"].append(peaks)
            print(f"{jobs:>6} {peaks['parent'] / MIB:>11.0f} {peaks['worker'] / MIB:>11.0f} "
                  f"{peaks['tree'] / MIB:>9.0f} {peaks['parent'] / largest:>12.1f} "
                  f"{peaks['worker'] / largest:>12.1f} {peaks['seconds']:>7.0f}")
        if args.epochs:
            data = training_subset(root / f"out_{args.jobs[0]}" / "77_3d", root / "train_subset")
            rss = measure_training(data, root / "training", args.epochs, args.train_batches)
            report["training"] = rss
            print("resident MiB after each training epoch: " + " ".join(f"{r / MIB:.0f}" for r in rss))
            if len(rss) >= 3:
                change = rss[-1] - rss[1]
                print(f"epoch 2 -> epoch {len(rss)}: {change / MIB:+.1f} MiB ({100 * change / rss[1]:+.1f} %)")
    return report


if __name__ == "__main__":
    main()
