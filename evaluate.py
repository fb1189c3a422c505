"""Score NIfTI predictions against labels: `python evaluate.py --preds DIR --lbls DIR [--hd95] [--report]`."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from nnunet.evaluation_output import run_evaluation
from utils.args import evaluate_parser
from utils.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    parser = evaluate_parser()
    args = parser.parse_args(argv)
    if (args.images or args.results) and not args.report:
        parser.error("--images and --results draw into the report: add --report")
    try:
        results = run_evaluation(args.preds, args.lbls, hd95=args.hd95, hd95_mode=args.hd95_mode,
                                 output=args.output, dataset_json=args.dataset_json,
                                 predicted_only=args.predicted_only)
        if args.report:
            from nnunet.report import write_report

            prefix = args.output or os.path.join(args.preds, "evaluation")
            print(f"wrote {write_report(results, prefix + '.html', args.images, args.results)}")
    except UserError as error:  # EvaluationError, WriteError: one line, nothing half-written
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
