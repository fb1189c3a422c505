import base64
import errno
import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import preprocess
from data_preprocessing.layouts import CaseFiles, PreprocessingError
from data_preprocessing.preprocessor import preprocess_task
from data_preprocessing.transforms import nonzero_box, normalise, pad_to
from data_preprocessing.workers import run_parallel, worker_pool
from tests.factories import blob_case, write_msd_task
from utils.io import WriteError

ROOT = Path(__file__).resolve().parents[2]


def load_case_files(folder: Path, case_id: str):
    meta = json.loads((folder / f"{case_id}_meta.json").read_text())
    image = np.load(folder / f"{case_id}_x.npy")
    label_path = folder / f"{case_id}_y.npy"
    label = np.load(label_path) if label_path.exists() else None
    return image, label, meta


def invert_without_resampling(label: np.ndarray, meta: dict) -> np.ndarray:
    """Undo padding, cropping and the transposition for a case whose spacing was kept."""
    (d0, d1), (h0, h1), (w0, w1) = [[before, size - after] for (before, after), size in
                                     zip(meta["pad"], meta["shape"])]
    unpadded = label[0, d0:d1, h0:h1, w0:w1]
    full = np.zeros(meta["original_shape"][::-1], np.uint8)
    (a0, a1), (b0, b1), (c0, c1) = meta["crop_box"]
    full[a0:a1, b0:b1, c0:c1] = unpadded
    return full.transpose(2, 1, 0)


@pytest.fixture
def isotropic_task(tmp_path):
    cases = [blob_case(f"case_{i}", shape=(20 + 2 * i, 18, 14), seed=i, channels=2) for i in range(3)]
    tests = [blob_case("unseen_0", shape=(22, 18, 14), seed=9, channels=2)]
    return write_msd_task(tmp_path / "raw", "Task42_Blobs", cases, tests, modality={"0": "T1", "1": "T2"})


def test_nonzero_box_matches_argwhere():
    rng = np.random.default_rng(0)
    image = np.zeros((2, 10, 12, 14), np.float32)
    image[0, 2:5, 3:9, 1:4] = rng.random((3, 6, 3)) + 0.1
    image[1, 6:8, 4:5, 2:12] = 1
    points = np.argwhere((image != 0).any(0))
    expected = [[int(lo), int(hi) + 1] for lo, hi in zip(points.min(0), points.max(0))]
    assert nonzero_box(image) == expected
    label = np.zeros((10, 12, 14), np.uint8)
    label[9, 0, 13] = 1
    assert nonzero_box(image, label) == [[2, 10], [0, 9], [1, 14]]
    assert nonzero_box(np.zeros((1, 3, 4, 5))) == [[0, 3], [0, 4], [0, 5]]


def test_ct_normalisation_clips_then_standardises():
    image = np.array([[[[-2000.0, 0.0, 50.0, 400.0]]]], np.float32)
    scheme = {"type": "ct", "clip_low": -100.0, "clip_high": 300.0, "mean": 50.0, "std": 25.0}
    out = normalise(image.copy(), np.ones((1, 1, 4), bool), [scheme])
    np.testing.assert_allclose(out[0, 0, 0], [(-100 - 50) / 25, -2, 0, (300 - 50) / 25])


def test_zscore_uses_the_body_only():
    rng = np.random.default_rng(0)
    image = np.zeros((2, 6, 6, 6), np.float32)
    body = np.zeros((6, 6, 6), bool)
    body[1:5, 1:5, 1:5] = True
    image[0][body] = rng.normal(40, 7, body.sum())
    image[1][body] = rng.normal(-3, 2, body.sum())
    out = normalise(image.copy(), body, [{"type": "zscore"}] * 2)
    for channel in range(2):
        assert out[channel][body].mean() == pytest.approx(0, abs=1e-5)
        assert out[channel][body].std() == pytest.approx(1, abs=1e-4)
        assert (out[channel][~body] == 0).all()


def test_pad_to_is_symmetric():
    assert pad_to([10, 20, 5], [16, 8, 8]) == [[3, 3], [0, 0], [1, 2]]


