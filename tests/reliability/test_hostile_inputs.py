"""Odd and hostile inputs through the entry points: a clear one-line error or a documented correct result, and
never a half-written output.

Covered elsewhere and not repeated here: corrupted, 2D, 4D, NaN and fractional-label NIfTI files in preprocessing
(tests/data_preprocessing/test_preprocessor.py), more folds than cases and wrong shapes in the data module
(tests/data_loading/test_data_module.py), unsafe archives (tests/data_preprocessing/test_fetch.py).
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import download
import evaluate
import main
import preprocess
from data_preprocessing import transforms
from nnunet.run import evaluate as evaluate_checkpoint
from tests.conftest import train_argv
from tests.factories import blob_case, write_msd_task
from utils import args as cli
from utils.args import parse_main_args


def run_evaluate(args) -> dict:
    return evaluate_checkpoint(cli.loader_settings(args), args.ckpt_path, cli.model_flags(args),
                               cli.inference_settings(args), cli.device_settings(args))


def one_line_error(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and "Traceback" not in error, error
    return error


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ---------------------------------------------------------------------------------------------
# A task of odd cases: smaller than the patch in every axis, empty labels
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def odd_task(tmp_path_factory) -> Path:
    """Preprocessed task 45: three ordinary cases, a tiny one (6 x 5 x 4 voxels, far below the patch), an ordinary
    one and a tiny one with empty labels, and a tiny test case. Fold 0 validates an ordinary and the tiny empty
    case, fold 1 the tiny empty case alone."""
    root = tmp_path_factory.mktemp("odd")
    cases = [blob_case(f"case_{i}", shape=(24, 20, 16), seed=i) for i in range(3)]
    cases.append(blob_case("tiny_0", shape=(6, 5, 4), seed=3, margin=1))
    cases.append(blob_case("empty_0", shape=(24, 20, 16), seed=4))
    cases.append(blob_case("tiny_empty", shape=(6, 5, 4), seed=5, margin=1))
    for case in cases[-2:]:
        case.label[:] = 0
    write_msd_task(root / "raw", "Task45_Odd", cases, [blob_case("tiny_test", shape=(6, 5, 4), seed=6, margin=1)])
    for mode in ("training", "test"):
        assert preprocess.main(["--task", "45", "--data", str(root / "raw"), "--results", str(root / "data"),
                                "--exec_mode", mode]) == 0
    data = root / "data" / "45_3d"
    patch = json.loads((data / "config.json").read_text())["patch_size"]
    assert all(size < edge for size, edge in zip((4, 5, 6), patch))  # (D, H, W) of the tiny cases
    (data / "splits.json").write_text(json.dumps([
        {"train": ["case_0", "case_1", "tiny_0", "empty_0"], "val": ["case_2", "tiny_empty"]},
        {"train": ["case_0", "case_1", "tiny_0", "empty_0"], "val": ["tiny_empty"]}]))
    return root


def test_tiny_cases_and_empty_labels_train_validate_and_predict(odd_task, tmp_path):
    data = odd_task / "data" / "45_3d"
    results = tmp_path / "results"
    # Every patch is asked to hold foreground, and two training cases have none.
    argv = ["--exec_mode", "train", "--data", str(data), "--results", str(results), "--epochs", "1",
            "--train_batches", "3", "--oversampling", "1.0", "--num_workers", "2", "--seed", "0", "--filters", "8",
            "16", "32", "--save_ckpt"]
    assert main.main(argv) == 0
    record = json.loads((results / "logs.json").read_text().splitlines()[-1][len("DLLL "):])["data"]
    assert np.isfinite(record["train_loss"]) and np.isfinite(record["val_loss"]) and len(record["dice"]) == 2

    # A network that predicts background everywhere: Dice 1 on the empty case, 0 where there is foreground.
    checkpoint = torch.load(results / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["state_dict"]["model.heads.0.conv.conv.weight"].zero_()
    checkpoint["state_dict"]["model.heads.0.conv.conv.bias"].copy_(torch.tensor([50.0, 0.0, 0.0]))
    torch.save(checkpoint, tmp_path / "background.ckpt")
    evaluate_argv = ["--exec_mode", "evaluate", "--data", str(data), "--results", str(tmp_path), "--num_workers", "2",
                     "--ckpt_path", str(tmp_path / "background.ckpt")]
    assert run_evaluate(parse_main_args([*evaluate_argv, "--fold", "1"]))["dice"] == [1.0, 1.0]
    assert run_evaluate(parse_main_args([*evaluate_argv, "--fold", "0"]))["dice"] == [0.5, 0.5]

    predictions = tmp_path / "predictions"
    assert main.main(["--exec_mode", "predict", "--data", str(data), "--results", str(predictions), "--num_workers",
                      "2", "--ckpt_path", str(results / "checkpoints" / "last.ckpt"), "--save_preds"]) == 0
    source = nib.load(str(odd_task / "raw" / "Task45_Odd" / "imagesTs" / "tiny_test.nii.gz"))
    written = nib.load(str(predictions / "predictions" / "tiny_test.nii.gz"))
    assert written.shape == source.shape == (6, 5, 4)
    np.testing.assert_allclose(written.affine, source.affine)


# ---------------------------------------------------------------------------------------------
# Damaged preprocessed files and impossible folds
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage, message", [
    ("truncated", "bytes but its header describes"),
    ("appended", "bytes but its header describes"),
    ("garbage", "is not a readable .npy file"),
])
def test_a_damaged_npy_is_named_before_training(synthetic_task, tmp_path, capsys, damage, message):
    data = tmp_path / "00_3d"
    shutil.copytree(synthetic_task.preprocessed(3), data)
    path = data / "synthetic_003_x.npy"
    content = path.read_bytes()
    path.write_bytes({"truncated": content[: len(content) // 2], "appended": content + b"\0" * 16,
                      "garbage": os.urandom(len(content))}[damage])
    assert main.main(train_argv(data, tmp_path / "results", "--epochs", "1")) == 1
    error = one_line_error(capsys)
    assert f"synthetic_003: {path} " in error and message in error and "re-run preprocess.py" in error
    assert not (tmp_path / "results" / "logs.json").exists()


def test_more_folds_than_cases_is_refused_by_main(synthetic_task, tmp_path, capsys):
    assert main.main(train_argv(synthetic_task.preprocessed(3), tmp_path, "--nfolds", "20")) == 1
    assert "--nfolds 20 needs at least 20 cases but there are 8" in one_line_error(capsys)


# ---------------------------------------------------------------------------------------------
# Extreme intensities
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("modality, ct", [("MRI", False), ("CT", True)])
def test_extreme_intensity_outliers_stay_finite_and_keep_the_contrast(tmp_path, monkeypatch, modality, ct):
    def cases(outliers: bool):
        made = [blob_case(f"case_{i}", shape=(24, 20, 16), seed=i, ct=ct, spacing=(1.0, 1.0, 1.0 + 0.5 * i))
                for i in range(3)]
        if outliers:  # one voxel at 1e30 and a few at +-1e6, inside the body and the foreground
            made[0].image[12, 10, 8], made[0].image[11, 10, 8] = 1e30, 1e6
            made[0].image[10, 9, 7], made[0].image[13, 11, 9] = -1e6, 1e6
        return made

    for name, outliers in (("clean", False), ("hostile", True)):
        write_msd_task(tmp_path / name, "Task46_Bright", cases(outliers), modality={"0": modality})
        assert preprocess.main(["--task", "46", "--data", str(tmp_path / name), "--results",
                                str(tmp_path / f"out_{name}"), "--n_jobs", "1"]) == 0
    clean, hostile = (np.load(tmp_path / f"out_{name}" / "46_3d" / "case_0_x.npy") for name in ("clean", "hostile"))
    assert np.isfinite(hostile).all() and np.abs(hostile).max() < 50
    # Away from the four corrupt voxels the normalised image is the clean one, up to a small change of scale.
    assert np.corrcoef(clean.ravel(), hostile.ravel())[0, 1] > 0.95
    assert np.median(np.abs(clean - hostile)) < 0.05
    configs = [json.loads((tmp_path / f"out_{name}" / "46_3d" / "config.json").read_text())
               for name in ("clean", "hostile")]
    if ct:  # the dataset statistics of the CT channel are barely moved by the outliers
        assert all(np.isfinite(configs[1]["normalization"][0][key]) for key in ("mean", "std"))
        assert configs[1]["normalization"][0]["std"] == pytest.approx(configs[0]["normalization"][0]["std"], rel=0.05)

    # The fence leaves ordinary images as they were without it (one process: the patch applies to this one only).
    monkeypatch.setattr(transforms, "clip_outliers", lambda image, body: image)
    assert preprocess.main(["--task", "46", "--data", str(tmp_path / "clean"), "--results",
                            str(tmp_path / "unfenced"), "--n_jobs", "1"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "unfenced" / "46_3d" / "case_0_x.npy"), clean)


# ---------------------------------------------------------------------------------------------
# Paths with spaces and non-ASCII characters, through every entry point
# ---------------------------------------------------------------------------------------------
def test_paths_with_spaces_and_non_ascii_characters(tmp_path, capsys):
    root = tmp_path / "Daten mit Leerzeichen ü é 日本"
    raw, data, results = root / "raw data", root / "pré processed", root / "résultats ü"
    assert download.main(["--task", "00", "--data", str(raw), "--n_cases", "4", "--n_test", "1", "--size", "32"]) == 0
    for mode in ("training", "test", "val"):
        assert preprocess.main(["--task", "00", "--data", str(raw), "--results", str(data), "--exec_mode", mode]) == 0
    task = data / "00_3d"
    assert main.main(train_argv(task, results, "--epochs", "1", "--train_batches", "2", "--save_ckpt")) == 0
    checkpoint = str(results / "checkpoints" / "last.ckpt")
    common = ["--results", str(results), "--num_workers", "2", "--ckpt_path", checkpoint]
    assert main.main(["--exec_mode", "evaluate", "--data", str(task), "--nfolds", "4", *common]) == 0
    # --nfolds 1: the val/ folder's cases of the one fold that validates on every case.
    assert main.main(["--exec_mode", "predict", "--data", str(task / "val"), "--nfolds", "1", "--save_preds",
                      *common]) == 0
    assert main.main(["--exec_mode", "predict", "--input", str(raw / "Task00_Synthetic" / "imagesTs"),
                      "--save_preds", *common]) == 0
    predictions = results / "predictions"
    assert len(list(predictions.glob("*.nii.gz"))) == 5  # four training cases and the test case
    for test_image in (raw / "Task00_Synthetic" / "imagesTs").iterdir():  # no label to score it against
        (predictions / test_image.name).unlink()
    assert evaluate.main(["--preds", str(predictions), "--lbls", str(raw / "Task00_Synthetic" / "labelsTr")]) == 0
    assert (predictions / "evaluation.csv").is_file()
    assert "error" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Outputs that cannot be written
# ---------------------------------------------------------------------------------------------
def test_a_results_path_that_is_a_file_fails_before_any_work(synthetic_task, trained, tmp_path, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    assert main.main(train_argv(synthetic_task.preprocessed(3), blocker, "--epochs", "1")) == 1
    assert f"cannot write {blocker / 'checkpoints'}" in one_line_error(capsys)
    assert main.main(["--exec_mode", "predict", "--data", str(synthetic_task.preprocessed(3)), "--results",
                      str(blocker), "--num_workers", "2", "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"),
                      "--save_preds"]) == 1
    assert f"cannot write {blocker / 'predictions'}" in one_line_error(capsys)
    assert preprocess.main(["--task", "00", "--data", str(synthetic_task.raw), "--results", str(blocker)]) == 1
    assert f"cannot write {blocker / '00_3d'}" in one_line_error(capsys)
    assert blocker.read_text() == "not a folder"


def test_a_read_only_results_folder_fails_before_training(synthetic_task, tmp_path, capsys, monkeypatch):
    results = tmp_path / "results"
    if os.geteuid() != 0:  # root writes into read-only folders: there the refusal is simulated below
        results.mkdir()
        results.chmod(0o555)
        try:
            assert main.main(train_argv(synthetic_task.preprocessed(3), results, "--epochs", "1")) == 1
            assert "Permission denied" in one_line_error(capsys)
        finally:
            results.chmod(0o755)

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("utils.io.tempfile.mkstemp", refuse)
    assert main.main(train_argv(synthetic_task.preprocessed(3), results, "--epochs", "1")) == 1
    assert f"cannot write {results / 'checkpoints'}: Read-only file system" in one_line_error(capsys)
    assert not list(results.rglob("*.json"))  # nothing started: no params.json, no logs.json


def test_a_full_disk_while_saving_a_checkpoint_leaves_no_partial_file(synthetic_task, tmp_path, capsys, monkeypatch):
    replace = os.replace

    def full_for_checkpoints(source, target, *args, **kwargs):
        if str(target).endswith(".ckpt"):
            no_space()
        return replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_for_checkpoints)
    results = tmp_path / "results"
    argv = train_argv(synthetic_task.preprocessed(3), results, "--epochs", "2", "--train_batches", "1", "--save_ckpt")
    assert main.main(argv) == 1
    error = one_line_error(capsys)
    assert f"cannot write {results / 'checkpoints' / 'last.ckpt'}: No space left on device" in error
    assert not (results / "checkpoints").exists()  # nothing was written in it, so the failed run removed it


def test_a_full_disk_while_preprocessing_leaves_no_partial_case(tmp_path, capsys, monkeypatch):
    cases = [blob_case(f"case_{i}", shape=(20, 18, 14), seed=i) for i in range(3)]
    write_msd_task(tmp_path / "raw", "Task48_Full", cases)
    # One process, so that the patched np.save below is the one that writes.
    argv = ["--task", "48", "--data", str(tmp_path / "raw"), "--results", str(tmp_path / "out"), "--n_jobs", "1"]
    save, calls = np.save, []

    def fills_up(handle, array, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # case_1's image: half of it is written, then the disk is full
            handle.write(b"\x93NUMPY" + b"\0" * 100)
            no_space()
        return save(handle, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", fills_up)
    assert preprocess.main(argv) == 1
    folder = tmp_path / "out" / "48_3d"
    assert f"cannot write {folder / 'case_1_x.npy'}: No space left on device" in one_line_error(capsys)
    assert not list(folder.glob("case_1*")) and not list(folder.glob(".*"))
    monkeypatch.setattr(np, "save", save)
    assert preprocess.main(argv) == 0
    assert all(np.load(folder / f"case_{i}_x.npy").ndim == 4 for i in range(3))


# ---------------------------------------------------------------------------------------------
# Raw images given to predict
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("defect, message", [
    ("cut gzip", "cannot read"),
    ("not nifti", "cannot read"),
    ("2D image", "expected a 3D volume"),
])
def test_bad_raw_images_for_prediction_are_named(trained, synthetic_task, tmp_path, capsys, defect, message):
    folder = tmp_path / "input"
    folder.mkdir()
    source = next((synthetic_task.task_dir / "imagesTs").glob("*.nii.gz"))
    path = folder / "bad case.nii.gz"
    if defect == "cut gzip":
        content = source.read_bytes()
        path.write_bytes(content[: len(content) // 3])
    elif defect == "not nifti":
        path.write_bytes(gzip.compress(b"\0" * 400))
    else:
        image = nib.load(str(source))
        nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj)[:, :, 0, 0], image.affine), str(path))
    argv = ["--exec_mode", "predict", "--input", str(folder), "--results", str(tmp_path / "out"), "--num_workers",
            "2", "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"), "--save_preds"]
    assert main.main(argv) == 1
    error = one_line_error(capsys)
    assert error.startswith("error: bad case") and message in error
    assert not list((tmp_path / "out").rglob("*.nii.gz"))
