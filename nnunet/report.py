"""A self-contained HTML page of an evaluation: `evaluate.py --report`.

One file, readable offline: the per-case table (sortable by a few lines of inline JavaScript), the distributions
of Dice (and HD95) per class, the best, median and worst cases as overlays and, from a training results folder,
the learning curves. Every picture is a PNG in a data URI; nothing is fetched from anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nnunet.callbacks import plot_learning_curves
from nnunet.evaluation import EvaluationError, find_cases
from nnunet.overlay import class_colour, overlay_figure
from utils.io import atomic_open

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #eee; cursor: pointer; user-select: none; }
td:first-child, th:first-child { text-align: left; }
tr.mean td { font-weight: bold; background: #f6f6f6; }
img { max-width: 100%; }
.note { color: #666; font-size: 0.9em; }
"""

# Click a header to sort by that column; click again to reverse. The MEAN row stays last.
SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach((th, column) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0];
  const up = th.dataset.order !== "up";
  th.dataset.order = up ? "up" : "down";
  const key = row => { const t = row.cells[column].textContent; const n = parseFloat(t);
                       return isNaN(n) ? (t === "inf" ? Infinity : t) : n; };
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
                                  return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1); })
    .forEach(row => body.appendChild(row));
}));
"""


def png_uri(data: bytes) -> str:
    """PNG bytes as a data URI."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure_png(figure: Figure, dpi: int = 80) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def distribution_figure(results: Mapping[str, Any], metric: str) -> Figure:
    """Box plots of one metric ("dice" or "hd95") per class, every case drawn as a dot."""
    keys = [str(c) for c in results["classes"]]
    names = [results["class_names"][key] for key in keys]
    values = [[case[metric][key] for case in results["cases"]] for key in keys]
    values = [[v for v in column if math.isfinite(v)] for column in values]
    figure = Figure(figsize=(1.6 * len(keys) + 2, 3.2))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.boxplot(values, showfliers=False)
    jitter = np.random.default_rng(0)
    for position, (column, key) in enumerate(zip(values, keys), start=1):
        axes.scatter(position + jitter.uniform(-0.12, 0.12, len(column)), column, s=12, alpha=0.8,
                     color=class_colour(int(key), len(keys)))
    axes.set_xticks(range(1, len(keys) + 1), names)
    axes.set_ylabel("Dice" if metric == "dice" else "HD95 (mm)")
    if metric == "dice":
        axes.set_ylim(-0.02, 1.02)
    figure.tight_layout()
    return figure


