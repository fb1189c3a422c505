"""Predict with a trained checkpoint; any other main.py flag passes through.

    python scripts/inference.py --data /data/01_3d --ckpt_path /results/checkpoints/best.ckpt --tta --save_preds
    python scripts/inference.py --data /data/01_3d/val --fold 0 --ckpt_path ... --save_preds   # fold 0's cases

--data is a preprocessed task (its test/ folder is predicted) or one of its val/ or test/ folders.
Predictions go to RESULTS/predictions as NIfTI on the source images' grid.
The command is printed, then run as an argument list.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.args import non_negative_int  # noqa: E402
from utils.launch import run_printed  # noqa: E402


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="preprocessed task folder or its val/ or test/ folder")
    parser.add_argument("--ckpt_path", required=True, help="checkpoint to predict with")
    parser.add_argument("--results", default="/results", help="predictions go to RESULTS/predictions")
    parser.add_argument("--fold", type=non_negative_int, default=None,
                        help="fold whose cases a val/ folder gives; with a task folder, predict its validation cases")
    parser.add_argument("--gpus", type=non_negative_int, default=1, help="GPUs (0: the CPU)")
    parser.add_argument("--amp", action="store_true", help="mixed precision")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation over all flips")
    parser.add_argument("--save_preds", action="store_true", help="write the predictions as NIfTI")
    return parser


def build_command(args: argparse.Namespace, extra: list[str]) -> list[str]:
    command = [sys.executable, str(ROOT / "main.py"), "--exec_mode", "predict", "--data", args.data,
               "--ckpt_path", args.ckpt_path, "--results", args.results,
               "--gpus", str(args.gpus), "--val_batch_size", "4"]
    if args.fold is not None:
        command += ["--fold", str(args.fold)]
    command += [flag for flag, on in (("--amp", args.amp), ("--tta", args.tta), ("--save_preds", args.save_preds))
                if on]
    return command + extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parser().parse_known_args(argv)
    command = build_command(args, extra)
    return run_printed(command)


if __name__ == "__main__":
    sys.exit(main())
