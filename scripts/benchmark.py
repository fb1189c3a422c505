"""Throughput benchmarks.

    python scripts/benchmark.py --mode loader --dim 3 --batch_size 2 --data /data/01_3d [--batches 50] [--num_workers 8]

--mode loader: patches (2D: slices) per second of the training loader, with its augmentations
(without them under --benchmark), after --warmup batches, and the batch latency percentiles.
Every main.py flag is accepted, with the same meaning.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_loading.data_module import DataModule  # noqa: E402
from utils.args import main_parser, positive_int  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.logger import latency_summary  # noqa: E402


def benchmark_parser() -> argparse.ArgumentParser:
    """main.py's parser with the benchmark's own flags."""
    parser = main_parser()
    parser.description = __doc__.split("\n\n")[0]
    own = parser.add_argument_group("benchmark script")
    own.add_argument("--mode", choices=sorted(MODES), required=True, help="what to time")
    own.add_argument("--batches", type=positive_int, default=20, help="timed batches (after --warmup)")
    return parser


def time_batches(loader, warmup: int, batches: int) -> list[float]:
    """Seconds to fetch each of `batches` batches after `warmup` untimed ones."""
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        next(iterator)
        times.append(time.perf_counter() - start)
    return times


def benchmark_loader(args: argparse.Namespace) -> dict[str, float]:
    """Patches/s and latency (ms) of the training loader of --data, fold --fold."""
    args.exec_mode = "train"
    args.train_batches = args.warmup + args.batches
    module = DataModule(args)
    module.setup("fit")
    summary = latency_summary(time_batches(module.train_dataloader(), args.warmup, args.batches), args.batch_size)
    module.teardown()
    summary = {"mode": "loader", "dim": module.dim, "patch_size": module.patch_size, "batch_size": args.batch_size,
               "num_workers": args.num_workers, "device": module.device.kind, **summary}
    print(f"loader ({module.device.kind}, {args.num_workers} threads, {module.dim}D patch {module.patch_size}, "
          f"batch {args.batch_size}): {summary['throughput']:.2f} patches/s, latency mean "
          f"{summary['latency_mean']:.1f} ms, p90 {summary['latency_90']:.1f} ms, p99 {summary['latency_99']:.1f} ms")
    print(json.dumps(summary))
    return summary


MODES: dict[str, Callable[[argparse.Namespace], dict]] = {"loader": benchmark_loader}


def main(argv: list[str] | None = None) -> int:
    args = benchmark_parser().parse_args(argv)
    try:
        MODES[args.mode](args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
