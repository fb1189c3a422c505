"""benchmarks/loader.py: both loaders run on the same tiny synthetic task and the table is printed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("loader_benchmark", REPO / "benchmarks" / "loader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_task(tmp_path: Path) -> None:
    benchmark = load_benchmark()
    benchmark.write_synthetic_task(tmp_path, cases=2, shape=[20, 24, 28], patch_size=[16, 16, 16], channels=3)
    image, label = np.load(tmp_path / "case_001_x.npy"), np.load(tmp_path / "case_001_y.npy")
    assert image.shape == (3, 20, 24, 28) and image.dtype == np.float32
    assert label.shape == (1, 20, 24, 28) and set(np.unique(label)) == {0, 1, 2}


def test_both_loaders_side_by_side(capsys) -> None:
    benchmark = load_benchmark()
    results = benchmark.compare(benchmark.parse_args([
        "--cases", "3", "--shape", "20", "24", "24", "--patch_size", "16", "16", "16", "--channels", "2",
        "--batch_size", "2", "--num_workers", "1", "--batches", "3", "--warmup", "1", "--oversampling", "0.5"]))
    assert set(results) == {"DALI (this project)", "MONAI"}
    assert all(summary["throughput"] > 0 for summary in results.values())
    out = capsys.readouterr().out
    assert "ratio DALI / MONAI" in out and "patch [16, 16, 16], batch 2, 1 workers, 3 cases" in out


def test_one_loader_on_a_given_folder(tmp_path: Path) -> None:
    benchmark = load_benchmark()
    benchmark.write_synthetic_task(tmp_path, cases=2, shape=[20, 24, 24], patch_size=[16, 16, 16], channels=1)
    results = benchmark.compare(benchmark.parse_args(["--data", str(tmp_path), "--loaders", "dali", "--batches",
                                                      "2", "--warmup", "0", "--num_workers", "1"]))
    assert list(results) == ["DALI (this project)"]


def test_missing_data_exits_with_one_line(tmp_path: Path, capsys) -> None:
    assert load_benchmark().main(["--data", str(tmp_path / "missing"), "--loaders", "dali"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.strip().count("\n") == 0 and "does not exist" in error


def test_a_negative_warmup_is_refused(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        load_benchmark().parse_args(["--warmup", "-1"])
    assert stop.value.code == 2 and "--warmup" in capsys.readouterr().err
