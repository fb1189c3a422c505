"""Export the networks of a model package to ONNX, one file per fold, with a JSON description of their inputs.

    python scripts/export.py --model /results/package --onnx /results/onnx/brain.onnx
    python scripts/export.py --model /results/package --onnx brain.onnx --folds 0 --opset 18

writes brain_<configuration>_fold<k>.onnx and brain.json (channels, spacing, patch size, normalisation, stride
divisor, outputs and activation of each network). The networks take preprocessed patches and return logits;
preprocessing, sliding windows, activation and the way back to the source grid are the caller's (README).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nnunet.onnx_export import DEFAULT_OPSET, export_package  # noqa: E402
from utils.args import non_negative_int, positive_int  # noqa: E402
from utils.errors import UserError  # noqa: E402


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the model package folder")
    parser.add_argument("--onnx", required=True,
                        help="OUT.onnx: the files are OUT_<configuration>_fold<k>.onnx, described in OUT.json")
    parser.add_argument("--folds", type=non_negative_int, nargs="+", default=None,
                        help="export these folds only (default: every fold of the package)")
    parser.add_argument("--opset", type=positive_int, default=DEFAULT_OPSET, help="ONNX opset version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        written = export_package(args.model, args.onnx, args.folds, args.opset)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
