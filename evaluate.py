"""Score NIfTI predictions against labels: `python evaluate.py --preds DIR --lbls DIR [--hd95]`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from nnunet.evaluation import run_evaluation
from utils.args import evaluate_parser
from utils.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    args = evaluate_parser().parse_args(argv)
    try:
        run_evaluation(args.preds, args.lbls, hd95=args.hd95, hd95_mode=args.hd95_mode, output=args.output,
                       dataset_json=args.dataset_json, predicted_only=args.predicted_only)
    except UserError as error:  # EvaluationError, WriteError: one line, nothing half-written
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
