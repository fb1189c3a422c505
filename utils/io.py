"""Small file helpers: atomic writes, a writability check and checked reads of .npy files.

Every output of the pipeline is written under a temporary name in its final folder and renamed
into place, so a file that exists under its real name is complete, whatever killed the writer.
The data is fsynced before the rename and the folder after it, so the rename survives a crash
of the machine too. A write that fails (disk full, read-only folder) raises `WriteError`, a
`UserError` naming the file, and leaves neither the file nor its temporary behind.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import nibabel as nib
import numpy as np

from utils.errors import UserError

TMP_SUFFIX = ".tmp"


def _file_mode() -> int:
    # mkstemp creates files readable by their owner only; outputs get the usual mode (0o666 less the umask).
    # Read once at import, while no other thread can be changing the umask in between.
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


class WriteError(UserError):
    """An output could not be written (no space, no permission, read-only file system)."""

    def __init__(self, path: str | os.PathLike, error: OSError) -> None:
        self.path = Path(path)
        self.errno = error.errno
        self.reason = error.strerror or str(error)
        super().__init__(f"cannot write {path}: {self.reason}")

    def __reduce__(self):
        # Rebuilt from its own fields, so that it crosses from a worker process to the parent intact
        # (the default would call __init__ with the message alone).
        return type(self), (self.path, OSError(self.errno, self.reason))


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename or a new file in `folder` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the data itself was synced
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary file next to `path`; on success flush, fsync and rename it to `path`.

    Raises:
        WriteError: the folder or the file could not be written; nothing is left behind.
    """
    path = Path(path)
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        if hasattr(os, "fchmod"):
            os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        fsync_folder(path.parent)
    except OSError as error:
        raise WriteError(path, error) from error
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)


class FolderBusy(UserError):
    """Another process holds the lock of a folder this process means to write."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, busy_message: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` itself (fcntl.flock on the folder, no lock file) while the block runs.

    The lock ends with the process however it ends, so a killed run never leaves the folder locked. Where
    flock does not exist (Windows) the block runs unlocked.

    Raises:
        FolderBusy: `busy_message`, when another process holds the lock.
        WriteError: the folder cannot be created or opened.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
    except OSError as error:
        raise WriteError(folder, error) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(busy_message) from None
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def removing_new_empty_folders(*folders: str | os.PathLike) -> Iterator[None]:
    """Run the block; if it raises, remove those of `folders` (and their missing parents) that did not exist
    before it and are still empty, so that a run that fails before writing anything leaves no trace."""
    created: list[Path] = []
    for folder in folders:
        path = Path(folder).absolute()
        while not path.exists() and path != path.parent:
            created.append(path)
            path = path.parent
    try:
        yield
    except BaseException:
        for path in sorted(set(created), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                path.rmdir()  # only an empty folder goes
        raise


def check_writable(folder: str | os.PathLike) -> None:
    """Create `folder` if needed and check that files can be created in it, before any long work starts.

    Raises:
        WriteError: naming the folder, e.g. on a read-only file system or without permission.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_check.", suffix=TMP_SUFFIX, dir=folder)
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):  # another process may have cleared temporaries meanwhile
            os.unlink(probe)
    except OSError as error:
        raise WriteError(folder, error) from None


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def save_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_open(path, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")


def save_nifti(path: str | os.PathLike, image: nib.Nifti1Image) -> None:
    """Write a NIfTI image atomically, gzip-compressed when `path` ends with .gz (at nibabel's own level, 1)."""
    with atomic_open(path, "wb") as handle:
        if str(path).endswith(".gz"):
            # No file name in the gzip header: it would be the temporary one.
            with gzip.GzipFile(filename="", mode="wb", compresslevel=1, fileobj=handle, mtime=0) as compressed:
                image.to_file_map(image.make_file_map({"image": compressed}))
        else:
            image.to_file_map(image.make_file_map({"image": handle}))


def load_json(path: str | os.PathLike) -> Any:
    with open(path) as handle:
        return json.load(handle)


@dataclass(frozen=True)
class NpyHeader:
    """What the header of a .npy file declares, and where its data starts (bytes)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int

    @property
    def data_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_npy_header(path: str | os.PathLike) -> NpyHeader:
    """Parse the header of a .npy file without reading its data.

    Raises:
        ValueError: the file is not a .npy file (bad magic or header); OSError: it cannot be read.
    """
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(handle)
        return NpyHeader(tuple(int(n) for n in shape), np.dtype(dtype), bool(fortran_order), handle.tell())


def npy_problem(path: str | os.PathLike, shape: tuple[int, ...] | None = None) -> str | None:
    """Why `path` is not a complete .npy file (of `shape`, if given), or None when it is.

    The file size must be exactly the header plus the data it declares: a file cut short by a kill
    or a full disk, or with bytes appended, is caught without reading the data.
    """
    try:
        header = read_npy_header(path)
        size = os.path.getsize(path)
    except FileNotFoundError:
        return "does not exist"
    except (OSError, ValueError, EOFError, SyntaxError) as error:
        return f"is not a readable .npy file ({type(error).__name__}: {error})"
    if header.dtype.hasobject:
        return "holds Python objects, not numbers"
    expected = header.data_offset + header.data_bytes
    if size != expected:
        return (f"has {size} bytes but its header describes {expected} ({header.dtype} {header.shape}); "
                f"it was cut short or damaged")
    if shape is not None and header.shape != tuple(shape):
        return f"has shape {header.shape}, expected {tuple(shape)}"
    return None


NONFINITE_CHUNK_BYTES = 64 << 20


def npy_nonfinite_count(path: str | os.PathLike, chunk_bytes: int = NONFINITE_CHUNK_BYTES) -> int:
    """How many NaN or infinite values a complete floating-point .npy file holds (0 for other types).

    The file is memory-mapped and scanned in chunks of about `chunk_bytes`, so memory stays bounded
    whatever the file's size; reading it costs one pass over the data.
    """
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if array.dtype.kind not in "fc" or array.size == 0:
        return 0
    flat = array.reshape(-1, order="A")
    step = max(1, chunk_bytes // array.dtype.itemsize)
    return sum(int(flat.size - np.count_nonzero(np.isfinite(flat[start:start + step])))
               for start in range(0, flat.size, step))


def npy_is_complete(path: str | os.PathLike, shape: tuple[int, ...] | None = None) -> bool:
    """True when `path` is a readable .npy whose data is all there (and has `shape`, if given)."""
    return npy_problem(path, shape) is None


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Delete temporary files left by a writer that was killed."""
    folder = Path(folder)
    if folder.is_dir():
        for leftover in folder.glob(f".*{TMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def machine_memory_bytes() -> int | None:
    """The machine's physical memory in bytes, or None where the system does not say (POSIX sysconf)."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


def format_bytes(n_bytes: float) -> str:
    """A byte count for messages: '3.2 GB', '1.1 PB'."""
    for unit, scale in (("EB", 1e18), ("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{int(n_bytes)} bytes"
