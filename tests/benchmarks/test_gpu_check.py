"""benchmarks/gpu/check.py: the planned steps, a real step on the CPU, the table and the results file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu import check

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_plan_times_both_dtypes_at_the_benchmark_sizes(tmp_path: Path) -> None:
    steps = check.build_steps(check.GPU, tmp_path, cpu=False)
    names = [step.name for step in steps]
    for name in ("train b2 fp16", "train b2 bf16", "predict b1 fp16", "predict b1 bf16", "predict b4 fp16",
                 "predict b4 bf16", "DALI loader", "tests/gpu", "demo train", "demo evaluate"):
        assert name in names
    train = steps[names.index("train b2 bf16")].command
    assert train[train.index("--task") + 1] == "01" and train[train.index("--amp_dtype") + 1] == "bf16"
    assert train[train.index("--gpus") + 1] == "1" and train[train.index("--batch_size") + 1] == "2"
    loader = steps[names.index("loader task")].command
    assert loader[-6:] == ["144", "144", "144", "128", "128", "128"]
    # Every step's own limit is under the budget, and the budget leaves room for the installation.
    assert all(step.timeout <= check.GPU.budget for step in steps) and check.GPU.budget <= 450


def test_derived_rows_compare_with_the_targets() -> None:
    rows = check.derived_rows({"train b2 fp16": 100.0, "train b2 bf16": 80.0, "predict b1 bf16": 200.0,
                               "DALI loader": 250.0})
    assert ("train b2 fp16 / target 90", 100.0 / 90, "x", "met") in rows
    assert ("predict b1 bf16 / target 250", 0.8, "x", "below") in rows
    assert ("DALI loader / fastest training demand", 2.5, "x", "below 3x") in rows


def test_dry_run_plans_every_step(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu" / "check.py"), "--gpu", "--dry_run", "--output",
               str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "table.md").read_text()
    assert table.count("| planned |") == len(check.build_steps(check.GPU, tmp_path, cpu=False))
    assert done.stdout.rstrip().endswith(table.rstrip().splitlines()[-1])


def test_a_cpu_step_runs_and_lands_in_the_table(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "steps.tsv").write_text("install\t12.5\ts\tok\n")
    code = check.main(["--cpu", "--output", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--steps",
                       "demo download", "train b2 fp16"])
    assert code == 0
    table = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert table[2] == "| install | 12.50 | s | ok |"
    assert table[3] == "| train b2 fp16 |  |  | skipped: fp16 autocast is CUDA only |"
    assert table[4].startswith("| demo download | ") and table[4].endswith("| s | ok |")
    assert (tmp_path / "work" / "demo" / "raw" / "Task00_Synthetic" / "dataset.json").is_file()
    assert "===== demo download" in (tmp_path / "out" / "check.log").read_text()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["mode"] == "cpu"
