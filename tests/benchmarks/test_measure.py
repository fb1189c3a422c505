"""benchmarks/measure.py: peak memory of a process tree, ratios per round, the table."""

from __future__ import annotations

import statistics
import sys

import pytest

from benchmarks.measure import Comparison, format_table, run_measured

MIB = 2**20

# A parent that starts a child holding 200 MiB, while itself holding 100 MiB, until the child ends.
TREE = """
import subprocess, sys
held = bytearray(100 * 2**20)
child = "import time; held = bytearray(200 * 2**20); held[::4096] = b'x' * len(held[::4096]); time.sleep(0.5)"
held[::4096] = b"y" * len(held[::4096])
subprocess.run([sys.executable, "-c", child], check=True)
print("done")
"""


def test_peak_memory_counts_the_children() -> None:
    measured = run_measured([sys.executable, "-c", TREE])
    assert measured.returncode == 0 and measured.output.strip() == "done" and measured.seconds > 0
    # Both processes were resident at once: more than either alone.
    assert measured.peak_rss > 300 * MIB


def test_a_failing_command_keeps_its_output() -> None:
    measured = run_measured([sys.executable, "-c", "import sys; print('bad input'); sys.exit(3)"])
    assert measured.returncode == 3 and "bad input" in measured.output


def test_ratios_say_how_much_better_ours_is_in_each_round() -> None:
    cost = Comparison("stage", "wall s", "peer", ours=[2.0, 4.0, 1.0], theirs=[4.0, 4.0, 3.0])
    assert cost.ratios == [2.0, 1.0, 3.0]
    speed = Comparison("stage", "patches/s", "peer", higher_is_better=True, ours=[30.0, 20.0], theirs=[10.0, 20.0])
    assert speed.ratios == [3.0, 1.0]
    record = cost.as_dict()
    assert record["ratio_median"] == 2.0 and record["ratio_min"] == 1.0 and record["ratio_max"] == 3.0


def test_table_shows_medians_spread_and_skipped_peers() -> None:
    measured = Comparison("preprocess", "wall s", "nnU-Net v2", ours=[1.0, 2.0, 3.0], theirs=[4.0, 5.0, 9.0])
    skipped = Comparison("train step", "step ms", "nnU-Net v2", ours=[120.0], note="not installed here")
    table = format_table([measured, skipped])
    row = next(line for line in table.splitlines() if line.startswith("preprocess"))
    assert f"{statistics.median([4.0, 2.5, 3.0]):.2f}x (2.50-4.00)" in row and " 2.00 " in row and " 5.00 " in row
    assert "skipped" in next(line for line in table.splitlines() if line.startswith("train step"))
    assert "nnU-Net v2, train step: not installed here" in table


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_no_ratio_without_the_peer(higher_is_better: bool) -> None:
    assert Comparison("s", "m", "p", higher_is_better=higher_is_better, ours=[1.0]).as_dict()["ratio_median"] is None
