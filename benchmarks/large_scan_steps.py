"""Runs `main.py` of a checkout with a callback that times each case's prediction step.

    python benchmarks/large_scan_steps.py CHECKOUT MAIN_ARGS...

The same run as `python CHECKOUT/main.py MAIN_ARGS...` (in the checkout's folder, with its modules first on the
path), plus one line at the end, `STEPS [seconds, ...]`: for each case, the time from Lightning's
`on_predict_batch_start` to `on_predict_batch_end`, that is sliding-window inference, and inverting to the
source grid and writing the NIfTI file where a checkout does them in the step rather than in the background,
without reading and preprocessing the scan. A checkout whose `main.main`
takes no callbacks runs without them and prints no such line.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import time


def main(checkout: str, argv: list[str]) -> int:
    os.chdir(checkout)
    sys.path.insert(0, checkout)
    import pytorch_lightning as pl

    import main as entry

    if "callbacks" not in inspect.signature(entry.main).parameters:
        return entry.main(argv)
    seconds: list[float] = []

    class StepTimer(pl.Callback):
        def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
            self.started = time.perf_counter()

        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            seconds.append(time.perf_counter() - self.started)

    code = entry.main(argv, callbacks=[StepTimer()])
    print("\nSTEPS " + json.dumps(seconds), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
