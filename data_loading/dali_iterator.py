"""DALI pipelines as Lightning loaders: a fixed number of batches per epoch, as torch tensors."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from nvidia.dali.plugin.pytorch import DALIGenericIterator

from data_loading.dali_loader import case_id_of


class DaliLoader:
    """A fixed number of batches per epoch from a DALI pipeline, as torch tensors.

    The pipeline's readers wrap around by themselves, so an epoch is simply the next `length`
    batches: nothing is reset between epochs, and every process can be given the same number of
    steps whatever its number of cases. For ordered loaders (evaluation, prediction) an epoch that
    was stopped early is completed before the next one starts, so every epoch begins with the
    first case.

    Batches are dicts of tensors on the pipeline's device (one copy out of DALI's buffers);
    "case_id" holds a list of case names.
    """

    def __init__(self, pipeline, keys: Sequence[str], length: int, slabs: bool = False, ordered: bool = False):
        """
        Args:
            pipeline: a DALI pipeline (not yet built) returning `keys`, in order; a key "path" is
                turned into "case_id".
            keys: names of the pipeline's outputs.
            length: batches per epoch.
            slabs: the pipeline returns 2D slabs (nvol, S, C, H, W) to flatten into (nvol * S, C, H, W).
            ordered: the pipeline reads cases in a fixed order that each epoch restarts.
        """
        self.keys = list(keys)
        self.length = int(length)
        self.slabs = slabs
        self.ordered = ordered
        self._position = 0
        self._iterator = DALIGenericIterator(pipeline, self.keys, size=-1) if self.length > 0 else None

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict]:
        if self.ordered and self._position:
            for _ in range(self.length - self._position):
                next(self._iterator)
        self._position = 0
        for _ in range(self.length):
            batch = next(self._iterator)[0]
            self._position += 1
            yield self._convert(batch)
        self._position = 0

    def _convert(self, batch: dict) -> dict:
        out = {}
        for key, value in batch.items():
            if key == "path":
                out["case_id"] = [case_id_of(bytes(row.tolist()).decode()) for row in value.cpu()]
            elif self.slabs:
                out[key] = value.flatten(0, 1)
            else:
                out[key] = value
        return out


def training_length(n_cases: int, volumes_per_step: int, world_size: int, train_batches: int = 0) -> int:
    """Batches per training epoch, the same on every process.

    Args:
        n_cases: training cases of the fold (all processes together).
        volumes_per_step: volumes each process draws per step (the batch size in 3D, nvol in 2D).
        world_size: number of processes.
        train_batches: a fixed number of batches per epoch when > 0.
    """
    if train_batches > 0:
        return train_batches
    return max(1, math.ceil(n_cases / (volumes_per_step * world_size)))
