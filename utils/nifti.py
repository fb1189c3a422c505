"""Opening NIfTI files with their header checked against the file before any voxel is read.

A NIfTI header declares the shape and data type of the voxels that follow it; nibabel allocates
that much memory when the data is read, and only then finds that the file is shorter. A damaged or
hostile file of a few hundred bytes can declare gigabytes, so `load_nifti` first checks that the file
can hold the data its header declares: for `.nii` the file size, for `.nii.gz` a bound on the
uncompressed size (the gzip trailer, then the deflate limit of 1032:1, and only for a file that still
looks too short a decompression that counts bytes without keeping them).
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from utils.errors import UserError
from utils.io import format_bytes

# Deflate encodes at most 258 bytes in 2 bits: no gzip member expands more than 1032-fold.
MAX_DEFLATE_RATIO = 1032
GZIP_TRAILER_BYTES = 8
STREAM_CHUNK = 1 << 20


class NiftiError(UserError):
    """A NIfTI file that cannot hold the image its header declares (or cannot be opened); names the file.

    Attributes:
        path: the file.
        reason: what is wrong with it, without the file's name.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):
        return type(self), (self.path, self.reason)  # crosses from a worker process to the parent intact


def declared_bytes(image: nib.Nifti1Image) -> int:
    """Bytes from the file's start to the end of the voxel data its header declares (offset + data)."""
    header = image.header
    shape = tuple(int(n) for n in header.get_data_shape())
    offset = int(header.get_data_offset()) if hasattr(header, "get_data_offset") else 0
    return offset + math.prod(shape) * np.dtype(header.get_data_dtype()).itemsize


def _gzip_holds(path: Path, needed: int) -> int | None:
    """None when the gzip file `path` may hold `needed` uncompressed bytes, else how many it holds (<= needed)."""
    compressed = os.path.getsize(path)
    if compressed * MAX_DEFLATE_RATIO >= needed and compressed >= GZIP_TRAILER_BYTES:
        with open(path, "rb") as handle:
            handle.seek(compressed - 4)
            trailer = int.from_bytes(handle.read(4), "little")  # uncompressed size modulo 2**32 (of the last member)
        if trailer >= needed or trailer + (1 << 32) <= compressed * MAX_DEFLATE_RATIO:
            return None  # consistent with a file that holds the data: the ordinary case, decided without decoding
    # Too short by the bounds (or several members): count the decompressed bytes, stopping once there are enough.
    total = 0
    with open(path, "rb") as handle:
        decoder = zlib.decompressobj(zlib.MAX_WBITS | 16)
        while total < needed:
            chunk = handle.read(STREAM_CHUNK)
            if not chunk:
                break
            try:
                data = decoder.decompress(chunk, STREAM_CHUNK)
                while data:
                    total += len(data)
                    if total >= needed:
                        return None
                    data = decoder.decompress(decoder.unconsumed_tail, STREAM_CHUNK) if decoder.unconsumed_tail else b""
                if decoder.eof and decoder.unused_data:  # a further gzip member follows
                    rest = decoder.unused_data
                    decoder = zlib.decompressobj(zlib.MAX_WBITS | 16)
                    handle.seek(handle.tell() - len(rest))
            except zlib.error:
                break
    return total if total < needed else None


def nifti_size_problem(path: str | os.PathLike, image: nib.Nifti1Image) -> str | None:
    """Why the file `path` cannot hold the voxels its (already parsed) header declares, or None."""
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        return None  # a header/image pair or another format: its data is elsewhere
    needed = declared_bytes(image)
    shape = "x".join(str(int(n)) for n in image.header.get_data_shape())
    declared = f"its header declares {shape} {np.dtype(image.header.get_data_dtype())} ({format_bytes(needed)})"
    if path.name.endswith(".gz"):
        holds = _gzip_holds(path, needed)
        if holds is not None:
            return f"{declared} but it decompresses to {format_bytes(holds)}; the file is damaged or cut short"
    else:
        size = os.path.getsize(path)
        if size < needed:
            return f"{declared} but the file has {format_bytes(size)}; the file is damaged or cut short"
    return None


def load_nifti(path: str | os.PathLike) -> nib.Nifti1Image:
    """Open a NIfTI file (header only) and check that the file holds the voxels the header declares.

    Returns:
        The nibabel image; its data is read on access (`get_fdata`, `dataobj`).

    Raises:
        NiftiError: one line naming the file: unreadable header, or data shorter than declared. Nothing of the
            declared size has been allocated.
    """
    path = Path(path)
    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel and gzip raise many types for damaged or foreign files
        message = " ".join(str(error).split()) or type(error).__name__
        raise NiftiError(path, f"not a readable NIfTI file ({type(error).__name__}: {message})") from None
    try:
        problem = nifti_size_problem(path, image)
    except OSError as error:
        raise NiftiError(path, f"cannot be read ({error.strerror or error})") from None
    if problem:
        raise NiftiError(path, problem)
    return image
