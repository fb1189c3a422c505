"""Throughput and latency of training, prediction or the training loader.

    python scripts/benchmark.py --mode train --gpus 1 --dim 3 --batch_size 2 --amp     # /data/01_3d, as the reference
    python scripts/benchmark.py --mode predict --gpus 1 --dim 3 --batch_size 4 --task 05 --data /data
    python scripts/benchmark.py --mode loader --dim 3 --batch_size 2 --data /data/01_3d --num_workers 8

train, predict: runs `main.py --benchmark` (printed first, then run as an argument list): --warmup untimed
steps, then --train_batches (train) or --test_batches (predict) timed ones. As in NVIDIA's reference, the
warmup is by default as long as the timing: a warmup epoch, or a warmup pass over the batches. As in the
reference, --data is the data root (default /data) and --task the task in it (default 01): DATA/NN_<dim>d is
benchmarked, or, when no such folder exists, random volumes with MSD task NN's plan (the first line says which).
--data may also be one preprocessed task folder.
loader: patches (2D: slices) per second of the training loader of --data, with its augmentations, and the
batch latency; --train_batches timed batches after --warmup.
Each mode prints images/s and latency mean and percentiles, and writes them to RESULTS/perf.json.
Every other main.py flag (python main.py --help) is passed on with the same meaning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.args import loader_settings, non_negative_int, parse_main_args, positive_int  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.launch import run_printed  # noqa: E402

MODES = ("train", "predict", "loader")
# NVIDIA's reference times 150 batches by default.
DEFAULT_BATCHES = 150


def benchmark_parser() -> argparse.ArgumentParser:
    """This script's own flags; the rest of the command line goes to main.py's parser."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # an abbreviation could swallow a main.py flag
    parser.add_argument("--mode", choices=MODES, required=True, help="what to time")
    parser.add_argument("--train_batches", type=positive_int, default=DEFAULT_BATCHES,
                        help=f"timed training steps (train) or loader batches (loader); default {DEFAULT_BATCHES}")
    parser.add_argument("--test_batches", type=positive_int, default=DEFAULT_BATCHES,
                        help=f"timed prediction steps (predict); default {DEFAULT_BATCHES}")
    parser.add_argument("--warmup", type=non_negative_int, default=None,
                        help="untimed steps first (default: as many as the timed ones)")
    parser.add_argument("--task", default="01", help="task in the data root --data, or the MSD plan of random "
                                                     "volumes when DATA/<task>_<dim>d does not exist; default 01")
    return parser


def timed_flags(args: argparse.Namespace) -> list[str]:
    """--warmup and the timed batch count of the mode, as main.py flags."""
    timed = args.test_batches if args.mode == "predict" else args.train_batches
    warmup = timed if args.warmup is None else args.warmup
    flag = "--test_batches" if args.mode == "predict" else "--train_batches"
    return [flag, str(timed), "--warmup", str(warmup), "--task", args.task]


def build_command(args: argparse.Namespace, main_flags: list[str]) -> list[str]:
    """The main.py command of a train or predict benchmark."""
    return [sys.executable, str(ROOT / "main.py"), "--benchmark", "--exec_mode", args.mode, *timed_flags(args),
            *main_flags]


def main(argv: list[str] | None = None) -> int:
    args, main_flags = benchmark_parser().parse_known_args(argv)
    if args.mode == "loader":
        main_args = parse_main_args([*main_flags, *timed_flags(args)])
        from nnunet.benchmark import benchmark_loader  # torch and DALI: only in the mode that uses them
        from nnunet.trainer import default_gpus

        if main_args.gpus is None:
            main_args.gpus = default_gpus()

        try:
            benchmark_loader(loader_settings(main_args, "train"), main_args.warmup, main_args.train_batches,
                             main_args.results, main_args.logname)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        return 0
    parse_main_args(build_command(args, main_flags)[2:])  # a wrong flag fails here, before main.py starts
    command = build_command(args, main_flags)
    return run_printed(command)


if __name__ == "__main__":
    sys.exit(main())
