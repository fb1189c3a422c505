"""scripts/benchmark.py: the main.py commands of train and predict, each mode run on tiny settings."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY_FILTERS
from utils.args import parse_main_args

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
    config = {"dim": 3, "in_channels": 1, "n_class": 2, "patch_size": [16, 16, 16], "spacing": [1.0, 1.0, 1.0],
              "labels": {"0": "background", "1": "foreground"}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("argv, timed, warmup", [
    (["--mode", "train"], ["--train_batches", "150"], "150"),  # the reference: a warmup epoch, then timing
    (["--mode", "predict", "--test_batches", "20"], ["--test_batches", "20"], "20"),  # a warmup pass
    (["--mode", "train", "--train_batches", "8", "--warmup", "0"], ["--train_batches", "8"], "0"),
])
def test_train_and_predict_commands(argv: list[str], timed: list[str], warmup: str) -> None:
    script = load_script()
    args, main_flags = script.benchmark_parser().parse_known_args(
        [*argv, "--gpus", "0", "--dim", "3", "--batch_size", "2", "--amp", "--task", "01"])
    command = script.build_command(args, main_flags)
    assert command[:2] == [sys.executable, str(REPO / "main.py")]
    assert command[2:7] == ["--benchmark", "--exec_mode", args.mode, *timed]
    main_args = parse_main_args(command[2:])
    assert main_args.benchmark and main_args.warmup == int(warmup) and main_args.amp and main_args.task == "01"
    assert main_args.batch_size == 2 and main_args.dim == 3 and main_args.gpus == 0


@pytest.mark.parametrize("mode, dim", [("train", "2"), ("predict", "3")])
def test_modes_run_main_py(tmp_path: Path, capsys, mode: str, dim: str) -> None:
    code = load_script().main(["--mode", mode, "--train_batches", "2", "--test_batches", "2", "--warmup", "1",
                               "--task", "04", "--dim", dim, "--batch_size", "4", "--results", str(tmp_path),
                               *TINY_FILTERS])
    assert code == 0
    assert "main.py --benchmark --exec_mode " + mode in capsys.readouterr().out
    record = json.loads((tmp_path / "perf.json").read_text())
    assert record["mode"] == mode and record["steps"] == 2 and record["warmup"] == 1 and record["throughput"] > 0


def test_loader_mode_reports_throughput(tmp_path: Path, capsys) -> None:
    data = tiny_task(tmp_path / "task")
    code = load_script().main(["--mode", "loader", "--data", str(data), "--batch_size", "3", "--train_batches", "4",
                        "--warmup", "2", "--num_workers", "1", "--nfolds", "2", "--seed", "0",
                        "--results", str(tmp_path / "results")])
    assert code == 0
    record = json.loads((tmp_path / "results" / "perf.json").read_text())
    assert record["mode"] == "loader" and record["batch_size"] == 3 and record["patch_size"] == [16, 16, 16]
    assert record["steps"] == 4 and record["throughput"] > 0 and record["latency_99"] >= record["latency_90"]
    assert "patches/s" in capsys.readouterr().out


def test_bad_data_exits_with_one_line(tmp_path: Path, capsys) -> None:
    assert load_script().main(["--mode", "loader", "--data", str(tmp_path / "missing")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.strip().count("\n") == 0 and "does not exist" in error


def test_a_wrong_main_flag_stops_before_main_py_runs(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        load_script().main(["--mode", "train", "--no_such_flag"])
    assert stop.value.code == 2 and "--no_such_flag" in capsys.readouterr().err
