"""Choose the best configuration or ensemble from the cross-validation of fold sweeps and write a model package.

    python scripts/select_model.py --results /results/01_3d /results/01_2d --lbls /data/Task01_BrainTumour/labelsTr \
        --output /models/01

Each --results folder is one configuration's sweep (scripts/train.py --folds). Every configuration, and every
ensemble of two or more (the mean of their probabilities), is scored on the out-of-fold probabilities against
the labels in --lbls, on the source grid: Dice per class and its mean (and HD95 with --hd95). The best mean
Dice wins. Postprocessing follows nnU-Net's rule: keep only the largest foreground component if that raises
the cross-validated mean Dice, then per label if it raises that class's Dice without lowering the mean.
The package (nnunet/package.py) holds each member's plan and fold checkpoints, the postprocessing,
crossval.json and a README; PKG.zip beside it.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.errors import UserError  # noqa: E402


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", nargs="+", required=True,
                        help="one fold sweep's results folder (fold_N/done.json) per configuration")
    parser.add_argument("--lbls", required=True, help="the source labels, <case>.nii.gz (the task's labelsTr)")
    parser.add_argument("--output", required=True, help="the package folder to write (it must not exist)")
    parser.add_argument("--hd95", action="store_true", help="also the mean 95th-percentile Hausdorff distance (mm)")
    return parser


def readme(command: str, table_text: str, winner: str, members: dict, report: dict, cases: int) -> str:
    """How the package was made, in Markdown."""
    folds = "\n".join(f"- {name}: folds {', '.join(map(str, sorted(folds)))} ({root})"
                      for name, (root, folds) in members.items())
    foreground = report["foreground_largest_component"]
    labels = [value for value, step in report["largest_component_labels"].items() if step["adopted"]]
    return (f"# Model package\n\nMade on {datetime.date.today().isoformat()} by\n\n    {command}\n\n"
            f"## Cross-validation ({cases} cases, Dice on the source grid)\n\n```\n{table_text}\n```\n\n"
            f"Chosen: **{winner}**, the mean of the probabilities of every fold of:\n\n{folds}\n\n"
            f"## Postprocessing\n\n"
            f"- largest foreground component: {'adopted' if foreground['adopted'] else 'not adopted'} (mean Dice "
            f"{foreground['mean_dice_before']:.4f} -> {foreground['mean_dice_after']:.4f})\n"
            f"- largest component of labels: {', '.join(labels) if labels else 'none'}\n"
            f"- mean Dice {report['mean_dice_before']:.4f} before, {report['mean_dice_after']:.4f} after\n\n"
            f"Details in crossval.json.\n")


def select(results: list[str], lbls: str, output: str, with_hd95: bool, command: str) -> Path:
    """Score the candidates, decide the postprocessing and write the package; returns its folder."""
    from nnunet import selection
    from nnunet.package import write_package

    if Path(output).exists():
        raise UserError(f"{output} exists; choose another --output or remove it")
    sweeps = selection.name_sweeps([selection.read_sweep(folder) for folder in results])
    cases = selection.check_sweeps(sweeps)
    for case in cases:  # every label before any scoring
        selection.label_file(lbls, case)
    plan = sweeps[0].plan
    regions = sweeps[0].regions
    classes = selection.scored_classes(plan["labels"], regions)
    names = [" + ".join(map(str, values)) if regions else plan["labels"][str(values[0])]
             for values in classes]
    table = selection.score_candidates(sweeps, cases, lbls, with_hd95)
    winner = selection.best_candidate(table)
    table_text = selection.format_table(table, names, winner)
    print(f"cross-validation of {len(cases)} cases (Dice on the source grid):\n{table_text}", flush=True)
    members = table[winner]["members"]
    decisions, report = selection.decide_postprocessing(
        selection.candidate_predictions(sweeps, members, cases, lbls), classes)
    foreground = "adopted" if decisions.foreground_largest_component else "not adopted"
    labels = ", ".join(map(str, decisions.largest_component_labels)) or "none"
    print(f"postprocessing: largest foreground component {foreground}; largest component of labels: {labels}; "
          f"mean Dice {report['mean_dice_before']:.4f} -> {report['mean_dice_after']:.4f}", flush=True)
    by_name = {sweep.name: sweep for sweep in sweeps}
    crossval = {"cases": cases, "classes": names, "candidates": table, "winner": winner,
                "postprocessing": {**decisions.to_dict(), "report": report}}
    text = readme(command, table_text, winner, {name: (by_name[name].root, by_name[name].checkpoints)
                                                 for name in members}, report, len(cases))
    package = write_package(output, str(plan.get("task", "")), str(plan.get("task_name", "")), plan["labels"],
                            regions, {name: (by_name[name].plan, by_name[name].checkpoints)
                                                  for name in members}, decisions, crossval, text)
    print(f"model package written to {package} (and {package.with_name(package.name + '.zip')})")
    return package


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    command = shlex.join(["python", "scripts/select_model.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        select(args.results, args.lbls, args.output, args.hd95, command)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
