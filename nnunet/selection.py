"""Model selection from cross-validation: which configuration, or ensemble of configurations, and which
postprocessing (nnU-Net's rule), scored on the out-of-fold probabilities against the source labels.

A fold sweep (`scripts/train.py --folds`) leaves, per fold, `RESULTS/fold_N/done.json` naming its checkpoint
and its validation predictions, among them `<case>_probs.npz` (`probabilities`, (K, X, Y, Z) float16 on the
source grid). `read_sweep` collects them; `score_candidates` scores every configuration and every ensemble
(the mean of its members' probabilities); `decide_postprocessing` keeps a largest-component step only where
it raised the cross-validated Dice. `scripts/select_model.py` writes the winner as a model package.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from itertools import combinations
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from nnunet.checkpoints import read_checkpoint, stored_settings
from nnunet.metrics import hd95
from nnunet.package import Postprocessing
from nnunet.postprocessing import apply, keep_largest_foreground, keep_largest_of_label
from nnunet.regions import regions_to_labels, task_regions
from utils.errors import UserError
from utils.io import load_json

DONE = "done.json"
PROBS_SUFFIX = "_probs.npz"


@dataclass(frozen=True)
class Sweep:
    """One configuration's finished folds.

    Attributes:
        name: the configuration's name ("3d", "2d", "3d_resenc_m", or the results folder's name).
        root: the results folder of the sweep.
        plan: the task plan the folds were trained on (from their checkpoints).
        dim: the network's dimension.
        regions: the label values of each sigmoid output for region-trained networks, None for softmax ones.
        checkpoints: fold -> the checkpoint its validation cases were predicted with.
        probabilities: case id -> its out-of-fold `<case>_probs.npz`.
    """

    name: str
    root: Path
    plan: dict
    dim: int
    regions: list[list[int]] | None
    checkpoints: dict[int, Path]
    probabilities: dict[str, Path]


def configuration_name(plan: dict, dim: int) -> str:
    """"3d", "2d", or with a preset other than the default its name, e.g. "3d_resenc_m"."""
    planner = plan.get("planner") or "default"
    return f"{dim}d" if planner == "default" else f"{dim}d_{planner}"


def read_sweep(root: str | os.PathLike) -> Sweep:
    """The finished folds of a results folder (`fold_N/done.json`), their plan and out-of-fold probabilities.

    Raises:
        UserError: no finished fold, folds trained on different plans or networks, a missing probabilities
            file, or a case predicted by two folds.
    """
    root = Path(root)
    done = sorted(root.glob(f"fold_*/{DONE}"), key=lambda path: path.parent.name)
    if not done:
        raise UserError(f"{root} has no finished fold (fold_N/{DONE}): train the folds with scripts/train.py "
                        f"--folds first")
    checkpoints: dict[int, Path] = {}
    probabilities: dict[str, Path] = {}
    first: tuple | None = None
    for path in done:
        record = load_json(path)
        fold, folder = int(record["fold"]), path.parent
        checkpoint = folder / record["checkpoint"]
        stored = read_checkpoint(checkpoint)
        plan, model, _ = stored_settings(stored, checkpoint)
        trained_on = json.dumps({"plan": plan, "model": model.to_dict()}, sort_keys=True)
        if first is None:
            first = (fold, trained_on, plan, model.dim, task_regions(model.targets, plan))
        elif trained_on != first[1]:
            raise UserError(f"{root}: fold {fold} was trained on another plan or network than fold {first[0]}; "
                            f"a configuration's folds must share one plan: retrain fold {fold} or use separate "
                            f"results folders")
        checkpoints[fold] = checkpoint
        for case in record["cases"]:
            file = folder / record["predictions"] / f"{case}{PROBS_SUFFIX}"
            if not file.is_file():
                raise UserError(f"{case}: {file} is missing; remove {path} and run scripts/train.py --folds again")
            if case in probabilities:
                raise UserError(f"{case} is a validation case of two folds of {root}; the folds must not overlap")
            probabilities[case] = file
    assert first is not None
    regions = [list(region) for region in first[4]] if first[4] else None
    return Sweep(configuration_name(first[2], first[3]), root, first[2], first[3], regions, checkpoints,
                 probabilities)


def name_sweeps(sweeps: list[Sweep]) -> list[Sweep]:
    """The sweeps with unique names: configurations whose dim/preset name repeats are named by their folder.

    Raises:
        UserError: two results folders of the same name and configuration.
    """
    counts = {name: [s.name for s in sweeps].count(name) for name in {s.name for s in sweeps}}
    named = [s if counts[s.name] == 1 else replace(s, name=s.root.resolve().name) for s in sweeps]
    names = [s.name for s in named]
    for name in names:
        if names.count(name) > 1:
            raise UserError(f"two --results folders are both named {name}; give each configuration its own folder "
                            f"name")
    return named


def check_sweeps(sweeps: list[Sweep]) -> list[str]:
    """The cases every configuration covers, after checking they agree on labels, regions and cases.

    Raises:
        UserError: configurations with different label sets or regions, or covering different cases.
    """
    first = sweeps[0]
    for sweep in sweeps[1:]:
        if sweep.plan.get("labels") != first.plan.get("labels") or sweep.regions != first.regions:
            raise UserError(f"configurations {first.name} and {sweep.name} have different labels or regions "
                            f"({first.plan.get('labels')} and {sweep.plan.get('labels')}); select among "
                            f"configurations of one task and one kind of output")
        if set(sweep.probabilities) != set(first.probabilities):
            only = sorted(set(sweep.probabilities) ^ set(first.probabilities))
            raise UserError(f"configurations {first.name} ({len(first.probabilities)} cases) and {sweep.name} "
                            f"({len(sweep.probabilities)} cases) cover different cases (e.g. {only[0]}); train "
                            f"them on the same folds of the same task")
    return sorted(first.probabilities)


def label_file(labels_dir: str | os.PathLike, case: str) -> Path:
    """The source label `<case>.nii.gz` (or `.nii`) of a case."""
    for suffix in (".nii.gz", ".nii"):
        path = Path(labels_dir) / f"{case}{suffix}"
        if path.is_file():
            return path
    raise UserError(f"{case}: no label {Path(labels_dir) / (case + '.nii.gz')}; point --lbls at the task's "
                    f"labelsTr folder")


# ---------------------------------------------------------------------------------------------
# Numerics on the source grid
# ---------------------------------------------------------------------------------------------
def ensemble(probabilities: Sequence[np.ndarray]) -> np.ndarray:
    """The mean of the members' (K, X, Y, Z) probabilities, float32."""
    total = np.zeros(probabilities[0].shape, dtype=np.float32)
    for member in probabilities:
        total += member
    return total / len(probabilities)


