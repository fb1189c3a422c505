"""Fetch a Medical Segmentation Decathlon task, or write the synthetic task 00 offline.

    python download.py --task 09 --data /data            # -> /data/Task09_Spleen
    python download.py --task 00 --data /data            # -> /data/Task00_Synthetic, no network
    python download.py --task 04 --data /data --mirror http://mirror.local/msd --keep
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from data_preprocessing.fetch import obtain_task
from utils.args import download_parser
from utils.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    args = download_parser().parse_args(argv)
    try:
        task_dir = obtain_task(args.task, args.data, keep=args.keep, mirror=args.mirror, seed=args.seed,
                               n_cases=args.n_cases, n_test=args.n_test, size=args.size)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # e.g. no permission to write into --data
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"Task ready in {task_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
