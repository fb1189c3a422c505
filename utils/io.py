"""Small file helpers: atomic writes and checked reads.

Every output of the pipeline is written under a temporary name in its final folder and renamed
into place, so a file that exists under its real name is complete, whatever killed the writer.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary file next to `path`; on success flush, fsync and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def save_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_open(path, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")


def load_json(path: str | os.PathLike) -> Any:
    with open(path) as handle:
        return json.load(handle)


def npy_is_complete(path: str | os.PathLike, shape: tuple[int, ...] | None = None) -> bool:
    """True when `path` is a readable .npy whose data is all there (and has `shape`, if given)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    return shape is None or tuple(array.shape) == tuple(shape)


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Delete temporary files left by a writer that was killed."""
    folder = Path(folder)
    if folder.is_dir():
        for leftover in folder.glob(f".*{TMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
