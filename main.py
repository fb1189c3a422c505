"""Train, evaluate, predict or benchmark: `python main.py --exec_mode train --data /data/01_3d --results /results`."""

import logging
import signal
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException

from data_preprocessing.plans import read_config
from nnunet.nn_unet import PREDICTIONS, model_settings
from nnunet.predictor import predict_package
from nnunet.preemption import Preempted
from nnunet.run import CHECKPOINTS, evaluate, predict, train
from nnunet.trainer import default_gpus
from utils import args as cli
from utils.args import parse_main_args
from utils.errors import UserError
from utils.io import removing_new_empty_folders


def quiet_lightning() -> None:
    """Keep Lightning's warnings but not its informational lines (device availability, tips): the run prints
    its own summary. A deprecation inside Lightning's own code is not actionable here either."""
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def run(args, callbacks: list[pl.Callback] | None = None) -> None:
    """The mode the arguments ask for, each given the settings it needs; a run that fails leaves none of the
    results folders it created empty."""
    cli.check_package_flags(args)
    cli.check_dicom_flags(args)
    device, inference, flags = cli.device_settings(args), cli.inference_settings(args), cli.model_flags(args)
    loader = cli.loader_settings(args)
    results = Path(args.results)
    with removing_new_empty_folders(results / CHECKPOINTS, results / PREDICTIONS):
        if args.benchmark:
            from nnunet.benchmark import benchmark  # DALI, as in run.py, only where preprocessed data is read

            benchmark(cli.benchmark_settings(args), loader, device, flags, cli.optim_settings(args), callbacks)
        elif args.exec_mode == "train":
            config = read_config(loader.data)
            model = model_settings(config, args.dim, flags, cli.targets(args), args.focal)
            train(loader, model, cli.optim_settings(args), inference, device, cli.training_settings(args), callbacks)
        elif args.exec_mode == "evaluate":
            evaluate(loader, args.ckpt_path, flags, inference, device, callbacks)
        elif args.model:
            predict_package(args.model, args.input, args.folds, inference, device, args.save_uncertainty)
        else:
            predict(loader, args.ckpt_path, flags, inference, device, args.input, callbacks)


def main(argv: list[str] | None = None, callbacks: list | None = None) -> int:
    """Run main.py with `argv`; `callbacks` are extra Lightning callbacks (tests and benchmarks add theirs)."""
    args = parse_main_args(argv)
    if args.gpus is None:
        args.gpus = default_gpus()
    quiet_lightning()
    try:
        run(args, callbacks)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Preempted as stop:  # SIGTERM or SIGINT: a checkpoint was saved; 128 + the signal number, as shells do
        print(stop, file=sys.stderr)
        return stop.exit_code
    except SIGTERMException:  # Lightning's stop on SIGTERM in evaluation or prediction: not a success
        print(f"error: stopped by SIGTERM before the end of --exec_mode {args.exec_mode}; outputs written so far "
              f"are complete", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
