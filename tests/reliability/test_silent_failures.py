"""Problems that used to pass silently: non-finite arrays and losses, classes that no case holds, unsafe
checkpoints, files outside the dataset, failures that leave empty folders, and which HD95 is computed."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import evaluate
import main
import preprocess
from data_loading.data_module import check_case
from nnunet.callbacks import format_epoch_line
from nnunet.metrics import hd95
from tests.factories import blob_case, write_msd_task
from utils.errors import UserError

LABELS = {"0": "background", "1": "organ", "2": "lesion", "3": "cyst"}  # no case holds a cyst
TINY = ["--filters", "4", "8", "16", "--nfolds", "2", "--num_workers", "1", "--seed", "0", "--train_batches", "2"]


def one_line_error(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and "Traceback" not in error, error
    return error


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    """Task 63 preprocessed: four cases whose labels hold classes 1 and 2 of the declared 1, 2 and 3."""
    root = tmp_path_factory.mktemp("silent")
    write_msd_task(root / "raw", "Task63_Silent", [blob_case(f"case_{i}", seed=i) for i in range(4)], labels=LABELS)
    return root


@pytest.fixture(scope="module")
def data(task) -> Path:
    assert preprocess.main(["--task", "63", "--data", str(task / "raw"), "--results", str(task / "data")]) == 0
    return task / "data" / "63_3d"


def copy_task(data: Path, target: Path) -> Path:
    shutil.copytree(data, target)
    return target


# ---------------------------------------------------------------------------------------------
# Non-finite values
# ---------------------------------------------------------------------------------------------
def test_a_nan_voxel_in_a_preprocessed_image_is_refused_naming_the_case(data, tmp_path, capsys):
    copy = copy_task(data, tmp_path / "63_3d")
    image = np.load(copy / "case_2_x.npy")
    image[0, 1, 2, 3] = np.nan
    np.save(copy / "case_2_x.npy", image)
    assert main.main(["--exec_mode", "train", "--data", str(copy), "--results", str(tmp_path / "r"), *TINY]) == 1
    error = one_line_error(capsys)
    assert "case_2:" in error and "1 NaN or infinite value(s)" in error
    assert not (tmp_path / "r").exists()
    # Unlabelled cases (test/, val/) go through the same check.
    (copy / "test").mkdir()
    image[0, 0, 0, 0] = np.inf
    np.save(copy / "test" / "case_9_x.npy", image)
    with pytest.raises(UserError, match="case_9: .* holds 2 NaN or infinite"):
        check_case(copy / "test", "case_9", 1, labelled=False)


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(data, tmp_path, capsys):
    results = tmp_path / "results"
    argv = ["--exec_mode", "train", "--data", str(data), "--results", str(results), *TINY, "--save_ckpt"]
    assert main.main([*argv, "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    # Class 3 is in no validation label: it is named and left out of the mean.
    assert "mean_dice over classes present in validation" in out and "(without cyst" not in out
    assert "without D3: in no validation label" in out
    record = json.loads((results / "logs.json").read_text().splitlines()[-1][len("DLLL "):])["data"]
    assert record["dice_absent"] == [3]
    assert record["dice_mean"] == pytest.approx(np.mean(record["dice"][:2]), abs=1e-6)
    last = results / "checkpoints" / "last.ckpt"
    good = last.read_bytes()
    # A rate this absurd overflows the weights in the first steps.
    assert main.main([*argv, "--epochs", "2", "--ckpt_path", str(last), "--learning_rate", "1e30",
                      "--optimizer", "sgd"]) == 1
    error = one_line_error(capsys)
    assert "training loss became NaN or infinite in epoch 0" in error
    assert last.read_bytes() == good


def test_the_epoch_line_names_the_classes_left_out():
    metrics = {"dice": [0.5, 0.25, 1.0], "dice_mean": 0.375, "dice_absent": [3], "train_loss": 1.0}
    line = format_epoch_line(4, metrics, ["organ", "lesion", "cyst"])
    assert "mean_dice over classes present in validation 0.3750 (without cyst: in no validation label)" in line


# ---------------------------------------------------------------------------------------------
# Dataset warnings
# ---------------------------------------------------------------------------------------------
def test_preprocessing_warns_of_a_declared_class_that_no_case_holds(data, task, capsys):
    # `data` ran it once; a rerun (every case already done) warns again, from the cases' metadata.
    assert preprocess.main(["--task", "63", "--data", str(task / "raw"), "--results", str(task / "data")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: class 3 (cyst) is declared in dataset.json but labels no voxel of any training "
                        "case; validation leaves it out of mean_dice"]


def test_a_file_outside_the_dataset_is_read_with_one_warning(tmp_path, capsys):
    raw = write_msd_task(tmp_path / "raw", "Task64_Links", [blob_case(f"case_{i}", seed=i) for i in range(2)]).root
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for case in ("case_0", "case_1"):
        moved = elsewhere / f"{case}.nii.gz"
        shutil.move(raw / "imagesTr" / f"{case}.nii.gz", moved)
        (raw / "imagesTr" / f"{case}.nii.gz").symlink_to(moved)
    assert preprocess.main(["--task", "64", "--data", str(tmp_path / "raw"), "--results", str(tmp_path / "out")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "2 file(s) of Task64_Links lie outside" in warnings[0] and str(elsewhere / "case_0.nii.gz") in warnings[0]


# ---------------------------------------------------------------------------------------------
# Messages and leftovers
# ---------------------------------------------------------------------------------------------
def test_an_unsafe_checkpoint_is_refused_in_one_line(data, tmp_path, capsys):
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"args": argparse.Namespace(dim=3)}}, path)
    assert main.main(["--exec_mode", "evaluate", "--data", str(data), "--results", str(tmp_path / "r"),
                      "--ckpt_path", str(path)]) == 1
    error = one_line_error(capsys)
    assert error == (f"error: {path} is not a safe checkpoint: it holds Python objects beyond tensors and plain "
                     f"values, which could run code when loaded; use a checkpoint written by this program")
    assert not (tmp_path / "r").exists()


def test_more_folds_than_cases_leaves_no_results_folder(data, tmp_path, capsys):
    results = tmp_path / "deep" / "results"
    argv = ["--exec_mode", "train", "--data", str(data), "--results", str(results), *TINY, "--nfolds", "5"]
    assert main.main(argv) == 1
    assert "--nfolds 5" in one_line_error(capsys)
    assert not (tmp_path / "deep").exists()


# ---------------------------------------------------------------------------------------------
# HD95: the larger directed percentile, or both directions pooled
# ---------------------------------------------------------------------------------------------
def row_masks() -> tuple[np.ndarray, np.ndarray]:
    """Isolated voxels on one row (each its own surface): prediction at x = 0, 2, 4, 6, reference at 0 and 20."""
    pred, target = np.zeros((3, 30), bool), np.zeros((3, 30), bool)
    pred[1, [0, 2, 4, 6]] = True
    target[1, [0, 20]] = True
    return pred, target


def test_hd95_modes_against_hand_computed_values():
    pred, target = row_masks()
    # Prediction -> reference distances 0, 2, 4, 6; reference -> prediction 0, 14 (mm, spacing 1).
    # max: the larger of P95(0, 2, 4, 6) = 4 + 0.85 * 2 = 5.7 and P95(0, 14) = 0.95 * 14 = 13.3.
    assert hd95(pred, target, (1.0, 1.0)) == pytest.approx(13.3)
    assert hd95(pred, target, (1.0, 1.0), mode="max") == pytest.approx(13.3)
    # pooled: P95 of 0, 0, 2, 4, 6, 14: rank 0.95 * 5 = 4.75 -> 6 + 0.75 * 8 = 12.
    assert hd95(pred, target, (1.0, 1.0), mode="pooled") == pytest.approx(12.0)
    assert hd95(pred, target, (2.0, 0.5), mode="pooled") == pytest.approx(6.0)  # x spacing 0.5 mm halves it
    with pytest.raises(ValueError, match="mode"):
        hd95(pred, target, (1.0, 1.0), mode="mean")


def test_evaluate_names_the_hd95_definition(tmp_path, capsys):
    pred, target = row_masks()
    for folder, mask in (("preds", pred), ("lbls", target)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(mask[:, :, None].astype(np.uint8), np.eye(4)), tmp_path / folder / "a.nii.gz")
    for mode, expected in (("max", 13.3), ("pooled", 12.0)):
        prefix = tmp_path / mode
        assert evaluate.main(["--preds", str(tmp_path / "preds"), "--lbls", str(tmp_path / "lbls"), "--hd95",
                              "--hd95_mode", mode, "--output", str(prefix)]) == 0
        saved = json.loads(prefix.with_suffix(".json").read_text())
        assert saved["hd95_mode"] == mode and saved["mean_hd95"] == pytest.approx(expected)
        assert ("MONAI" if mode == "max" else "medpy") in saved["hd95_definition"]
        rows = list(csv.reader(prefix.with_suffix(".csv").open()))
        assert rows[0][-1] == "hd95_mode" and [row[-1] for row in rows[1:]] == [mode, mode]
    assert "larger of the two directed 95th percentiles" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    assert "MONAI's definition" in capsys.readouterr().out
