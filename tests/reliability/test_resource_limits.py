"""Inputs that ask for more than the machine has, and runs that compete for one folder: a one-line error before
any large allocation or output, never a traceback after minutes."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import evaluate
import main
import preprocess
from data_preprocessing import preprocessor
from tests.factories import blob_case, write_msd_task
from utils.io import folder_lock
from utils.nifti import NiftiError, load_nifti

ROOT = Path(__file__).resolve().parents[2]
HUGE_SHAPE = (800, 800, 400, 2)  # 2 GB of float32 declared by a file of a few hundred bytes


def one_line_error(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and "Traceback" not in error, error
    return error


def write_lying_nifti(path: Path, shape=HUGE_SHAPE) -> None:
    """A NIfTI file whose header declares `shape` float32 but that holds a few kB of data."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    content = header.binaryblock + b"\0" * 4 + b"\0" * 4000
    path.write_bytes(gzip.compress(content) if path.name.endswith(".gz") else content)


@pytest.mark.parametrize("name", ["lying.nii.gz", "lying.nii"])
def test_a_header_larger_than_its_file_is_refused_before_reading(tmp_path, name):
    write_lying_nifti(tmp_path / name)
    tracemalloc.start()
    try:
        with pytest.raises(NiftiError, match=rf"{name}: its header declares 800x800x400x2 float32 \(2.0 GB\)"):
            load_nifti(tmp_path / name)
        assert tracemalloc.get_traced_memory()[1] < 50e6
    finally:
        tracemalloc.stop()


def test_ordinary_and_multi_member_files_load(tmp_path):
    data = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "a.nii")
    # Two gzip members (a concatenation): the trailer alone describes only the last one.
    raw = (tmp_path / "a.nii").read_bytes()
    (tmp_path / "b.nii.gz").write_bytes(gzip.compress(raw[:200]) + gzip.compress(raw[200:]))
    for name in ("a.nii.gz", "a.nii", "b.nii.gz"):
        assert np.array_equal(load_nifti(tmp_path / name).get_fdata(), data)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak memory read from Linux's /proc")
def test_preprocess_refuses_the_lying_file_in_one_line_with_little_memory(tmp_path):
    write_msd_task(tmp_path / "raw", "Task61_Lying", [blob_case(f"case_{i}", seed=i) for i in range(2)])
    lying = tmp_path / "raw" / "Task61_Lying" / "imagesTr" / "case_1.nii.gz"
    write_lying_nifti(lying)
    # VmHWM, the peak resident memory of this program (ru_maxrss would include the pytest process it forked from).
    code = ("import sys, preprocess; code = preprocess.main(sys.argv[1:]); "
            "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, "--task", "61", "--data", str(tmp_path / "raw"),
                             "--results", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1, result.stderr[-2000:]
    error = result.stderr.strip()
    assert error.startswith("error: case_1: ") and "\n" not in error and str(lying) in error, error
    assert "declares 800x800x400x2 float32" in error
    assert int(result.stdout.split()[-1]) * 1024 < 300e6  # kB; 2.2 GB when the data was read before the check


def test_evaluate_refuses_the_lying_file_in_one_line(tmp_path, capsys):
    for folder in ("preds", "lbls"):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), tmp_path / folder / "a.nii.gz")
    write_lying_nifti(tmp_path / "preds" / "a.nii.gz")
    tracemalloc.start()
    try:
        assert evaluate.main(["--preds", str(tmp_path / "preds"), "--lbls", str(tmp_path / "lbls")]) == 1
        assert tracemalloc.get_traced_memory()[1] < 50e6
    finally:
        tracemalloc.stop()
    error = one_line_error(capsys)
    assert f"cannot read prediction {tmp_path / 'preds' / 'a.nii.gz'}: its header declares" in error


# ---------------------------------------------------------------------------------------------
# A plan larger than the machine
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_task(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plan")
    write_msd_task(root / "raw", "Task62_Plan", [blob_case(f"case_{i}", seed=i) for i in range(2)])
    assert preprocess.main(["--task", "62", "--data", str(root / "raw"), "--results", str(root / "data")]) == 0
    return root


def test_preprocess_refuses_an_absurd_plan_before_writing(small_task, tmp_path, capsys):
    plan = json.loads((small_task / "data" / "62_3d" / "config.json").read_text())
    plan["patch_size"] = [4096, 4096, 4096]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    argv = ["--task", "62", "--data", str(small_task / "raw"), "--results", str(tmp_path / "out"),
            "--plan", str(tmp_path / "plan.json")]
    assert preprocess.main(argv) == 1
    error = one_line_error(capsys)
    assert "[4096, 4096, 4096]" in error and "TB of memory but this machine has" in error
    assert not (tmp_path / "out").exists()


def test_training_refuses_an_absurd_plan_before_any_output(small_task, tmp_path, capsys):
    data = tmp_path / "62_3d"
    data.mkdir()
    for path in (small_task / "data" / "62_3d").iterdir():
        if path.is_file():
            (data / path.name).write_bytes(path.read_bytes())
    config = json.loads((data / "config.json").read_text())
    config["patch_size"] = [4096, 4096, 4096]
    (data / "config.json").write_text(json.dumps(config))
    results = tmp_path / "results"
    assert main.main(["--exec_mode", "train", "--data", str(data), "--results", str(results), "--nfolds", "2"]) == 1
    error = one_line_error(capsys)
    assert "needs at least" in error and "choose a smaller patch_size" in error
    assert not results.exists()


# ---------------------------------------------------------------------------------------------
# Two runs on one output folder
# ---------------------------------------------------------------------------------------------
def test_a_second_preprocess_run_on_a_busy_folder_stops_in_one_line(small_task, tmp_path, capsys):
    folder = tmp_path / "out" / "62_3d"
    argv = ["--task", "62", "--data", str(small_task / "raw"), "--results", str(tmp_path / "out")]
    # The lock another run would hold: flock locks of two open descriptors exclude each other, also in one process.
    with folder_lock(folder, "held by the test"):
        assert preprocess.main(argv) == 1
        error = one_line_error(capsys)
        assert f"another preprocess.py run is writing {folder}" in error
        assert not list(folder.glob("*.npy"))
    assert preprocess.main(argv) == 0  # once it is free
    assert len(list(folder.glob("*_x.npy"))) == 2
    assert not list(folder.glob(".*"))


def test_the_lock_is_released_when_a_run_fails(small_task, tmp_path):
    raw = tmp_path / "raw"
    write_msd_task(raw, "Task62_Plan", [blob_case("case_0")])
    (raw / "Task62_Plan" / "imagesTr" / "case_0.nii.gz").write_bytes(b"not a nifti file")
    argv = ["--task", "62", "--data", str(raw), "--results", str(tmp_path / "out")]
    assert preprocess.main(argv) == 1
    assert not (tmp_path / "out").exists()  # the failed run created the folder and removed it, empty
    with folder_lock(preprocessor.output_dir(tmp_path / "out", "62", 3), "still locked"):
        pass
