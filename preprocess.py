"""Preprocess an MSD-format task: `python preprocess.py --task 01 --dim 3 --data /data --results /data`."""

import sys

from data_preprocessing.preprocessor import PreprocessingError, describe, preprocess_task
from utils.args import preprocess_parser


def main(argv: list[str] | None = None) -> int:
    args = preprocess_parser().parse_args(argv)
    try:
        summary = preprocess_task(args.data, args.results, args.task, args.dim, args.exec_mode, args.n_jobs,
                                  args.overwrite)
    except PreprocessingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(describe(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
