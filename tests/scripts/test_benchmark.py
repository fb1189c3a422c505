"""scripts/benchmark.py --mode loader on a tiny task."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "benchmark.py"


def load_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_task(folder: Path, n_cases: int = 4) -> Path:
    folder.mkdir(parents=True)
    for index in range(n_cases):
        label = np.zeros((1, 20, 24, 24), np.uint8)
        label[0, 8:12, 8:12, 8:12] = 1
        image = np.random.default_rng(index).normal(size=(1, 20, 24, 24)).astype(np.float32)
        np.save(folder / f"case_{index}_x.npy", image)
        np.save(folder / f"case_{index}_y.npy", label)
    config = {"dim": 3, "in_channels": 1, "n_class": 2, "patch_size": [16, 16, 16]}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_loader_mode_reports_throughput(tmp_path: Path, capsys) -> None:
    data = tiny_task(tmp_path / "task")
    script = load_script()
    args = script.benchmark_parser().parse_args(["--mode", "loader", "--data", str(data), "--batch_size", "3",
                                                 "--batches", "4", "--warmup", "2", "--num_workers", "1",
                                                 "--nfolds", "2", "--seed", "0"])
    times = script.time_batches(range(10), warmup=2, batches=4)
    assert len(times) == 4
    summary = script.benchmark_loader(args)
    assert summary["batch_size"] == 3 and summary["patch_size"] == [16, 16, 16] and summary["throughput"] > 0
    assert summary["latency_99"] >= summary["latency_90"] and summary["device"] == "cpu"
    assert "patches/s" in capsys.readouterr().out


def test_bad_data_exits_with_one_line(tmp_path: Path, capsys) -> None:
    assert load_script().main(["--mode", "loader", "--data", str(tmp_path / "missing")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.strip().count("\n") == 0 and "does not exist" in error
