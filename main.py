"""Train, evaluate, predict or benchmark: `python main.py --exec_mode train --data /data/01_3d --results /results`."""

import signal
import sys

from pytorch_lightning.utilities.exceptions import SIGTERMException

from nnunet.preemption import Preempted
from nnunet.run import run
from utils.args import parse_main_args
from utils.errors import UserError


def main(argv: list[str] | None = None) -> int:
    args = parse_main_args(argv)
    try:
        run(args)
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
