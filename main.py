"""Train, evaluate, predict or benchmark: `python main.py --exec_mode train --data /data/01_3d --results /results`."""

import sys

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
