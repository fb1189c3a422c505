"""This project side by side with its peers, on the same data and cores, in one run.

    python benchmarks/run_all.py --nnunet_python /tmp/nnunet_env/bin/python [--output results.json]

Stages (--stages, all by default), each alternating ours and the peers round by round (--repeats):
  preprocess  preprocess.py against nnU-Net v2's nnUNetv2_plan_and_preprocess (3d_fullres) on a synthetic
              task of --cases cases of about --size^3 voxels, at each --n_jobs: wall time and peak memory
              (resident memory of the command and its worker processes together);
  loader      our DALI training loader against a MONAI dictionary-transform pipeline with the same
              augmentations (benchmarks/loader.py) on our preprocessed synthetic task: patches/s;
  train       training-step time of ours, MONAI's DynUNet in a plain PyTorch loop, nnU-Net v2's trainer;
  predict     sliding-window prediction of one volume: ours, MONAI's sliding_window_inference, nnU-Net v2.
train and predict use the plan of MSD task --task (patch size, spacing; random volumes). A peer that is
not installed is skipped with a note. The table gives, per comparison, the medians and by how much ours
is better (peer time / our time, or our throughput / the peer's): the median over rounds and its range.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import Comparison, format_table  # noqa: E402
from utils.args import Formatter, non_negative_int, overlap_fraction, positive_int  # noqa: E402
from utils.io import save_json  # noqa: E402

STAGES = ("preprocess", "loader", "train", "predict")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Formatter)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="what to compare")
    parser.add_argument("--nnunet_python", default=None,
                        help="Python of a virtual environment with nnunetv2 (default: $NNUNET_PYTHON; "
                             "without it nnU-Net v2 is skipped)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="alternating rounds per comparison")
    parser.add_argument("--scratch", default=None, help="working folder (default: a temporary one, removed)")
    parser.add_argument("--output", default=None, help="also write every measurement to this JSON file")
    synthetic = parser.add_argument_group("preprocess and loader: the synthetic task")
    synthetic.add_argument("--cases", type=positive_int, default=8, help="training cases")
    synthetic.add_argument("--size", type=positive_int, default=96, help="edge of a case in voxels (about)")
    synthetic.add_argument("--n_jobs", type=positive_int, nargs="+", default=[1, 2], help="preprocessing processes")
    synthetic.add_argument("--num_workers", type=positive_int, default=2,
                           help="loader: DALI threads and MONAI worker processes")
    synthetic.add_argument("--loader_batches", type=positive_int, default=20, help="loader: timed batches per round")
    synthetic.add_argument("--loader_warmup", type=non_negative_int, default=3,
                           help="loader: untimed batches per round")
    models = parser.add_argument_group("train and predict: random volumes with an MSD task's plan")
    models.add_argument("--task", default="04", help="MSD task 01-10 whose 3D plan sets patch size and spacing")
    models.add_argument("--filters", type=positive_int, nargs="+", default=None,
                        help="channels per level (default: nnU-Net's 32, 64, 128, ...)")
    models.add_argument("--batch_size", type=positive_int, default=2, help="patches per batch (train, loader)")
    models.add_argument("--steps", type=positive_int, default=5, help="train: timed steps per round")
    models.add_argument("--warmup", type=non_negative_int, default=2, help="train: untimed steps per round")
    models.add_argument("--overlap", type=overlap_fraction, default=0.5, help="predict: window overlap")
    models.add_argument("--amp", action="store_true",
                        help="bf16 autocast for ours (main.py --amp) and MONAI; nnU-Net v2 stays float32 on the CPU")
    models.add_argument("--volume_shape", type=positive_int, nargs=3, default=None,
                        help="predict: volume (D H W) in voxels (default: twice the patch)")
    return parser.parse_args(argv)


def preprocessed_task(scratch: Path, args: argparse.Namespace) -> Path:
    """Our preprocessed synthetic task (made untimed when the preprocess stage did not run)."""
    from benchmarks import preprocessing
    from data_preprocessing.preprocessor import preprocess_task

    folder = scratch / "ours" / "00_3d"
    if not (folder / "config.json").is_file():
        raw = scratch / "raw"
        if not raw.is_dir():
            preprocessing.write_raw_task(raw, args.cases, args.size)
        preprocess_task(raw, scratch / "ours", "00", dim=3)
    return folder


def compare_loaders(scratch: Path, args: argparse.Namespace) -> list[Comparison]:
    """Patches/s of our DALI loader and the MONAI pipeline of benchmarks/loader.py, alternating."""
    from benchmarks import loader

    data = preprocessed_task(scratch, args)
    options = loader.parse_args(["--batch_size", str(args.batch_size), "--num_workers", str(args.num_workers)])
    module = loader.dali_training_loader(options, data, args.loader_warmup + args.loader_batches)
    ours, theirs = module.train_dataloader(), loader.monai_training_loader(options, module)
    comparison = Comparison(f"loader, patch {'x'.join(map(str, module.patch_size))}", "patches/s",
                            "MONAI transforms", higher_is_better=True,
                            note=f"{args.num_workers} DALI threads / MONAI worker processes, batch {args.batch_size}")
    try:
        for _ in range(args.repeats):
            for target, source in ((comparison.ours, ours), (comparison.theirs, theirs)):
                summary = loader.measure(source, args.loader_warmup, args.loader_batches, args.batch_size)
                target.append(summary["throughput"])
    finally:
        module.teardown()
    return [comparison]


def run(args: argparse.Namespace, scratch: Path) -> list[Comparison]:
    from benchmarks import models, preprocessing

    comparisons: list[Comparison] = []
    for stage in (s for s in STAGES if s in args.stages):
        started = time.perf_counter()
        print(f"[{stage}] running ...", flush=True)
        if stage == "preprocess":
            comparisons += preprocessing.compare(scratch, args.cases, args.size, args.n_jobs, args.repeats,
                                                 args.nnunet_python)
        elif stage == "loader":
            comparisons += compare_loaders(scratch, args)
        elif stage == "train":
            comparisons += models.compare_training(scratch, args)
        else:
            comparisons += models.compare_prediction(scratch, args)
        print(f"[{stage}] done in {time.perf_counter() - started:.0f} s", flush=True)
    return comparisons


def main(argv: list[str] | None = None) -> list[Comparison]:
    args = parse_args(argv)
    import torch

    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="nnunet_benchmarks_"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        comparisons = run(args, scratch)
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
               f"torch {torch.__version__}, python {platform.python_version()}")
    print(f"\n{time.strftime('%Y-%m-%d')}, {machine}, {args.repeats} alternating rounds")
    print(format_table(comparisons))
    if args.output:
        save_json(args.output, {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine, "argv": sys.argv[1:],
                                "comparisons": [c.as_dict() for c in comparisons]})
    return comparisons


if __name__ == "__main__":
    main()