def ranked_cases(results: Mapping[str, Any]) -> list[tuple[str, str, float]]:
    """(role, case_id, mean Dice) of the best, median and worst case by mean Dice (fewer with fewer cases)."""
    scored = sorted(((float(np.mean(list(case["dice"].values()))), case["case_id"]) for case in results["cases"]),
                    reverse=True)
    picks = {"best": 0, "median": len(scored) // 2, "worst": len(scored) - 1}
    seen, chosen = set(), []
    for role, index in picks.items():
        if index not in seen:
            seen.add(index)
            chosen.append((role, scored[index][1], scored[index][0]))
    return chosen


def find_image(images_dir: Path, case_id: str) -> Path | None:
    """The image of a case: `<case>.nii.gz` (4D: the first channel is shown) or `<case>_0000.nii.gz`."""
    for name in (case_id, f"{case_id}_0000"):
        for suffix in (".nii.gz", ".nii"):
            if (images_dir / f"{name}{suffix}").is_file():
                return images_dir / f"{name}{suffix}"
    return None


def slice_first(volume: np.ndarray) -> np.ndarray:
    """A NIfTI array (X, Y, Z) as (Z, Y, X), so that the first planes drawn are axial."""
    return np.ascontiguousarray(np.transpose(volume, (2, 1, 0)))


def case_overlay(results: Mapping[str, Any], case_id: str, title: str, images_dir: Path | None) -> bytes:
    """PNG of a case's label beside its prediction, over its image when `images_dir` has it."""
    prediction_image = nib.load(str(find_cases(results["preds"], "prediction")[case_id]))
    prediction = slice_first(np.asanyarray(prediction_image.dataobj).astype(np.int16))
    label = slice_first(np.asanyarray(nib.load(str(find_cases(results["labels"], "label")[case_id])).dataobj)
                        .astype(np.int16))
    spacing = list(prediction_image.header.get_zooms()[:3])[::-1]
    image = np.zeros(label.shape, np.float32)
    source = find_image(images_dir, case_id) if images_dir is not None else None
    if source is not None:
        data = np.asanyarray(nib.load(str(source)).dataobj).astype(np.float32)
        data = data[..., 0] if data.ndim == 4 else data
        if data.shape[:3] != prediction.shape[::-1]:
            raise EvaluationError(f"{case_id}: image {source} of shape {data.shape[:3]} does not match the "
                                  f"prediction's {prediction.shape[::-1]}; pass the images the predictions came from")
        image = slice_first(data)
    names = [results["class_names"][str(c)] for c in results["classes"]]
    keep = np.isin(prediction, results["classes"])  # values outside the classes (no column) are not drawn
    figure = overlay_figure(image, np.where(keep, prediction, 0), label, class_names=names, title=title,
                            spacing=spacing)
    return figure_png(figure, dpi=70)


def learning_curves_png(training_results: Path) -> bytes:
    """The learning curves of a training results folder's logs.json, as PNG bytes."""
    log = training_results / "logs.json"
    if not log.is_file():
        raise EvaluationError(f"--results {training_results}: no logs.json there; pass a training results folder")
    with tempfile.TemporaryDirectory() as folder:
        png = Path(folder) / "curves.png"
        plot_learning_curves(log, png)
        if not png.is_file():
            raise EvaluationError(f"--results {training_results}: logs.json holds no epoch yet")
        return png.read_bytes()


def table_html(results: Mapping[str, Any]) -> str:
    """The per-case table: Dice per class and mean (and HD95 per class), a MEAN row last."""
    keys = [str(c) for c in results["classes"]]
    names = [results["class_names"][key] for key in keys]
    metrics = [m for m in ("dice", "hd95") if m in results["mean"]]
    header = ["case"] + [f"Dice {n}" for n in names] + ["Dice mean"]
    if "hd95" in metrics:
        header += [f"HD95 {n} (mm)" for n in names]

    def cells(values: Mapping[str, Any]) -> list[str]:
        dice = [values["dice"][key] for key in keys]
        row = [f"{v:.4f}" for v in [*dice, float(np.mean(dice))]]
        if "hd95" in metrics:
            row += ["inf" if math.isinf(values["hd95"][key]) else f"{values['hd95'][key]:.2f}" for key in keys]
        return row

    lines = ['<table class="sortable"><thead><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in header)
             + "</tr></thead><tbody>"]
    for case in results["cases"]:
        lines.append(f"<tr><td>{html.escape(case['case_id'])}</td>"
                     + "".join(f"<td>{c}</td>" for c in cells(case)) + "</tr>")
    lines.append("</tbody><tfoot><tr class=\"mean\"><td>MEAN</td>"
                 + "".join(f"<td>{c}</td>" for c in cells(results["mean"])) + "</tr></tfoot></table>")
    return "\n".join(lines)


def report_html(results: Mapping[str, Any], images_dir: str | os.PathLike | None = None,
                training_results: str | os.PathLike | None = None) -> str:
    """The whole page for the results of `nnunet.evaluation.evaluate_folder`."""
    images = Path(images_dir) if images_dir else None
    if images is not None and not images.is_dir():
        raise EvaluationError(f"--images {images} is not a folder; pass the folder of the images that were predicted")
    image_tag = '<img alt="{}" src="{}">'
    parts = [f"<h1>Evaluation of {html.escape(str(results['preds']))}</h1>",
             f"<p>Labels: {html.escape(str(results['labels']))}. {len(results['cases'])} cases, "
             f"mean Dice {results['mean_dice']:.4f}"
             + (f", mean HD95 {results['mean_hd95']:.2f} mm ({html.escape(results['hd95_definition'])})"
                if "mean_hd95" in results else "") + ".</p>",
             "<h2>Cases</h2>", '<p class="note">Click a column header to sort.</p>', table_html(results),
             "<h2>Distributions</h2>"]
    for metric in [m for m in ("dice", "hd95") if m in results["mean"]]:
        parts.append(image_tag.format(f"{metric} per class", png_uri(figure_png(distribution_figure(results,
                                                                                                   metric)))))
    parts.append("<h2>Best, median and worst cases (by mean Dice)</h2>")
    if images is None:
        parts.append('<p class="note">Label beside prediction only: pass --images to draw them over the scans.</p>')
    for role, case_id, dice in ranked_cases(results):
        title = f"{role}: {case_id}, mean Dice {dice:.4f}"
        parts.append(f"<h3>{html.escape(title)}</h3>")
        parts.append(image_tag.format(html.escape(title), png_uri(case_overlay(results, case_id, title, images))))
    if training_results:
        parts.append("<h2>Learning curves</h2>")
        parts.append(image_tag.format("learning curves", png_uri(learning_curves_png(Path(training_results)))))
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Evaluation report</title>"
            f"<style>{STYLE}</style></head>\n<body>\n{body}\n<script>{SORT_SCRIPT}</script>\n</body></html>\n")


def write_report(results: Mapping[str, Any], path: str | os.PathLike, images_dir: str | os.PathLike | None = None,
                 training_results: str | os.PathLike | None = None) -> Path:
    """Write `report_html` to `path` (atomically); returns the path."""
    text = report_html(results, images_dir, training_results)
    with atomic_open(path, "w") as handle:
        handle.write(text)
    return Path(path)