def test_training_round_trip_restores_the_original_label(isotropic_task, tmp_path):
    summary = preprocess_task(isotropic_task.root.parent, tmp_path / "out", "42", dim=3, n_jobs=1)
    folder = tmp_path / "out" / "42_3d"
    assert summary.folder == folder and summary.written == 3
    config = json.loads((folder / "config.json").read_text())
    assert config["in_channels"] == 2 and config["n_class"] == 3 and config["spacing"] == [1.0, 1.0, 1.0]
    assert config["normalization"] == [{"type": "zscore"}, {"type": "zscore"}]
    for case in isotropic_task.cases:
        image, label, meta = load_case_files(folder, case.case_id)
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert image.shape[0] == 2 and label.shape == (1, *image.shape[1:])
        assert all(s >= p for s, p in zip(image.shape[1:], config["patch_size"]))
        assert meta["original_shape"] == list(case.label.shape)
        source = nib.load(str(isotropic_task.root / "imagesTr" / f"{case.case_id}.nii.gz"))
        np.testing.assert_allclose(meta["affine"], source.affine)
        assert base64.b64decode(meta["nifti_header"]) == source.header.binaryblock
        assert meta["crop_box"] != [[0, n] for n in case.label.shape[::-1]]  # the zero margin was cropped
        np.testing.assert_array_equal(invert_without_resampling(label, meta), case.label)


def test_anisotropic_cases_are_resampled_with_order_zero_along_the_slices(tmp_path):
    cases = [blob_case(f"case_{i}", shape=(32, 32, 12), spacing=(1.0, 1.0, 3.0), seed=i) for i in range(3)]
    task = write_msd_task(tmp_path / "raw", "Task43_Thick", cases)
    preprocess_task(task.root.parent, tmp_path / "out", "43", dim=3)
    config = json.loads((tmp_path / "out" / "43_3d" / "config.json").read_text())
    assert config["spacing"] == [3.0, 1.0, 1.0]
    _, label, meta = load_case_files(tmp_path / "out" / "43_3d", "case_0")
    assert meta["separate_z"] == 0 and meta["original_spacing"] == [3.0, 1.0, 1.0]
    assert set(np.unique(label)) <= {0, 1, 2}


def test_upsampled_case_keeps_its_geometry(tmp_path):
    cases = [blob_case("thick", shape=(20, 20, 8), spacing=(1.0, 1.0, 2.0)),
             *[blob_case(f"fine_{i}", shape=(20, 20, 16), seed=i) for i in range(2)]]
    task = write_msd_task(tmp_path / "raw", "Task44_Mixed", cases)
    preprocess_task(task.root.parent, tmp_path / "out", "44", dim=3)
    _, label, meta = load_case_files(tmp_path / "out" / "44_3d", "thick")
    assert meta["target_spacing"] == [1.0, 1.0, 1.0]
    d0, d1 = meta["crop_box"][0]
    assert meta["resampled_shape"][0] == 2 * (d1 - d0)
    assert meta["separate_z"] is None


def test_2d_resamples_in_plane_only(tmp_path):
    cases = [blob_case(f"case_{i}", shape=(20, 16, 10), spacing=(0.5, 0.5, 2.5 + i), seed=i) for i in range(3)]
    task = write_msd_task(tmp_path / "raw", "Task45_Slices", cases)
    preprocess_task(task.root.parent, tmp_path / "out", "45", dim=2)
    folder = tmp_path / "out" / "45_2d"
    config = json.loads((folder / "config.json").read_text())
    assert config["dim"] == 2 and len(config["patch_size"]) == 2
    _, _, meta = load_case_files(folder, "case_2")
    assert meta["target_spacing"][0] == meta["original_spacing"][0] == 4.5
    assert meta["resampled_shape"][0] == meta["crop_box"][0][1] - meta["crop_box"][0][0]


def test_ct_statistics_are_planned_from_foreground(tmp_path):
    cases = [blob_case(f"case_{i}", seed=i, ct=True) for i in range(3)]
    task = write_msd_task(tmp_path / "raw", "Task46_CT", cases, modality={"0": "CT"})
    preprocess_task(task.root.parent, tmp_path / "out", "46", dim=3)
    scheme = json.loads((tmp_path / "out" / "46_3d" / "config.json").read_text())["normalization"][0]
    foreground = np.concatenate([c.image[c.label > 0] for c in cases])
    assert scheme["type"] == "ct"
    assert scheme["mean"] == pytest.approx(foreground.mean(), rel=1e-3)
    assert scheme["std"] == pytest.approx(foreground.std(), rel=1e-3)
    assert scheme["clip_low"] == pytest.approx(np.percentile(foreground, 0.5), rel=1e-3)


