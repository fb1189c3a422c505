"""Logs in NVIDIA's DLLogger JSON-lines format, and timing of benchmark steps.

Each record is one line `DLLL {json}` with the keys `timestamp`, `datetime`, `elapsedtime`,
`type` (`LOG` or `PARAMETER`), `step` and `data`, as the `dllogger` package writes them, so
tools that parse DLLogger output read ours. The file is opened in append mode: a resumed run
adds its epochs after the earlier ones, and every line is flushed when written.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from utils.io import WriteError

PREFIX = "DLLL "


def _plain(value: Any) -> Any:
    """Numbers, tensors and arrays -> JSON-friendly values (non-finite floats become strings)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class DLLogger:
    """Appends DLLogger-format records to a file (only on the process that logs: rank 0)."""

    def __init__(self, path: str | os.PathLike | None, enabled: bool = True):
        self.path = Path(path) if path is not None else None
        self.enabled = enabled and path is not None
        self.start = time.time()
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _end_cut_line(self.path)

    def _write(self, kind: str, step: Any, data: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        now = time.time()
        record = {
            "timestamp": now,
            "datetime": datetime.fromtimestamp(now).isoformat(),
            "elapsedtime": now - self.start,
            "type": kind,
            "step": step,
            "data": _plain(data),
        }
        try:
            with open(self.path, "a") as handle:
                handle.write(PREFIX + json.dumps(record) + "\n")
                handle.flush()
        except OSError as error:
            raise WriteError(self.path, error) from error

    def log(self, step: int | Sequence[int] | str, data: Mapping[str, Any]) -> None:
        """A metrics record; `step` is an epoch number, a list such as [epoch, batch], or a name."""
        self._write("LOG", list(step) if isinstance(step, (list, tuple)) else step, data)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._write("PARAMETER", "PARAMETER", params)


def _end_cut_line(path: Path) -> None:
    """End a last line cut short by a killed writer, so that the next record starts on a line of its own."""
    try:
        with open(path, "rb+") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() == 0:
                return
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
    except FileNotFoundError:
        return
    except OSError as error:
        raise WriteError(path, error) from error


def read_logs(path: str | os.PathLike) -> list[dict]:
    """The records of a DLLogger-format file; a line cut short by a killed writer is skipped."""
    records = []
    if not Path(path).is_file():
        return records
    with open(path) as handle:
        for line in handle:
            if not line.startswith(PREFIX):
                continue
            try:
                records.append(json.loads(line[len(PREFIX):]))
            except json.JSONDecodeError:
                continue
    return records


def time_batches(loader: Iterable, warmup: int, batches: int) -> list[float]:
    """Seconds to fetch each of `batches` batches of `loader` (a loader or an iterator) after `warmup` untimed ones.

    The loader must give at least `warmup + batches` batches; wrap one with fewer in an endless iterator.
    """
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        next(iterator)
        times.append(time.perf_counter() - start)
    return times


def latency_summary(step_seconds: Sequence[float], images_per_step: int) -> dict[str, float]:
    """Throughput (images/s = images per step / mean step time) and latency mean and percentiles (ms)."""
    times = np.asarray(step_seconds, dtype=np.float64)
    mean = float(times.mean())
    summary = {"throughput": images_per_step / mean, "latency_mean": 1000 * mean}
    for level in (90, 95, 99):
        summary[f"latency_{level}"] = float(1000 * np.percentile(times, level))
    return summary
