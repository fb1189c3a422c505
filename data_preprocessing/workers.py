"""Worker processes for per-case work: one case per worker in memory, and no worker outlives its parent.

Workers are spawned (a forked child of a process whose OpenMP pool has run can deadlock), limited to their
share of the CPU threads, and exit when the process that started them dies (Linux's parent-death signal,
and a thread that polls the parent elsewhere), so a killed `preprocess.py` leaves nothing writing cases.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool

from tqdm import tqdm

from data_preprocessing.layouts import CaseFiles, PreprocessingError

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


# --------------------------------------------------------------------------------------------
# Running over a task
# --------------------------------------------------------------------------------------------
PARENT_POLL_SECONDS = 0.5


def _worker_init(threads: int, parent: int) -> None:
    """Set up a worker process: its thread count, and its exit as soon as `parent` (a process id) is gone."""
    exit_with_parent(parent)
    import torch

    torch.set_num_threads(threads)


def exit_with_parent(parent: int) -> None:
    """End this process as soon as the process `parent` ends, however it ends (SIGKILL included).

    A killed parent cannot stop its workers, which would otherwise go on writing cases and then wait for work
    forever. On Linux the kernel sends SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG); elsewhere, and
    as a fallback, a daemon thread checks every half second whether this process was handed to another parent.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


@contextlib.contextmanager
def worker_pool(n_jobs: int) -> Iterator[concurrent.futures.ProcessPoolExecutor | None]:
    """Processes for the per-case work, or None to work in this process when n_jobs is 1."""
    if n_jobs <= 1:
        yield None
        return
    threads = max(1, (os.cpu_count() or 1) // n_jobs)
    # spawn, not fork: a forked child of a process whose OpenMP pool has run can deadlock.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(n_jobs, mp_context=context, initializer=_worker_init,
                                                initargs=(threads, os.getpid())) as pool:
        yield pool


def run_parallel(function, argument_tuples: list[tuple], pool: concurrent.futures.Executor | None,
                 description: str) -> list:
    """Apply `function` to each argument tuple, in the pool's processes if there is one, keeping the order.

    Each worker holds one case at a time. The first failure cancels the remaining work and is
    raised here.

    Raises:
        PreprocessingError: a worker process died (killed, e.g. for lack of memory), naming the cases
            left unfinished.
    """
    with tqdm(total=len(argument_tuples), desc=description, unit="case", leave=False, disable=None) as progress:
        if pool is None:
            results = []
            for arguments in argument_tuples:
                results.append(function(*arguments))
                progress.update()
            return results
        results = [None] * len(argument_tuples)
        futures = {pool.submit(function, *arguments): index for index, arguments in enumerate(argument_tuples)}
        try:
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
                progress.update()
        except BrokenProcessPool:
            finished = {index for future, index in futures.items()
                        if future.done() and not future.cancelled() and future.exception() is None}
            unfinished = sorted(set(futures.values()) - finished)
            names = [_item_name(argument_tuples[index], index) for index in unfinished]
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise PreprocessingError(
                f"a worker process died while {description}, most likely killed for lack of memory, with "
                f"{len(names)} case(s) unfinished ({shown}); run again with a lower --n_jobs (finished cases "
                f"are kept)") from None
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return results


def _item_name(arguments: tuple, index: int) -> str:
    """The case id among a work item's arguments, else its position."""
    return next((argument.case_id for argument in arguments if isinstance(argument, CaseFiles)), f"item {index}")
