"""Work beside the main thread: the next item read ahead, the previous result written behind.

Prediction reads and preprocesses case N+1 and resamples and writes case N-1 while case N runs through the
network. Threads rather than processes: the heavy parts (zlib, numpy, torch) release the GIL, a case's arrays
need no copying between processes (nor /dev/shm, which containers keep small), and one job at a time on each
side bounds the memory to one case ahead and one behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class ReadAhead:
    """Items `load(0)`, ..., `load(count - 1)` by index (a map-style dataset); when index i is read, i + 1 starts
    loading in a background thread, so reading them in order overlaps each load with the caller's work."""

    def __init__(self, load: Callable[[int], T], count: int) -> None:
        self.load, self.count = load, count
        self.pool: ThreadPoolExecutor | None = None
        self.pending: dict[int, Future] = {}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> T:
        if not 0 <= index < self.count:
            raise IndexError(index)
        pending = self.pending.pop(index, None)
        for stale in list(self.pending):  # read out of order: drop what was read ahead for another index
            self.pending.pop(stale).cancel()
        if index + 1 < self.count:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
            self.pending[index + 1] = self.pool.submit(self.load, index + 1)
        return pending.result() if pending is not None else self.load(index)

    def __iter__(self) -> Iterator[T]:
        return (self[index] for index in range(self.count))


class WriteBehind:
    """One job at a time in a background thread: `submit` waits for the previous job (and raises its error)."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="write-behind")
        self.pending: Future | None = None

    def submit(self, job: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.wait()
        self.pending = self.pool.submit(job, *args, **kwargs)

    def wait(self) -> None:
        """Wait for the job in flight; its error is raised here."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the job in flight and stop the thread."""
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)


class Handover:
    """A value passed through holders that keep their reference (a data loader's batch, which Lightning keeps
    until its loop moves on) to the one consumer that frees it: `take()` returns it and forgets it."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def take(self) -> Any:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("the value was already taken")
        return value
