"""What `evaluate.py` prints and writes: the table of per-class Dice (and HD95), the CSV and the JSON.

The scores come from `nnunet.evaluation.evaluate_folder`; `run_evaluation` is the whole command.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nnunet.evaluation import evaluate_folder, join_labels, read_dataset_labels
from utils.io import atomic_open


def format_table(results: Mapping[str, Any]) -> str:
    """A plain-text table per metric: one row per case, one column per class and the case mean, a MEAN row."""
    names = [results["class_names"][str(c)] for c in results["classes"]]
    case_width = max(len("MEAN"), *(len(case["case_id"]) for case in results["cases"]))
    widths = [max(8, len(name)) for name in [*names, "mean"]]
    blocks = []
    for metric, title, digits in (("dice", "Dice", 4), ("hd95", "HD95 (mm)", 2)):
        if metric not in results["mean"]:
            continue
        lines = [title, "  ".join([" " * case_width, *(n.rjust(w) for n, w in zip([*names, "mean"], widths))])]
        rows = [(case["case_id"], list(case[metric].values())) for case in results["cases"]]
        rows.append(("MEAN", list(results["mean"][metric].values())))
        for case_id, values in rows:
            cells = [_format(v, digits).rjust(w) for v, w in zip([*values, float(np.mean(values))], widths)]
            lines.append("  ".join([case_id.ljust(case_width), *cells]))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def results_csv(results: Mapping[str, Any]) -> str:
    """CSV text: `case_id, dice_<c>..., dice_mean[, hd95_<c>..., hd95_mean, hd95_mode]`, one row per case and a
    MEAN row; `hd95_mode` ("max" or "pooled") says how each HD95 combines its two directions."""
    metrics = [m for m in ("dice", "hd95") if m in results["mean"]]
    keys = [str(c) for c in results["classes"]]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    mode = [results["hd95_mode"]] if "hd95" in metrics else []
    header = ["case_id", *(f"{m}_{k}" for m in metrics for k in [*keys, "mean"])]
    writer.writerow(header + (["hd95_mode"] if mode else []))
    rows = [(case["case_id"], case) for case in results["cases"]] + [("MEAN", results["mean"])]
    for case_id, values in rows:
        row: list[Any] = [case_id]
        for metric in metrics:
            per_class = [values[metric][k] for k in keys]
            row += [*per_class, float(np.mean(per_class))]
        writer.writerow(row + mode)
    return buffer.getvalue()


def results_json(results: Mapping[str, Any]) -> str:
    """Strict JSON text of the results; infinite distances become null."""
    return json.dumps(_finite_or_none(results), indent=2, allow_nan=False) + "\n"


def write_results(results: Mapping[str, Any], prefix: str | os.PathLike) -> tuple[Path, Path]:
    """Write `PREFIX.csv` and `PREFIX.json`, each complete or not at all (`utils.io.atomic_open`).

    Returns:
        The CSV and JSON paths.

    Raises:
        WriteError: if a file cannot be written (one line naming it).
    """
    prefix = Path(prefix)
    csv_path, json_path = prefix.with_name(prefix.name + ".csv"), prefix.with_name(prefix.name + ".json")
    for path, text in ((csv_path, results_csv(results)), (json_path, results_json(results))):
        with atomic_open(path, "w") as handle:
            handle.write(text)
    return csv_path, json_path


def run_evaluation(preds: str, lbls: str, hd95: bool = False, hd95_mode: str = "max", output: str | None = None,
                   dataset_json: str | None = None, predicted_only: bool = False) -> dict[str, Any]:
    """What `evaluate.py` does: evaluate, print the table, write the CSV and JSON.

    Args:
        preds, lbls: folders of predicted and label NIfTI files.
        hd95, hd95_mode: also the 95th-percentile Hausdorff distance, and which definition.
        output: path prefix of the CSV and JSON (default: PREDS/evaluation).
        dataset_json: a dataset.json whose "labels" name the classes.
        predicted_only: score only the labels that have a prediction.

    Returns:
        The results of `evaluate_folder`.
    """
    class_names = read_dataset_labels(dataset_json) if dataset_json else None
    results = evaluate_folder(preds, lbls, hd95=hd95, class_names=class_names, predicted_only=predicted_only,
                              hd95_mode=hd95_mode)
    prefix = output if output else os.path.join(preds, "evaluation")
    csv_path, json_path = write_results(results, prefix)
    print(format_table(results))
    print(f"\nmean Dice {results['mean_dice']:.4f}", end="")
    print(f", mean HD95 {_format(results['mean_hd95'], 2)} mm ({results['hd95_definition']})" if hd95 else "")
    if results["prediction_only_labels"]:
        print(f"note: predictions hold label {join_labels(results['prediction_only_labels'])}, which no label file has")
    print(f"wrote {csv_path} and {json_path}")
    return results


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(item) for item in value]
    return value


def _format(value: float, digits: int) -> str:
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"
