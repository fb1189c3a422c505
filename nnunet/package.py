"""Model packages: the folder (and zip) that holds everything needed to predict new scans.

`scripts/select_model.py` writes one from the cross-validation of trained configurations;
`main.py --exec_mode predict --model PKG`, `nnunet.predictor.Predictor.from_package` and
`scripts/export.py` read it. Layout:

    PKG/package.json          what follows, as JSON (`ModelPackage.to_dict`)
    PKG/crossval.json         the cross-validation table the choice was made on
    PKG/README.md             how the package was made
    PKG/<configuration>/plan.json          that configuration's task plan (config.json)
    PKG/<configuration>/fold_<k>.ckpt      its checkpoint of fold k

package.json: {"format": 1, "task", "task_name", "labels": {"0": "background", ...}, "regions": null or the
regions' label lists, "configurations": {name: {"plan": path, "folds": {"0": path, ...}}} (the members of
the ensemble: their probabilities on the source grid are averaged over folds and configurations),
"postprocessing": {"foreground_largest_component": bool, "largest_component_labels": [label values]}}.
Paths are relative to the package folder.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import UserError
from utils.io import atomic_open, save_json

FORMAT = 1
PACKAGE_FILE = "package.json"
CROSSVAL_FILE = "crossval.json"
README_FILE = "README.md"


@dataclass(frozen=True)
class Postprocessing:
    """What is done to the ensemble's label map, in this order (`nnunet.postprocessing.apply`).

    Attributes:
        foreground_largest_component: keep only the largest connected component of all foreground labels.
        largest_component_labels: label values of which only the largest connected component is kept (the
            other components become background).
    """

    foreground_largest_component: bool = False
    largest_component_labels: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        return {"foreground_largest_component": self.foreground_largest_component,
                "largest_component_labels": list(self.largest_component_labels)}


@dataclass(frozen=True)
class Configuration:
    """One trained configuration (2D, 3D, ...): its plan file and the checkpoint of each fold."""

    name: str
    plan: Path
    folds: dict[int, Path]


@dataclass(frozen=True)
class ModelPackage:
    """A model package as read from disk, paths resolved (see the module docstring)."""

    root: Path
    task: str
    task_name: str
    labels: dict[str, str]
    regions: list[list[int]] | None
    configurations: dict[str, Configuration]
    postprocessing: Postprocessing = field(default_factory=Postprocessing)

    def to_dict(self) -> dict:
        def relative(path: Path) -> str:
            return Path(os.path.relpath(path, self.root)).as_posix()

        return {
            "format": FORMAT, "task": self.task, "task_name": self.task_name, "labels": self.labels,
            "regions": self.regions,
            "configurations": {name: {"plan": relative(c.plan), "folds": {str(k): relative(p) for k, p in
                                                                          sorted(c.folds.items())}}
                               for name, c in self.configurations.items()},
            "postprocessing": self.postprocessing.to_dict(),
        }


def write_package(output: str | os.PathLike, task: str, task_name: str, labels: dict[str, str],
                  regions: list[list[int]] | None, configurations: dict[str, tuple[dict, dict[int, Path]]],
                  postprocessing: Postprocessing, crossval: dict, readme: str, zip_it: bool = True) -> Path:
    """Write a package folder (and `<output>.zip`), built under a temporary name and renamed into place.

    Args:
        output: the package folder to create; it must not exist.
        task, task_name, labels, regions: the task's (from its plan).
        configurations: name -> (its plan as a dict, {fold: checkpoint file to copy}).
        postprocessing: the decisions to apply after the ensemble.
        crossval: the cross-validation table (written as crossval.json).
        readme: the README's text.
        zip_it: also write `<output>.zip` holding the folder.

    Returns:
        The package folder.

    Raises:
        UserError: the output exists, or a checkpoint is missing.
    """
    output = Path(output)
    if output.exists():
        raise UserError(f"{output} exists; choose another --output or remove it")
    temporary = output.with_name(f".{output.name}.partial")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        entries = {}
        for name, (plan, folds) in configurations.items():
            (temporary / name).mkdir()
            save_json(temporary / name / "plan.json", plan)
            copied = {}
            for fold, checkpoint in sorted(folds.items()):
                if not Path(checkpoint).is_file():
                    raise UserError(f"configuration {name}: the checkpoint of fold {fold}, {checkpoint}, is missing")
                shutil.copyfile(checkpoint, temporary / name / f"fold_{fold}.ckpt")
                copied[fold] = output / name / f"fold_{fold}.ckpt"
            entries[name] = Configuration(name, output / name / "plan.json", copied)
        package = ModelPackage(output, task, task_name, labels, regions, entries, postprocessing)
        save_json(temporary / PACKAGE_FILE, package.to_dict())
        save_json(temporary / CROSSVAL_FILE, crossval)
        with atomic_open(temporary / README_FILE, "w") as handle:
            handle.write(readme)
        os.replace(temporary, output)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if zip_it:
        archive = shutil.make_archive(str(output.with_name(f".{output.name}.zip.partial")), "zip",
                                      root_dir=output.parent, base_dir=output.name)
        os.replace(archive, output.with_name(f"{output.name}.zip"))
    return output


def read_package(path: str | os.PathLike, folds: list[int] | None = None) -> ModelPackage:
    """Read and check a package folder (unpack a package's .zip first).

    Args:
        path: the package folder.
        folds: keep only these folds of every configuration (None: all).

    Raises:
        UserError: one line naming what is wrong: no package.json, another format, a missing plan or fold
            file, a --folds entry that no configuration has, configurations with different label sets.
    """
    root = Path(path)
    description = root / PACKAGE_FILE
    if not description.is_file():
        raise UserError(f"{root} is not a model package (no {PACKAGE_FILE}); make one with scripts/select_model.py")
    try:
        content = json.loads(description.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{description} is not readable JSON ({error})") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise UserError(f"{description} is not a package of format {FORMAT}")
    try:
        configurations = {}
        for name, entry in content["configurations"].items():
            plan = root / entry["plan"]
            if not plan.is_file():
                raise UserError(f"{root}: configuration {name} has no plan file {plan}")
            available = {int(fold): root / file for fold, file in entry["folds"].items()}
            chosen = available if folds is None else {k: v for k, v in available.items() if k in folds}
            for fold, file in sorted(chosen.items()):
                if not file.is_file():
                    raise UserError(f"{root}: the checkpoint of fold {fold} of configuration {name} is missing "
                                    f"({file})")
            if folds is not None:
                missing = sorted(set(folds) - set(available))
                if missing:
                    raise UserError(f"--folds {' '.join(map(str, missing))}: configuration {name} of {root} has "
                                    f"folds {' '.join(map(str, sorted(available)))}")
            configurations[name] = Configuration(name, plan, chosen)
        if not configurations:
            raise UserError(f"{description} names no configuration")
        for name, configuration in configurations.items():
            plan_labels = json.loads(configuration.plan.read_text()).get("labels")
            if plan_labels != content["labels"]:
                raise UserError(f"{root}: configuration {name} was planned for labels {plan_labels}, the package "
                                f"declares {content['labels']}")
        processing = content.get("postprocessing") or {}
        return ModelPackage(
            root=root, task=str(content["task"]), task_name=str(content["task_name"]), labels=content["labels"],
            regions=content.get("regions"), configurations=configurations,
            postprocessing=Postprocessing(bool(processing.get("foreground_largest_component", False)),
                                          tuple(int(v) for v in processing.get("largest_component_labels", ()))))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise UserError(f"{description} lacks an entry or has one of the wrong type ({type(error).__name__}: "
                        f"{error})") from None
