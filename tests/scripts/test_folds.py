"""A fold sweep of the tiny synthetic task, model selection on its cross-validation, and the package."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate as evaluate_py
import main as main_py
from nnunet.package import read_package
from nnunet.selection import decide_postprocessing, ensemble, label_map
from tests.conftest import TINY_FILTERS, SyntheticTask

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import select_model  # noqa: E402
import train as train_script  # noqa: E402


class InProcess:
    """Runs main.py commands in this process (as `main.main`) and keeps them."""

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def __call__(self, command: list[str]) -> int:
        self.commands.append(command)
        return main_py.main(command[2:])


def sweep_argv(data: Path, results: Path) -> list[str]:
    return ["--data", str(data), "--results", str(results), "--gpus", "0", "--folds", "0", "1", "--nfolds", "2",
            "--num_workers", "2", "--seed", "0", "--batch_size", "2", *TINY_FILTERS, "--deep_supr_num", "1",
            "--epochs", "1", "--train_batches", "2", "--learning_rate", "5e-3"]


@pytest.fixture(scope="module")
def sweep(synthetic_task: SyntheticTask, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both folds of a 2-fold sweep, trained and predicted."""
    results = tmp_path_factory.mktemp("sweep") / "3d"
    assert train_script.main(sweep_argv(synthetic_task.preprocessed(3), results), runner=InProcess()) == 0
    return results


