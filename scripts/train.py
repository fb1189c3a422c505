"""Train with the recommended settings for a dimension; any other main.py flag passes through.

    python scripts/train.py --data /data/01_3d --results /results --gpus 1 --fold 0 --dim 3 --amp
    python scripts/train.py --data /data/01_2d --results /results --gpus 8 --dim 2 --epochs 300

3D: batch 2 patches, deep supervision. 2D: batch 64 slices drawn from 16 volumes.
The command is printed, then run as an argument list.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.args import non_negative_int  # noqa: E402

RECOMMENDED = {
    3: ["--batch_size", "2", "--val_batch_size", "4", "--deep_supervision"],
    2: ["--batch_size", "64", "--nvol", "16", "--val_batch_size", "64", "--deep_supervision"],
}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="preprocessed task folder, e.g. /data/01_3d")
    parser.add_argument("--results", default="/results", help="folder for checkpoints and logs")
    parser.add_argument("--gpus", type=non_negative_int, default=1, help="GPUs (0: the CPU)")
    parser.add_argument("--fold", type=non_negative_int, default=0, help="validation fold")
    parser.add_argument("--dim", type=int, choices=[2, 3], default=3, help="2D or 3D network")
    parser.add_argument("--amp", action="store_true", help="mixed precision")
    parser.add_argument("--logname", default="logs.json", help="name of the log file in --results")
    return parser


def build_command(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The main.py command: our flags, the recommended ones, then the user's (which win when repeated)."""
    command = [sys.executable, str(ROOT / "main.py"), "--exec_mode", "train", "--data", args.data,
               "--results", args.results, "--gpus", str(args.gpus), "--fold", str(args.fold), "--dim", str(args.dim),
               "--logname", args.logname, "--save_ckpt", *RECOMMENDED[args.dim]]
    if args.amp:
        command.append("--amp")
    return command + extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parser().parse_known_args(argv)
    command = build_command(args, extra)
    print(" ".join(command), flush=True)
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
