"""Train with the recommended settings for a dimension, or a reference recipe; any other main.py flag passes through.

    python scripts/train.py --gpus 1 --fold 0 --dim 3 --amp                # /data/01_3d, as the reference
    python scripts/train.py --task 05 --results /results --gpus 8 --dim 2 --epochs 300   # /data/05_2d
    python scripts/train.py --data /data/kits19_3d --results /results --gpus 1 --recipe mlperf

--data is the data root and --task the preprocessed task in it (DATA/<task>_<dim>d), or --data is one
preprocessed task folder (then --task is not used).

3D: batch 2 patches, deep supervision. 2D: batch 64 slices drawn from 16 volumes.
--recipe mlperf: the MLPerf UNet3D reference on KiTS19 (preprocess with --task kits19; its fixed
evaluation split is fold 0): SGD with momentum 0.9, learning rate warmed up linearly from 1e-4 to 0.8
over 200 epochs then constant, no weight decay, batch 2 of 128^3 patches, foreground oversampling 0.4,
ReLU, no deep supervision; evaluation every 20 epochs from epoch 1000 by 128^3 windows with overlap 0.5
and gaussian weighting; up to 4000 epochs, stopping at a mean Dice of 0.908; its log line.
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

RECOMMENDED = {
    3: ["--batch_size", "2", "--val_batch_size", "4", "--deep_supervision"],
    2: ["--batch_size", "64", "--nvol", "16", "--val_batch_size", "64", "--deep_supervision"],
}
# The MLPerf UNet3D training reference (KiTS19). Its first evaluation is at (1-based) epoch 1000, which
# is 0-based epoch 999: --skip_first_n_eval counts 0-based epochs. Early stopping is left to the quality
# target (--patience above the epochs).
MLPERF = ["--batch_size", "2", "--val_batch_size", "4", "--optimizer", "sgd", "--momentum", "0.9",
          "--learning_rate", "0.8", "--warmup_start_lr", "1e-4", "--lr_warmup_epochs", "200", "--scheduler", "none",
          "--weight_decay", "0", "--oversampling", "0.4", "--negative_slope", "0", "--overlap", "0.5",
          "--blend", "gaussian", "--eval_every", "20", "--skip_first_n_eval", "999", "--epochs", "4000",
          "--patience", "4000", "--quality_threshold", "0.908", "--log_line", "mlperf"]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/data",
                        help="data root holding the preprocessed tasks, or one task folder such as /data/01_3d "
                             "(default: /data)")
    parser.add_argument("--task", default="01", help="task in --data: DATA/<task>_<dim>d (default: 01)")
    parser.add_argument("--results", default="/results", help="folder for checkpoints and logs (default: /results)")
    parser.add_argument("--gpus", type=non_negative_int, default=None,
                        help="GPUs, 0 runs on the CPU (default: 1 with CUDA, else 0)")
    parser.add_argument("--fold", type=non_negative_int, default=0, help="validation fold (default: 0)")
    parser.add_argument("--dim", type=int, choices=[2, 3], default=3, help="2D or 3D network (default: 3)")
    parser.add_argument("--amp", action="store_true", help="mixed precision")
    parser.add_argument("--recipe", choices=["nnunet", "mlperf"], default="nnunet",
                        help="nnunet: the recommended settings of --dim; mlperf: the MLPerf UNet3D reference (3D) "
                             "(default: nnunet)")
    parser.add_argument("--logname", default="logs.json", help="name of the log file in --results (default: logs.json)")
    return parser


def build_command(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The main.py command: our flags, the recommended ones, then the user's (which win when repeated)."""
    command = [sys.executable, str(ROOT / "main.py"), "--exec_mode", "train", "--data", args.data, "--task", args.task,
               "--results", args.results, "--fold", str(args.fold), "--dim", str(args.dim), "--logname", args.logname,
               "--save_ckpt"]
    if args.gpus is not None:
        command += ["--gpus", str(args.gpus)]
    command += MLPERF if args.recipe == "mlperf" else RECOMMENDED[args.dim]
    if args.amp:
        command.append("--amp")
    return command + extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parser().parse_known_args(argv)
    if args.recipe == "mlperf" and args.dim != 3:
        parser().error("--recipe mlperf trains a 3D network: use --dim 3")
    command = build_command(args, extra)
    return run_printed(command)


if __name__ == "__main__":
    sys.exit(main())
