"""benchmarks/memory.py at a tiny size: preprocessing peaks with one and two workers, and memory across epochs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("memory_benchmark", REPO / "benchmarks" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_raw_task_has_the_small_cases_and_the_large_one(tmp_path: Path) -> None:
    import nibabel as nib

    task = load_benchmark().write_task(tmp_path, cases=2, size=16, big=[40, 36, 30])
    large = nib.load(str(task / "imagesTr" / "large.nii.gz"))
    assert large.shape == (40, 36, 30) and large.header.get_zooms() == (0.8, 0.8, 1.0)
    label = np.asanyarray(nib.load(str(task / "labelsTr" / "case_001.nii.gz")).dataobj)
    assert set(np.unique(label)) == {0, 1}


def test_peaks_per_worker_and_across_epochs(tmp_path: Path, capsys) -> None:
    report = load_benchmark().main(["--cases", "5", "--size", "16", "--big", "40", "36", "30", "--jobs", "1", "2",
                                    "--epochs", "3", "--train_batches", "1", "--workdir", str(tmp_path / "new")])
    one, two = report["preprocess"]
    # Each process holds at least the libraries (over 50 MiB); one worker's peak is at most the single process's
    # plus slack, as it does the same work on fewer cases.
    assert one["parent"] > 50 * 2**20 and one["worker"] == 0
    assert two["worker"] > 50 * 2**20 and two["worker"] < one["parent"] + 100 * 2**20
    assert two["tree"] >= two["parent"]
    assert len(report["training"]) == 3 and all(rss > 0 for rss in report["training"])
    out = capsys.readouterr().out
    assert "largest case: float32 image" in out and "epoch 2 -> epoch 3" in out
    assert not list((tmp_path / "new").iterdir())  # the --workdir is created, the temporary data removed