def test_sweep_keeps_out_of_fold_probabilities_and_resumes(sweep: Path, synthetic_task: SyntheticTask,
                                                           tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = []
    for fold in (0, 1):
        done = json.loads((sweep / f"fold_{fold}" / "done.json").read_text())
        assert done["checkpoint"] in ("checkpoints/best.ckpt", "checkpoints/last.ckpt")
        for case in done["cases"]:
            probabilities = np.load(sweep / f"fold_{fold}" / done["predictions"] / f"{case}_probs.npz")
            assert probabilities["probabilities"].dtype == np.float16
        cases += done["cases"]
    assert len(cases) == len(set(cases)) == 8
    # An interrupted sweep: fold 1 lost its done.json; fold 0 is not trained again.
    results = tmp_path / "3d"
    shutil.copytree(sweep, results)
    (results / "fold_1" / "done.json").unlink()
    trained_at = os.stat(results / "fold_0" / "checkpoints" / "last.ckpt").st_mtime_ns
    runner = InProcess()
    assert train_script.main(sweep_argv(synthetic_task.preprocessed(3), results), runner=runner) == 0
    assert [(command[3], command[command.index("--fold") + 1]) for command in runner.commands] == \
        [("train", "1"), ("predict", "1")]
    assert "--resume_training" in runner.commands[0]
    printed = capsys.readouterr().out
    assert "fold 0: finished" in printed
    assert f"predicting the 4 validation cases of fold 1 of {synthetic_task.preprocessed(3)}" in printed
    assert os.stat(results / "fold_0" / "checkpoints" / "last.ckpt").st_mtime_ns == trained_at
    assert (results / "fold_1" / "done.json").is_file()


def test_select_writes_the_best_candidate_as_a_package(sweep: Path, synthetic_task: SyntheticTask, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    other = tmp_path / "again"  # a second configuration: the same folds under another folder name
    shutil.copytree(sweep, other)
    output = tmp_path / "package"
    argv = ["--results", str(sweep), str(other), "--lbls", str(synthetic_task.task_dir / "labelsTr"),
            "--output", str(output)]
    assert select_model.main(argv) == 0
    printed = capsys.readouterr().out
    assert "3d + again" in printed and "<- best" in printed
    crossval = json.loads((output / "crossval.json").read_text())
    assert set(crossval["candidates"]) == {"3d", "again", "3d + again"}
    assert crossval["candidates"]["3d + again"]["dice"] == pytest.approx(crossval["candidates"]["3d"]["dice"])
    package = read_package(output)
    assert list(package.configurations) == crossval["candidates"][crossval["winner"]]["members"]
    assert sorted(next(iter(package.configurations.values())).folds) == [0, 1]
    assert (output.with_name("package.zip")).is_file() and "Cross-validation" in (output / "README.md").read_text()
    # The package predicts raw scans with the ensemble of both folds, and the predictions score.
    predicted = tmp_path / "predicted"
    assert main_py.main(["--exec_mode", "predict", "--model", str(output), "--input",
                         str(synthetic_task.task_dir / "imagesTr"), "--results", str(predicted),
                         "--num_workers", "2"]) == 0
    written = sorted(p.name for p in (predicted / "predictions").glob("*.nii.gz"))
    assert len(written) == len(list((synthetic_task.task_dir / "imagesTr").glob("*.nii.gz")))
    assert evaluate_py.main(["--preds", str(predicted / "predictions"), "--lbls",
                             str(synthetic_task.task_dir / "labelsTr")]) == 0


def replan(results: Path, fold: int, **changes: object) -> None:
    """Give a fold's checkpoint another plan, as if it had been trained on one."""
    done = json.loads((results / f"fold_{fold}" / "done.json").read_text())
    path = results / f"fold_{fold}" / done["checkpoint"]
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["config"].update(changes)
    torch.save(checkpoint, path)


def test_select_refuses_bad_input_in_one_line(sweep: Path, synthetic_task: SyntheticTask, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    labels = synthetic_task.task_dir / "labelsTr"
    (tmp_path / "empty").mkdir()
    replanned = tmp_path / "replanned"
    shutil.copytree(sweep, replanned)
    replan(replanned, 1, spacing=[9.0, 9.0, 9.0])
    relabelled = tmp_path / "relabelled"
    shutil.copytree(sweep, relabelled)
    for fold in (0, 1):
        replan(relabelled, fold, labels={"0": "background", "1": "edema", "2": "necrosis", "3": "other"})
    partial = tmp_path / "labels"
    shutil.copytree(labels, partial)
    next(iter(sorted(partial.iterdir()))).unlink()
    cases = [
        ([str(tmp_path / "empty")], labels, "no finished fold"),
        ([str(replanned)], labels, "another plan"),
        ([str(sweep), str(relabelled)], labels, "different labels"),
        ([str(sweep)], partial, "no label"),
    ]
    for results, lbls, message in cases:
        output = tmp_path / "package"
        assert select_model.main(["--results", *results, "--lbls", str(lbls), "--output", str(output)]) == 1
        error = capsys.readouterr().err.strip()
        assert message in error and len(error.splitlines()) == 1
        assert not output.exists()


def test_ensemble_is_the_mean_of_its_members() -> None:
    generator = np.random.default_rng(0)
    members = [generator.random((3, 4, 5, 6)).astype(np.float16) for _ in range(3)]
    np.testing.assert_allclose(ensemble(members), np.mean([m.astype(np.float32) for m in members], axis=0),
                               rtol=1e-6)
    assert label_map(ensemble(members)).shape == (4, 5, 6)


def test_postprocessing_is_adopted_only_where_it_helped() -> None:
    truth = np.zeros((12, 12, 12), dtype=np.uint8)
    truth[2:6, 2:6, 2:6] = 1
    blob = truth.copy()
    blob[9:11, 9:11, 9:11] = 1  # a spurious component
    decisions, report = decide_postprocessing(lambda: [(blob, truth)], [[1]])
    assert decisions.foreground_largest_component
    assert report["mean_dice_before"] < report["mean_dice_after"] == pytest.approx(1.0)
    two_lesions = truth.copy()
    two_lesions[8:11, 8:11, 8:11] = 1  # true foreground: removing it would lower the Dice
    decisions, report = decide_postprocessing(lambda: [(two_lesions, two_lesions)], [[1]])
    assert not decisions.foreground_largest_component and decisions.largest_component_labels == ()
    assert report["mean_dice_after"] == report["mean_dice_before"] == 1.0
