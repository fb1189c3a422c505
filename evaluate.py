"""Score NIfTI predictions against labels: `python evaluate.py --preds DIR --lbls DIR [--hd95]`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from nnunet.evaluation import EvaluationError, run_evaluation
from utils.args import evaluate_parser


def main(argv: Sequence[str] | None = None) -> int:
    args = evaluate_parser().parse_args(argv)
    try:
        run_evaluation(args)
    except EvaluationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