def test_test_mode_writes_unpadded_unlabelled_cases(isotropic_task, tmp_path):
    preprocess_task(isotropic_task.root.parent, tmp_path / "out", "42", exec_mode="test")
    folder = tmp_path / "out" / "42_3d" / "test"
    image, label, meta = load_case_files(folder, "unseen_0")
    assert label is None and meta["label"] is None
    assert meta["pad"] == [[0, 0]] * 3 and list(image.shape[1:]) == meta["resampled_shape"]
    preprocess_task(isotropic_task.root.parent, tmp_path / "out", "42", exec_mode="val")
    assert sorted(p.name for p in (tmp_path / "out" / "42_3d" / "val").glob("*_x.npy")) == [
        f"case_{i}_x.npy" for i in range(3)]


def test_rerun_skips_finished_cases_and_redoes_damaged_ones(isotropic_task, tmp_path):
    out = tmp_path / "out"
    preprocess_task(isotropic_task.root.parent, out, "42")
    damaged = out / "42_3d" / "case_1_y.npy"
    damaged.write_bytes(damaged.read_bytes()[:100])
    (out / "42_3d" / ".case_2_x.npy.abc.tmp").write_bytes(b"partial")
    summary = preprocess_task(isotropic_task.root.parent, out, "42")
    assert (summary.written, summary.skipped) == (1, 2)
    assert np.load(damaged).ndim == 4
    assert not list((out / "42_3d").glob("*.tmp"))
    assert preprocess_task(isotropic_task.root.parent, out, "42", overwrite=True).written == 3


def test_parallel_workers_give_the_same_arrays(isotropic_task, tmp_path):
    preprocess_task(isotropic_task.root.parent, tmp_path / "one", "42", n_jobs=1)
    preprocess_task(isotropic_task.root.parent, tmp_path / "two", "42", n_jobs=2)
    for case in isotropic_task.cases:
        for suffix in ("_x.npy", "_y.npy"):
            np.testing.assert_array_equal(np.load(tmp_path / "one" / "42_3d" / f"{case.case_id}{suffix}"),
                                          np.load(tmp_path / "two" / "42_3d" / f"{case.case_id}{suffix}"))


def test_overwrite_on_the_command_line_plans_again_and_redoes_every_case(isotropic_task, tmp_path, capsys):
    argv = ["--task", "42", "--data", str(isotropic_task.root.parent), "--results", str(tmp_path / "out"),
            "--n_jobs", "1"]
    assert preprocess.main(argv) == 0
    folder = tmp_path / "out" / "42_3d"
    image_path, config_path = folder / "case_0_x.npy", folder / "config.json"
    preprocessed, planned = np.load(image_path), json.loads(config_path.read_text())
    np.save(image_path, np.zeros_like(preprocessed))  # complete, so only --overwrite replaces it
    edited = {**planned, "batch_size": planned["batch_size"] + 1}  # an edit that leaves the cases valid
    config_path.write_text(json.dumps(edited))
    capsys.readouterr()

    assert preprocess.main(argv) == 0
    assert "0 case(s) written, 3 already done" in capsys.readouterr().out
    assert not np.load(image_path).any() and json.loads(config_path.read_text()) == edited

    assert preprocess.main([*argv, "--overwrite"]) == 0
    assert "3 case(s) written, 0 already done" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(image_path), preprocessed)
    assert json.loads(config_path.read_text()) == planned  # planned again: the edit is gone


def fail_to_write(case: CaseFiles) -> str:
    raise WriteError(f"/out/{case.case_id}_x.npy", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))


def die_on_case_1(case: CaseFiles) -> str:
    if case.case_id == "case_1":
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel does to a process that runs out of memory
    return case.case_id


def test_failures_in_workers_reach_the_parent_as_one_line_errors():
    cases = [(CaseFiles(f"case_{i}", "x.nii.gz", None),) for i in range(2)]
    with worker_pool(2) as pool:  # one pool for both checks: starting workers is the slow part
        with pytest.raises(WriteError) as caught:
            run_parallel(fail_to_write, cases, pool, "preprocessing Task42_Blobs")
        assert str(caught.value) in {f"cannot write /out/case_{i}_x.npy: No space left on device" for i in range(2)}
        assert caught.value.errno == errno.ENOSPC

        # A worker killed from outside (out of memory) breaks the pool; the error names the case.
        with pytest.raises(PreprocessingError) as caught:
            run_parallel(die_on_case_1, cases, pool, "preprocessing Task42_Blobs")
        message = str(caught.value)
        assert "case_1" in message and "lower --n_jobs" in message and "\n" not in message


