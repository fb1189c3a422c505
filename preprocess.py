"""Preprocess a raw task: `python preprocess.py --task 01 --dim 3 --data /data --results /data`."""

import sys

from data_preprocessing.preprocessor import describe, preprocess_task
from utils.args import preprocess_parser
from utils.errors import UserError


def main(argv: list[str] | None = None) -> int:
    args = preprocess_parser().parse_args(argv)
    try:
        summary = preprocess_task(args.data, args.results, args.task, args.dim, args.exec_mode, args.n_jobs,
                                  args.overwrite, plan=args.plan, kits_recipe=args.kits_recipe,
                                  planner_name=args.planner)
    except UserError as error:  # bad input data, or an output that cannot be written
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(describe(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
