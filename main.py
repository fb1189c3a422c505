"""Train, evaluate, predict or benchmark: `python main.py --exec_mode train --data /data/01_3d --results /results`."""

import logging
import signal
import sys
import warnings

from pytorch_lightning.utilities.exceptions import SIGTERMException

from nnunet.preemption import Preempted
from nnunet.run import run
from utils.args import parse_main_args
from utils.errors import UserError


def quiet_lightning() -> None:
    """Keep Lightning's warnings but not its informational lines (device availability, tips): the run prints
    its own summary. A deprecation inside Lightning's own code is not actionable here either."""
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def main(argv: list[str] | None = None, callbacks: list | None = None) -> int:
    """Run main.py with `argv`; `callbacks` are extra Lightning callbacks (tests and benchmarks add theirs)."""
    args = parse_main_args(argv)
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
