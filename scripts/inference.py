"""Predict with a trained checkpoint; any other main.py flag passes through.

    python scripts/inference.py --dim 3 --fold 0 --ckpt_path /results/checkpoints/best.ckpt --tta --save_preds
    python scripts/inference.py --data /data/01_3d/val --fold 0 --ckpt_path ... --save_preds   # fold 0's cases

--data is the data root with --task (DATA/<task>_<dim>d, whose test/ folder is predicted), a preprocessed task
folder, or one of its val/ or test/ folders.
Predictions go to RESULTS/predictions as NIfTI on the source images' grid; the last line names the folder.
The command is printed, then run as an argument list.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.args import non_negative_int, positive_int  # noqa: E402
from utils.launch import run_printed  # noqa: E402


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/data",
                        help="data root, a preprocessed task folder, or its val/ or test/ folder (default: /data)")
    parser.add_argument("--task", default="01", help="task in a data root: DATA/<task>_<dim>d (default: 01)")
    parser.add_argument("--dim", type=int, choices=[2, 3], default=None,
                        help="2D or 3D: the task folder DATA/<task>_<dim>d and the network (default: the "
                             "checkpoint's network; the 3D folder)")
    parser.add_argument("--ckpt_path", required=True, help="checkpoint to predict with")
    parser.add_argument("--results", default="/results",
                        help="predictions go to RESULTS/predictions (default: /results)")
    parser.add_argument("--fold", type=non_negative_int, default=None,
                        help="fold whose cases a val/ folder gives; with a task folder, predict its validation cases")
    parser.add_argument("--batch_size", type=positive_int, default=4,
                        help="patches per forward pass, main.py's --val_batch_size (default: 4)")
    parser.add_argument("--gpus", type=non_negative_int, default=None,
                        help="GPUs, 0 runs on the CPU (default: 1 with CUDA, else 0)")
    parser.add_argument("--amp", action="store_true", help="mixed precision")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation over all flips")
    parser.add_argument("--save_preds", action="store_true", help="write the predictions as NIfTI")
    return parser


def build_command(args: argparse.Namespace, extra: list[str]) -> list[str]:
    command = [sys.executable, str(ROOT / "main.py"), "--exec_mode", "predict", "--data", args.data,
               "--task", args.task, "--ckpt_path", args.ckpt_path, "--results", args.results,
               "--val_batch_size", str(args.batch_size)]
    command += [] if args.fold is None else ["--fold", str(args.fold)]
    command += [] if args.gpus is None else ["--gpus", str(args.gpus)]
    command += [] if args.dim is None else ["--dim", str(args.dim)]
    command += [flag for flag, on in (("--amp", args.amp), ("--tta", args.tta), ("--save_preds", args.save_preds))
                if on]
    return command + extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parser().parse_known_args(argv)
    command = build_command(args, extra)
    return run_printed(command)


if __name__ == "__main__":
    sys.exit(main())