def corrupt(task, case_id, how):
    root = task.root
    image_path = root / "imagesTr" / f"{case_id}.nii.gz"
    label_path = root / "labelsTr" / f"{case_id}.nii.gz"
    case = next(c for c in task.cases if c.case_id == case_id)
    affine = case.image_affine()
    if how == "missing file":
        image_path.unlink()
    elif how == "shape mismatch":
        nib.save(nib.Nifti1Image(case.label[:-2].astype(np.uint8), affine), str(label_path))
    elif how == "affine mismatch":
        shifted = affine.copy()
        shifted[0, 3] += 5
        nib.save(nib.Nifti1Image(case.label.astype(np.uint8), shifted), str(label_path))
    elif how == "nan voxels":
        image = case.image.copy()
        image[3, 3, 3] = np.nan
        nib.save(nib.Nifti1Image(image, affine), str(image_path))
    elif how == "undeclared label":
        label = case.label.copy()
        label[5, 5, 5] = 7
        nib.save(nib.Nifti1Image(label, affine), str(label_path))
    elif how == "fractional label":
        nib.save(nib.Nifti1Image(case.label.astype(np.float32) * 0.5, affine), str(label_path))
    elif how == "4D label":
        nib.save(nib.Nifti1Image(np.stack([case.label] * 2, -1), affine), str(label_path))
    elif how == "2D image":
        nib.save(nib.Nifti1Image(case.image[:, :, 0, 0], affine), str(image_path))
    elif how == "corrupt gzip":
        data = image_path.read_bytes()
        image_path.write_bytes(data[: len(data) // 2])
    elif how == "not gzip":
        image_path.write_bytes(gzip.compress(b"this is not a NIfTI file"))


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing file", "does not exist"),
        ("shape mismatch", "does not match label shape"),
        ("affine mismatch", "affines differ"),
        ("nan voxels", "NaN"),
        ("undeclared label", "[7] are not declared"),
        ("fractional label", "non-integer"),
        ("4D label", "expected a 3D volume"),
        ("2D image", "expected a 3D volume"),
        ("corrupt gzip", "cannot read"),
        ("not gzip", "cannot read"),
    ],
)
def test_bad_cases_fail_with_one_line_naming_the_case(isotropic_task, tmp_path, capsys, how, message):
    corrupt(isotropic_task, "case_1", how)
    argv = ["--task", "42", "--data", str(isotropic_task.root.parent), "--results", str(tmp_path / "out")]
    assert preprocess.main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: case_1") and message in error and "\n" not in error
    assert not list((tmp_path / "out" / "42_3d").glob("case_1*"))
    assert not list((tmp_path / "out" / "42_3d").glob(".*tmp"))


@pytest.mark.parametrize(
    "content, message",
    [(None, "dataset.json is missing"), ("{not json", "not valid JSON"),
     (json.dumps({"labels": {"0": "bg"}, "training": []}), "no 'modality'"),
     (json.dumps({"modality": {"0": "MRI"}, "labels": {"1": "x"}, "training": []}), "background value 0")],
)
def test_malformed_dataset_json(tmp_path, capsys, content, message):
    task = tmp_path / "raw" / "Task47_Bad"
    task.mkdir(parents=True)
    if content is not None:
        (task / "dataset.json").write_text(content)
    assert preprocess.main(["--task", "47", "--data", str(tmp_path / "raw"), "--results", str(tmp_path)]) == 1
    assert message in capsys.readouterr().err


def test_missing_task_and_cli_exit_code(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "preprocess.py"), "--task", "09", "--data", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: no folder Task09_* or Dataset009_* for task '09' in {tmp_path}; "
                                     f"download it or pass --data")


def test_unknown_labels_error_is_raised_in_the_api(isotropic_task, tmp_path):
    corrupt(isotropic_task, "case_0", "undeclared label")
    with pytest.raises(PreprocessingError, match="case_0"):
        preprocess_task(isotropic_task.root.parent, tmp_path / "out", "42")
