"""Run `main.py` or `preprocess.py` so that a test can stop it at a known point with a real signal.

    python tests/reliability/interrupted.py main --exec_mode train ...
    python tests/reliability/interrupted.py preprocess --task 00 ...

Training prints `STEP <global step> EPOCH <epoch>` after every training step and `VALIDATION <epoch> CASE <i>`
before every validation case, flushed, so the test can send SIGTERM, SIGINT or SIGKILL after a given line. With the
environment variable `KILL_AT_WRITE=N`, the N-th checkpoint or .npy write stops half-way: half of its bytes are
written and flushed, `KILL <path>` is printed and the process sends itself SIGKILL.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402


class Markers(pl.Callback):
    """Prints the markers; after the line named by the environment variable `PAUSE_AFTER` it waits for a line on
    stdin, so that a signal the test sends before answering arrives at exactly that point."""

    def __init__(self) -> None:
        self.pause_after = os.environ.get("PAUSE_AFTER")

    def mark(self, line: str) -> None:
        print(line, flush=True)
        if line == self.pause_after:
            sys.stdin.readline()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.mark(f"STEP {trainer.global_step} EPOCH {trainer.current_epoch}")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.mark(f"VALIDATION {trainer.current_epoch} CASE {batch_idx}")


def cut_writes(after: int) -> None:
    """Make write number `after` (torch.save or np.save into an open file) end half-way in a SIGKILL."""
    torch_save, np_save = torch.save, np.save
    count = {"writes": 0}

    def write(obj, handle, numpy: bool) -> None:
        count["writes"] += 1
        if count["writes"] < after:
            np_save(handle, obj, allow_pickle=False) if numpy else torch_save(obj, handle)
            return
        buffer = io.BytesIO()
        np_save(buffer, obj, allow_pickle=False) if numpy else torch_save(obj, buffer)
        data = buffer.getvalue()
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())
        print(f"KILL {os.readlink(f'/proc/self/fd/{handle.fileno()}')}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = lambda obj, handle, *args, **kwargs: write(obj, handle, numpy=False)
    np.save = lambda handle, array, *args, **kwargs: write(array, handle, numpy=True)


def main() -> int:
    program, argv = sys.argv[1], sys.argv[2:]
    if os.environ.get("KILL_AT_WRITE"):
        cut_writes(int(os.environ["KILL_AT_WRITE"]))
    if program == "preprocess":
        import preprocess

        return preprocess.main(argv)
    import main as entry

    return entry.main(argv, callbacks=[Markers()])


if __name__ == "__main__":
    sys.exit(main())
