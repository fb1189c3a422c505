"""Preprocessing: `preprocess.py` against nnU-Net v2's `nnUNetv2_plan_and_preprocess` on the same raw task.

Both plan the task from its data (fingerprint: spacings, shapes, intensities) and write the 3D
full-resolution training set: crop to the non-zero region, resample to the planned spacing, normalise.
The raw data is the synthetic task 00 (two MRI-like channels, nested tumour classes, a quarter of the
cases with thick slices), written once in the MSD layout for this project and converted to nnU-Net v2's
layout (one file per channel) for the peer; the conversion is not timed. Each run starts from an empty
output folder and is measured from the outside: wall time, and the peak resident memory of the command
and all its worker processes together.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from benchmarks import nnunet_v2
from benchmarks.measure import Comparison, Measured, run_measured
from data_preprocessing.configs import SYNTHETIC_TASK
from data_preprocessing.synthetic import make_synthetic_task

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def write_raw_task(folder: Path, cases: int, size: int, seed: int = 0) -> Path:
    """The synthetic task 00 with `cases` training cases of about `size`^3 voxels and no test cases."""
    return make_synthetic_task(folder, seed=seed, n_cases=cases, n_test=0, size=size)


def ours_command(raw: Path, results: Path, n_jobs: int) -> list[str]:
    return [sys.executable, str(ROOT / "preprocess.py"), "--task", "00", "--dim", "3", "--data", str(raw),
            "--results", str(results), "--n_jobs", str(n_jobs)]


def _checked(measured: Measured, who: str) -> Measured:
    if measured.returncode != 0:
        tail = "\n".join(measured.output.strip().splitlines()[-5:])
        raise RuntimeError(f"{who} preprocessing failed (exit {measured.returncode}):\n{tail}")
    return measured


def compare(scratch: Path, cases: int, size: int, n_jobs: list[int], repeats: int,
            nnunet_python: str | None) -> list[Comparison]:
    """Wall time and peak memory of both tools for each job count, alternating ours and the peer `repeats` times.

    Returns:
        Two comparisons per job count: "wall s" and "peak MiB" (lower is better for both).
    """
    raw = scratch / "raw"
    task_dir = raw / SYNTHETIC_TASK
    if not task_dir.is_dir():
        write_raw_task(raw, cases, size)
    python, why = nnunet_v2.find_python(nnunet_python)
    workdir = scratch / "nnunet_v2"
    env = None
    if python:
        env = nnunet_v2.environment(workdir)
        if not any((workdir / "nnUNet_raw").glob(f"Dataset{nnunet_v2.DATASET_ID:03d}_*")):
            nnunet_v2.convert_task(task_dir, workdir / "nnUNet_raw")
    comparisons = []
    for jobs in n_jobs:
        stage = f"preprocess {cases} cases, {jobs} job{'s' if jobs > 1 else ''}"
        wall = Comparison(stage, "wall s", nnunet_v2.PEER, note=why)
        memory = Comparison(stage, "peak MiB", nnunet_v2.PEER, note=why)
        for _ in range(repeats):
            output = scratch / "ours"
            shutil.rmtree(output, ignore_errors=True)
            mine = _checked(run_measured(ours_command(raw, output, jobs)), "our")
            wall.ours.append(mine.seconds)
            memory.ours.append(mine.peak_rss / MIB)
            if python:
                shutil.rmtree(workdir / "nnUNet_preprocessed", ignore_errors=True)
                (workdir / "nnUNet_preprocessed").mkdir()
                theirs = _checked(run_measured(nnunet_v2.preprocess_command(python, nnunet_v2.DATASET_ID, jobs),
                                               env=env), nnunet_v2.PEER)
                wall.theirs.append(theirs.seconds)
                memory.theirs.append(theirs.peak_rss / MIB)
        comparisons += [wall, memory]
    return comparisons
