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

Cross-validation: --folds 0 1 2 3 4 (or --folds all: every fold of --nfolds, or of the task's splits.json)
trains the folds one after the other, fold N into RESULTS/fold_N/, then predicts its validation cases with
its best checkpoint into RESULTS/fold_N/validation/predictions/ (labels and probabilities on the source
grid, for scripts/select_model.py) and writes RESULTS/fold_N/done.json last. Run again, it skips the folds
that have done.json and resumes an interrupted one from its checkpoints/last.ckpt.

    python scripts/train.py --task 01 --results /results/01_3d --gpus 1 --dim 3 --folds all
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.args import main_parser, non_negative_int  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.io import save_json  # noqa: E402
from utils.launch import run_printed  # noqa: E402
from utils.task_folders import task_folder  # noqa: E402

DONE = "done.json"
VALIDATION = "validation"
# main.py flags that the prediction of a fold's validation cases takes over from the training command.
PREDICTION_FLAGS = ("nfolds", "num_workers", "accelerator", "val_batch_size", "overlap", "blend", "tta")

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
    parser.add_argument("--folds", nargs="+", default=None, metavar="K",
                        help="train these folds (or 'all') one after the other into RESULTS/fold_K/, each followed "
                             "by the prediction of its validation cases; finished folds are skipped")
    return parser


def sweep_folds(folds: list[str], data: str, nfolds: int) -> list[int]:
    """The fold numbers of --folds: integers, or "all" (each fold of the task's splits.json, else of --nfolds)."""
    if folds == ["all"]:
        splits = Path(data) / "splits.json"
        if splits.is_file():
            return list(range(len(json.loads(splits.read_text()))))
        return list(range(nfolds))
    try:
        numbers = [non_negative_int(fold) for fold in folds]
    except (ValueError, argparse.ArgumentTypeError):
        raise SystemExit(f"error: --folds {' '.join(folds)}: give fold numbers such as 0 1 2 3 4, or all") from None
    return list(dict.fromkeys(numbers))


def prediction_command(args: argparse.Namespace, extra: list[str], fold: int, checkpoint: Path) -> list[str]:
    """The main.py command that writes fold `fold`'s out-of-fold labels and probabilities."""
    given, _ = main_parser().parse_known_args(extra)
    defaults = main_parser().parse_args([])
    command = [sys.executable, str(ROOT / "main.py"), "--exec_mode", "predict", "--data", args.data,
               "--task", args.task, "--dim", str(args.dim), "--fold", str(fold), "--ckpt_path", str(checkpoint),
               "--results", str(Path(args.results) / VALIDATION), "--save_preds", "--save_probs"]
    if args.gpus is not None:
        command += ["--gpus", str(args.gpus)]
    if args.amp:
        command.append("--amp")
    for name in PREDICTION_FLAGS:
        value = getattr(given, name)
        if value != getattr(defaults, name) or name == "val_batch_size":
            command += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return command


def train_folds(args: argparse.Namespace, extra: list[str], runner: Callable[[list[str]], int] = run_printed) -> int:
    """Train, then predict the validation cases of, each fold of --folds that has no done.json yet; `runner`
    runs each main.py command and returns its exit status."""
    nfolds = main_parser().parse_known_args(extra)[0].nfolds
    root = Path(args.results)
    try:
        data = task_folder(args.data, args.task, args.dim)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for fold in sweep_folds(args.folds, str(data), nfolds):
        results = root / f"fold_{fold}"
        if (results / DONE).is_file():
            print(f"fold {fold}: finished ({results / DONE}), skipped", flush=True)
            continue
        resume = (results / "checkpoints" / "last.ckpt").is_file()
        print(f"fold {fold}: {'resuming the training in' if resume else 'training into'} {results}", flush=True)
        fold_args = argparse.Namespace(**{**vars(args), "fold": fold, "results": str(results)})
        status = runner(build_command(fold_args, extra) + (["--resume_training"] if resume else []))
        if status:
            print(f"fold {fold} stopped (exit status {status}); run the same command again to resume it", flush=True)
            return status
        checkpoint = results / "checkpoints" / "best.ckpt"
        if not checkpoint.is_file():  # no evaluation improved on a Dice of 0
            checkpoint = results / "checkpoints" / "last.ckpt"
        status = runner(prediction_command(fold_args, extra, fold, checkpoint))
        if status:
            return status
        predictions = results / VALIDATION / "predictions"
        cases = sorted(path.name[: -len("_probs.npz")] for path in predictions.glob("*_probs.npz"))
        save_json(results / DONE, {"fold": fold, "checkpoint": str(checkpoint.relative_to(results)),
                                   "predictions": str(predictions.relative_to(results)), "cases": cases,
                                   "data": str(data.resolve()),
                                   "finished": datetime.datetime.now().isoformat(timespec="seconds")})
    return 0


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


def main(argv: list[str] | None = None, runner: Callable[[list[str]], int] = run_printed) -> int:
    """Run the training command(s); `runner` runs a main.py command (by default printed, then as a process)."""
    args, extra = parser().parse_known_args(argv)
    if args.recipe == "mlperf" and args.dim != 3:
        parser().error("--recipe mlperf trains a 3D network: use --dim 3")
    if args.folds:
        return train_folds(args, extra, runner)
    return runner(build_command(args, extra))


if __name__ == "__main__":
    sys.exit(main())