def label_map(probabilities: np.ndarray, regions: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """(K, X, Y, Z) softmax probabilities (argmax) or (R, X, Y, Z) region probabilities (> 0.5) -> uint8 labels."""
    if regions:
        return regions_to_labels(torch.from_numpy(probabilities[None]), regions)[0, 0].numpy().astype(np.uint8)
    return probabilities.argmax(0).astype(np.uint8)


def scored_classes(labels: dict[str, str], regions: Sequence[Sequence[int]] | None) -> list[list[int]]:
    """The label values of each scored class: each foreground label, or each region."""
    if regions:
        return [list(region) for region in regions]
    return [[int(value)] for value in sorted(labels, key=int) if int(value) > 0]


def dice_scores(predicted: np.ndarray, truth: np.ndarray, classes: Sequence[Sequence[int]]) -> np.ndarray:
    """(n_classes,) Dice of each class (its label values) between two label maps; 1 where both are empty."""
    scores = []
    for values in classes:
        pred, true = np.isin(predicted, values), np.isin(truth, values)
        total = int(pred.sum()) + int(true.sum())
        scores.append(1.0 if total == 0 else 2.0 * int((pred & true).sum()) / total)
    return np.array(scores)


def hd95_scores(predicted: np.ndarray, truth: np.ndarray, classes: Sequence[Sequence[int]],
                spacing: Sequence[float]) -> np.ndarray:
    """(n_classes,) HD95 in mm of each class; NaN where only one of the two masks is empty."""
    scores = [hd95(np.isin(predicted, values), np.isin(truth, values), spacing) for values in classes]
    return np.array([score if np.isfinite(score) else np.nan for score in scores])


# ---------------------------------------------------------------------------------------------
# Candidates and their cross-validation
# ---------------------------------------------------------------------------------------------
def candidates(names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Every configuration alone and every ensemble of two or more: name -> members."""
    result = {}
    for size in range(1, len(names) + 1):
        for members in combinations(names, size):
            result[" + ".join(members)] = members
    return result


def read_truth(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """A source label map as stored, uint8, and its voxel size in mm."""
    image = nib.load(str(path))
    return np.asarray(image.dataobj).astype(np.uint8), tuple(float(v) for v in image.header.get_zooms()[:3])


def read_probabilities(path: Path, case: str, shape: tuple[int, ...]) -> np.ndarray:
    probabilities = np.load(path)["probabilities"].astype(np.float32)
    if probabilities.shape[1:] != shape:
        raise UserError(f"{case}: probabilities {path} are on a grid of {probabilities.shape[1:]} but the label is "
                        f"{shape}; point --lbls at the labels of the task the folds were trained on")
    return probabilities


def score_candidates(sweeps: list[Sweep], cases: list[str], labels_dir: str | os.PathLike,
                     with_hd95: bool = False) -> dict[str, dict]:
    """Per-class Dice (and HD95) of every candidate over the cases, case by case on the source grid.

    Returns:
        name -> {"members": [...], "dice": [per class], "mean_dice": float, ("hd95": [per class, mm])}.
    """
    regions = sweeps[0].regions
    classes = scored_classes(sweeps[0].plan["labels"], regions)
    options = candidates([sweep.name for sweep in sweeps])
    dice = {name: [] for name in options}
    distances = {name: [] for name in options}
    by_name = {sweep.name: sweep for sweep in sweeps}
    for case in cases:
        truth, spacing = read_truth(label_file(labels_dir, case))
        members = {name: read_probabilities(sweep.probabilities[case], case, truth.shape)
                   for name, sweep in by_name.items()}
        for name, chosen in options.items():
            predicted = label_map(ensemble([members[member] for member in chosen]), regions)
            dice[name].append(dice_scores(predicted, truth, classes))
            if with_hd95:
                distances[name].append(hd95_scores(predicted, truth, classes, spacing))
    table = {}
    for name, chosen in options.items():
        per_class = np.mean(dice[name], axis=0)
        table[name] = {"members": list(chosen), "dice": per_class.tolist(), "mean_dice": float(per_class.mean())}
        if with_hd95:
            table[name]["hd95"] = [None if np.isnan(v) else float(v) for v in np.nanmean(distances[name], axis=0)] \
                if not np.all(np.isnan(distances[name])) else [None] * len(classes)
    return table


def best_candidate(table: dict[str, dict]) -> str:
    """The candidate of the highest mean Dice (on a tie, the one with fewer members, then the first)."""
    return max(table, key=lambda name: (table[name]["mean_dice"], -len(table[name]["members"])))


def decide_postprocessing(predictions: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
                          classes: Sequence[Sequence[int]]) -> tuple[Postprocessing, dict]:
    """nnU-Net's rule on the cross-validation: keep only the largest foreground component if that raises the
    mean Dice; then, for each label, keep only its largest component if that raises the Dice of a class holding
    the label without lowering the mean.

    Args:
        predictions: returns, on each call, the (predicted labels, true labels) of every case.
        classes: the label values of each scored class (`scored_classes`).

    Returns:
        The decisions, and a report: mean and per-class Dice before and after, and each step's effect.
    """
    def mean_dice(transform: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        return np.mean([dice_scores(transform(predicted), truth, classes) for predicted, truth in predictions()],
                       axis=0)

    before = mean_dice(lambda labels: labels)
    with_foreground = mean_dice(keep_largest_foreground)
    foreground = bool(with_foreground.mean() > before.mean())
    reference = with_foreground if foreground else before
    values = sorted({value for values in classes for value in values})
    report: dict = {"foreground_largest_component": {"adopted": foreground, "mean_dice_before": float(before.mean()),
                                                     "mean_dice_after": float(with_foreground.mean())},
                    "largest_component_labels": {}}
    adopted = []
    for value in values:
        scores = mean_dice(lambda labels, value=value: keep_largest_of_label(apply(labels, foreground), value))
        holding = [index for index, members in enumerate(classes) if value in members]
        raises = any(scores[index] > reference[index] for index in holding)
        keep = bool(raises and scores.mean() >= reference.mean())
        report["largest_component_labels"][str(value)] = {
            "adopted": keep, "dice_before": float(np.mean(reference[holding])),
            "dice_after": float(np.mean(scores[holding]))}
        if keep:
            adopted.append(value)
    decisions = Postprocessing(foreground, tuple(adopted))
    after = mean_dice(lambda labels: apply(labels, decisions.foreground_largest_component,
                                           decisions.largest_component_labels))
    report.update({"dice_before": before.tolist(), "mean_dice_before": float(before.mean()),
                   "dice_after": after.tolist(), "mean_dice_after": float(after.mean())})
    return decisions, report


def candidate_predictions(sweeps: list[Sweep], members: Sequence[str], cases: list[str],
                          labels_dir: str | os.PathLike) -> Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]:
    """For `decide_postprocessing`: the candidate's label maps and the source labels, read case by case."""
    by_name = {sweep.name: sweep for sweep in sweeps}
    regions = sweeps[0].regions

    def read() -> Iterable[tuple[np.ndarray, np.ndarray]]:
        for case in cases:
            truth, _ = read_truth(label_file(labels_dir, case))
            probabilities = [read_probabilities(by_name[name].probabilities[case], case, truth.shape)
                             for name in members]
            yield label_map(ensemble(probabilities), regions), truth

    return read


def format_table(table: dict[str, dict], names: Sequence[str], winner: str | None = None) -> str:
    """The cross-validation table: a row per candidate, a column per class, the mean (and mean HD95)."""
    width = max(12, *(len(name) for name in table)) + 2
    head = f"{'candidate':<{width}}" + "".join(f"{name[:10]:>11}" for name in names) + f"{'mean':>9}"
    with_hd95 = any("hd95" in row for row in table.values())
    rows = [head + (f"{'HD95 mm':>10}" if with_hd95 else "")]
    for name, row in table.items():
        line = f"{name:<{width}}" + "".join(f"{value:11.4f}" for value in row["dice"]) + f"{row['mean_dice']:9.4f}"
        if with_hd95:
            finite = [v for v in row["hd95"] if v is not None]
            line += f"{np.mean(finite):10.2f}" if finite else f"{'-':>10}"
        rows.append(line + ("  <- best" if name == winner else ""))
    return "\n".join(rows)
