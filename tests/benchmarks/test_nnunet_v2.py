"""benchmarks/nnunet_v2.py and nnunet_v2_steps.py: finding the peer, its raw layout, its plans, its step timings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from benchmarks import nnunet_v2, nnunet_v2_steps
from tests.factories import blob_case, write_msd_task

SPEC = {"patch_size": [16, 24, 16], "spacing": [2.0, 1.0, 1.0], "in_channels": 2, "n_class": 3,
        "kernels": [[1, 3, 3], [3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        "filters": [4, 8, 16], "batch_size": 2}


def test_a_missing_peer_is_skipped_with_the_reason(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NNUNET_PYTHON", raising=False)
    python, why = nnunet_v2.find_python(None)
    assert python is None and "--nnunet_python" in why
    assert nnunet_v2.find_python(str(tmp_path / "python"))[1].endswith("does not exist")
    # This project's Python has no nnunetv2.
    python, why = nnunet_v2.find_python(sys.executable)
    assert python is None and "nnunetv2 does not import" in why and "ModuleNotFoundError" in why


def test_the_peer_is_taken_from_the_environment(monkeypatch, tmp_path: Path) -> None:
    package = tmp_path / "site" / "nnunetv2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    monkeypatch.setenv("NNUNET_PYTHON", sys.executable)
    assert nnunet_v2.find_python(None) == (sys.executable, "")


def test_convert_task_writes_one_file_per_channel(tmp_path: Path) -> None:
    cases = [blob_case(f"case_{i}", channels=2, seed=i, spacing=(1.0, 1.0, 2.5)) for i in range(2)]
    task = write_msd_task(tmp_path, "Task07_Blobs", cases, modality={"0": "T2", "1": "ADC"})
    name = nnunet_v2.convert_task(task.root, tmp_path / "raw", dataset_id=123)
    assert name == "Dataset123_Blobs"
    folder = tmp_path / "raw" / name
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "T2", "1": "ADC"} and dataset["numTraining"] == 2
    assert dataset["labels"] == {"background": 0, "organ": 1, "lesion": 2} and dataset["file_ending"] == ".nii.gz"
    source = nib.load(task.root / "imagesTr" / "case_1.nii.gz")
    for channel in range(2):
        written = nib.load(folder / "imagesTr" / f"case_1_{channel:04d}.nii.gz")
        assert np.array_equal(np.asanyarray(written.dataobj), np.asanyarray(source.dataobj)[..., channel])
        assert np.allclose(written.affine, source.affine)
    label = nib.load(folder / "labelsTr" / "case_1.nii.gz")
    assert np.array_equal(np.asanyarray(label.dataobj), cases[1].label)


def test_preprocess_command_and_environment(tmp_path: Path) -> None:
    command = nnunet_v2.preprocess_command("/peer/python", 900, 2)
    assert command[0] == "/peer/python" and command[1] == "-c"
    assert command[3:] == ["-d", "900", "-c", "3d_fullres", "-np", "2", "-npfp", "2", "--no_pbar"]
    env = nnunet_v2.environment(tmp_path)
    assert all(Path(env[name]).is_dir() and Path(env[name]).parent == tmp_path for name in nnunet_v2.FOLDERS)


def test_plans_describe_the_same_network() -> None:
    config = {"patch_size": SPEC["patch_size"], "spacing": SPEC["spacing"], "in_channels": 2, "n_class": 3}
    spec = nnunet_v2.network_spec(config, SPEC["kernels"], SPEC["strides"], SPEC["filters"], 2)
    assert spec == SPEC
    plans = nnunet_v2_steps.plans(spec)
    configuration = plans["configurations"]["3d_fullres"]
    arch = configuration["architecture"]["arch_kwargs"]
    assert configuration["patch_size"] == [16, 24, 16] and configuration["batch_size"] == 2
    assert arch["n_stages"] == 3 and arch["kernel_sizes"] == SPEC["kernels"] and arch["strides"] == SPEC["strides"]
    assert arch["features_per_stage"] == [4, 8, 16] and arch["n_conv_per_stage"] == [2, 2, 2]
    assert arch["n_conv_per_stage_decoder"] == [2, 2] and arch["norm_op_kwargs"]["affine"]
    assert nnunet_v2_steps.dataset_json(spec)["labels"] == {"background": 0, "class 1": 1, "class 2": 2}


def test_time_steps_reads_the_last_line_and_reports_failures(tmp_path: Path, monkeypatch) -> None:
    script = tmp_path / "steps.py"
    script.write_text("import json, sys\nspec = json.load(open(sys.argv[1]))\nprint('log line')\n"
                      "print(json.dumps({'seconds': [0.25] * spec['steps']}))\n")
    monkeypatch.setattr(nnunet_v2, "STEPS_SCRIPT", script)
    spec = {**SPEC, "mode": "train", "steps": 3, "warmup": 1, "threads": 1}
    assert nnunet_v2.time_steps(sys.executable, spec, tmp_path / "work") == [0.25, 0.25, 0.25]
    assert json.loads((tmp_path / "work" / "spec_train.json").read_text())["workdir"] == str(tmp_path / "work")
    script.write_text("import sys\nprint('no plans found', file=sys.stderr)\nsys.exit(2)\n")
    with pytest.raises(RuntimeError, match="no plans found"):
        nnunet_v2.time_steps(sys.executable, spec, tmp_path / "work")
