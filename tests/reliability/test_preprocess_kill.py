"""Preprocessing killed in the middle of a write is completed by a rerun; partial files are never taken as done."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import preprocess
from tests.factories import blob_case, write_msd_task

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def task(tmp_path: Path) -> Path:
    cases = [blob_case(f"case_{i}", shape=(20 + 2 * i, 18, 14), seed=i) for i in range(3)]
    write_msd_task(tmp_path / "raw", "Task49_Kill", cases)
    return tmp_path / "raw"


def outputs(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("case_*.npy"))}


def test_a_kill_in_the_middle_of_a_write_is_completed_by_a_rerun(tmp_path):
    raw = task(tmp_path)
    argv = ["--task", "49", "--data", str(raw), "--results", str(tmp_path / "out"), "--n_jobs", "1"]
    # Writes: case_0 image and label, case_1 image, then case_1's label is cut half-way by SIGKILL.
    result = subprocess.run([sys.executable, str(HERE / "interrupted.py"), "preprocess", *argv], cwd=ROOT,
                            capture_output=True, text=True, timeout=240,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "KILL_AT_WRITE": "4"})
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    folder = tmp_path / "out" / "49_3d"
    assert "KILL" in result.stdout and ".case_1_y.npy." in result.stdout
    # What the kill left: case_0 complete, case_1's image complete but no label and no metadata, one temporary.
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("case_")) == [
        "case_0_meta.json", "case_0_x.npy", "case_0_y.npy", "case_1_x.npy"]
    assert len(list(folder.glob(".case_1_y.npy.*.tmp"))) == 1

    assert preprocess.main(argv) == 0
    assert not list(folder.glob(".*"))
    assert preprocess.main([*argv[:-4], "--results", str(tmp_path / "clean")]) == 0
    assert outputs(folder) == outputs(tmp_path / "clean" / "49_3d")  # byte for byte what an uninterrupted run writes


def test_damaged_outputs_of_a_finished_case_are_redone(tmp_path, capsys):
    raw = task(tmp_path)
    argv = ["--task", "49", "--data", str(raw), "--results", str(tmp_path / "out")]
    assert preprocess.main(argv) == 0
    folder = tmp_path / "out" / "49_3d"
    clean = outputs(folder)
    image = folder / "case_1_x.npy"
    image.write_bytes(image.read_bytes() + b"\0" * 8)  # longer than its header says: not the file that was written
    label = folder / "case_2_y.npy"
    label.write_bytes(label.read_bytes()[:-1])  # one byte short
    capsys.readouterr()
    assert preprocess.main(argv) == 0
    assert "2 case(s) written, 1 already done" in capsys.readouterr().out
    assert outputs(folder) == clean
    assert np.load(image).ndim == 4


def test_workers_exit_when_their_parent_is_killed(tmp_path):
    psutil = pytest.importorskip("psutil")
    write_msd_task(tmp_path / "raw", "Task49_Kill", [blob_case(f"case_{i}", seed=i) for i in range(6)])
    parent = subprocess.Popen([sys.executable, "preprocess.py", "--task", "49", "--data", str(tmp_path / "raw"),
                               "--results", str(tmp_path / "out"), "--n_jobs", "2"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        # The plan is written once the workers have planned the task: they are running and about to write cases.
        while not (tmp_path / "out" / "49_3d" / "config.json").is_file():
            assert parent.poll() is None and time.monotonic() < deadline, "preprocessing ended before the kill"
            time.sleep(0.02)
        children = psutil.Process(parent.pid).children(recursive=True)  # the workers and the resource tracker
        assert sum("spawn_main" in " ".join(child.cmdline()) for child in children) == 2
    finally:
        parent.kill()
        parent.wait()
    try:
        _, alive = psutil.wait_procs(children, timeout=10)  # polls; returns as soon as every one is gone
        assert not alive, f"processes {[child.pid for child in alive]} outlived their killed parent"
    finally:
        for child in children:  # a failing run must not leave them behind
            with contextlib.suppress(psutil.Error):
                child.kill()
    written = sorted(path.name for path in (tmp_path / "out").rglob("*"))
    assert sorted(path.name for path in (tmp_path / "out").rglob("*")) == written  # nobody left to write
