"""Measuring commands and comparing tools: wall time, peak memory of a process tree, ratios with their spread.

Every comparison of the harness runs this project and a peer on the same data and cores in the same run,
alternating them round by round, so that load from elsewhere on the machine falls on both; the ratio of
each round is kept and the table shows their median with the lowest and highest.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import psutil

# Memory is sampled this often (s): finer than any phase of the compared tools that could hold a peak.
SAMPLE_INTERVAL = 0.02


@dataclass
class Measured:
    """One run of a command: wall time (s), peak resident memory of it and its children together (bytes)."""

    seconds: float
    peak_rss: int
    returncode: int
    output: str


def tree_rss(process: psutil.Process) -> int:
    """Resident memory of a process and all its descendants, in bytes (processes that vanish count 0)."""
    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.Error:
        return 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            continue
    return total


def run_measured(command: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None,
                 timeout: float | None = None) -> Measured:
    """Run `command` (an argument list) and measure its wall time and the peak RSS of its process tree.

    The RSS of the command and every descendant is summed every SAMPLE_INTERVAL seconds; the peak is the
    largest sum. stdout and stderr are captured together.
    """
    environment = dict(os.environ if env is None else env)
    start = time.perf_counter()
    process = subprocess.Popen(list(command), env=environment, cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        try:
            watched = psutil.Process(process.pid)
        except psutil.Error:
            return
        while not done.is_set():
            peak = max(peak, tree_rss(watched))
            done.wait(SAMPLE_INTERVAL)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return Measured(seconds, peak, process.returncode, output)


@dataclass
class Comparison:
    """Ours against one peer on one measure, over alternating rounds.

    Attributes:
        stage: what is compared ("preprocessing, 2 jobs").
        measure: the quantity and its unit ("wall s", "peak MiB", "patches/s", "step ms").
        peer: the peer's name.
        higher_is_better: throughput (True) or cost (False).
        ours, theirs: one value per round.
        note: why the peer was skipped, or anything that qualifies the figures.
    """

    stage: str
    measure: str
    peer: str
    higher_is_better: bool = False
    ours: list[float] = field(default_factory=list)
    theirs: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def ratios(self) -> list[float]:
        """Advantage of ours in each round: > 1 means ours was faster (or smaller, or higher throughput)."""
        pairs = zip(self.ours, self.theirs)
        if self.higher_is_better:
            return [mine / peer for mine, peer in pairs if peer > 0]
        return [peer / mine for mine, peer in pairs if mine > 0]

    def as_dict(self) -> dict:
        ratios = self.ratios
        return {"stage": self.stage, "measure": self.measure, "peer": self.peer, "ours": self.ours,
                "theirs": self.theirs, "ratio_median": statistics.median(ratios) if ratios else None,
                "ratio_min": min(ratios) if ratios else None, "ratio_max": max(ratios) if ratios else None,
                "higher_is_better": self.higher_is_better, "note": self.note}


def format_table(comparisons: Sequence[Comparison]) -> str:
    """A plain-text table: medians of ours and the peer, and the advantage of ours (median, min-max)."""
    header = f"{'stage':<28} {'measure':<11} {'ours':>10} {'peer':<20} {'peer value':>10} {'ours better by':>18}"
    rows = [header, "-" * len(header)]
    for item in comparisons:
        if not item.theirs:
            ours = f"{statistics.median(item.ours):10.2f}" if item.ours else f"{'-':>10}"
            rows.append(f"{item.stage:<28} {item.measure:<11} {ours} {item.peer:<20} {'skipped':>10}")
            continue
        ratios = item.ratios
        spread = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        rows.append(f"{item.stage:<28} {item.measure:<11} {statistics.median(item.ours):10.2f} {item.peer:<20} "
                    f"{statistics.median(item.theirs):10.2f} {spread:>18}")
    notes = [f"{item.peer}, {item.stage}: {item.note}" for item in comparisons if item.note]
    if notes:
        rows += ["", "notes:", *(f"  {note}" for note in dict.fromkeys(notes))]
    return "\n".join(rows)
