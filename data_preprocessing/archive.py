"""Checking and unpacking downloaded archives: checksums, sizes, and tar members that stay inside the target.

`safe_extract` refuses absolute paths, `..` and links that leave the target folder, devices and other special
members, so a hostile or damaged archive cannot write outside the task folder.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm import tqdm

from utils.errors import UserError

# Bytes read per step when hashing or copying.
CHUNK_BYTES = 1 << 20


class DownloadError(UserError):
    """A task could not be fetched (downloaded, checked or unpacked); the message is one sentence for the user."""


def file_md5(path: str | os.PathLike, progress: bool = False) -> str:
    """Hex MD5 of a file, read in 1 MiB chunks."""
    path = Path(path)
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as source, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                                          desc=f"md5 {path.name}", disable=None if progress else True) as bar:
        while chunk := source.read(CHUNK_BYTES):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def verify_archive(path: str | os.PathLike, md5: str | None = None, size: int | None = None,
                   progress: bool = False) -> None:
    """Check that a downloaded archive is complete and intact.

    Args:
        path: the archive.
        md5: expected hex MD5, or None when unknown.
        size: expected size in bytes, or None when unknown.
        progress: show a progress bar while hashing.

    Raises:
        DownloadError: wrong size, MD5 mismatch, or not a readable tar archive.
    """
    path = Path(path)
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise DownloadError(f"{path.name} is {actual_size} bytes, expected {size}")
    if md5 is not None:
        actual_md5 = file_md5(path, progress)
        if actual_md5 != md5.lower():
            raise DownloadError(f"{path.name} has MD5 {actual_md5}, expected {md5.lower()}")
    try:
        with tarfile.open(path, "r:*") as archive:
            # Walking every header finds a file cut inside a member; tarfile takes a file cut at a
            # header for a normal end, so the end-of-archive block (512 zero bytes) is checked too.
            if sum(1 for _ in archive) == 0:
                raise DownloadError(f"{path.name} is an empty tar archive")
            archive.fileobj.seek(archive.offset)
            end_marker = archive.fileobj.read(tarfile.BLOCKSIZE)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DownloadError(f"{path.name} is not a readable tar archive ({error})") from None
    if end_marker != bytes(tarfile.BLOCKSIZE):
        raise DownloadError(f"{path.name} is not a readable tar archive (it ends without the end-of-archive block)")


def _is_apple_double(name: str) -> bool:
    """macOS resource-fork companions (`._x.nii.gz`) that some MSD archives carry; they are not images."""
    return PurePosixPath(name).name.startswith("._")


def _leaves_root(path: PurePosixPath) -> bool:
    """Whether a relative path climbs above its starting folder at any point."""
    depth = 0
    for part in path.parts:
        depth += -1 if part == ".." else 1
        if depth < 0:
            return True
    return False


def _is_absolute(name: str) -> bool:
    return PurePosixPath(name).is_absolute() or bool(PureWindowsPath(name).drive) or name.startswith("\\")


def _unsafe_reason(member: tarfile.TarInfo, relative: PurePosixPath, link_relative: PurePosixPath | None) -> str | None:
    """Why a member must not be extracted, or None when it is safe.

    Args:
        member: the archive member.
        relative: its path inside the destination (after removing the archive's top folder).
        link_relative: a hard link's target inside the destination (None when it lies outside).
    """
    if _is_absolute(member.name):
        return "absolute path"
    if ".." in PurePosixPath(member.name).parts:
        return "'..' in the path"
    if member.isdev():
        return "device file or pipe"
    if member.issym():
        if _is_absolute(member.linkname):
            return f"symbolic link to the absolute path {member.linkname!r}"
        if _leaves_root(relative.parent / member.linkname):
            return f"symbolic link to {member.linkname!r} outside the destination"
    if member.islnk():
        if _is_absolute(member.linkname) or link_relative is None or _leaves_root(link_relative):
            return f"hard link to {member.linkname!r} outside the destination"
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        return "unsupported member type"
    return None


def _strip_top(name: str, top: str | None) -> PurePosixPath:
    parts = PurePosixPath(name).parts
    if top is not None and parts[:1] == (top,):
        parts = parts[1:]
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def safe_extract(tar_path: str | os.PathLike, dest_dir: str | os.PathLike, top: str | None = None) -> None:
    """Extract a tar archive, refusing members that could write outside `dest_dir`.

    Every member is checked before anything is written: absolute paths, `..` components, device
    files and pipes, and symbolic or hard links whose target leaves `dest_dir` are refused. The
    extraction itself runs through tarfile's `data` filter, which also catches links that escape
    through other links. macOS `._*` companion files are skipped.

    Args:
        tar_path: the archive.
        dest_dir: destination folder (created if missing).
        top: when every member lies under this top-level folder, its contents go straight into
            `dest_dir` (`Task09_Spleen/imagesTr/x.nii.gz` -> `dest_dir/imagesTr/x.nii.gz`).

    Raises:
        DownloadError: an unsafe member, or the archive could not be read or written.
    """
    tar_path, dest_dir = Path(tar_path), Path(dest_dir)
    if not hasattr(tarfile, "data_filter"):
        raise DownloadError("this Python lacks tarfile extraction filters; use Python 3.10.12, 3.11.4 or newer")
    try:
        with tarfile.open(tar_path, "r:*") as archive:
            members = [m for m in archive.getmembers() if not _is_apple_double(m.name)]
            if top is not None and not all(PurePosixPath(m.name).parts[:1] == (top,) for m in members):
                top = None

            # Keyed by header offset, which is unique even when an archive repeats a name.
            renamed: dict[int, tarfile.TarInfo] = {}
            for member in members:
                relative = _strip_top(member.name, top)
                link_relative = None
                if member.islnk() and (top is None or PurePosixPath(member.linkname).parts[:1] == (top,)):
                    link_relative = _strip_top(member.linkname, top)
                reason = _unsafe_reason(member, relative, link_relative)
                if reason is not None:
                    raise DownloadError(f"{tar_path.name}: refusing to extract {member.name!r} ({reason})")
                if str(relative) != ".":
                    changes = {"name": str(relative)}
                    if link_relative is not None:
                        changes["linkname"] = str(link_relative)
                    renamed[member.offset] = member.replace(**changes, deep=False)

            def strip_and_check(member: tarfile.TarInfo, dest_path: str) -> tarfile.TarInfo | None:
                return tarfile.data_filter(renamed[member.offset], dest_path)

            dest_dir.mkdir(parents=True, exist_ok=True)
            wanted = [m for m in members if m.offset in renamed]
            archive.extractall(dest_dir, members=wanted, filter=strip_and_check)
    except tarfile.FilterError as error:
        raise DownloadError(f"{tar_path.name}: refusing to extract an unsafe member ({error})") from None
    except (tarfile.TarError, EOFError) as error:
        raise DownloadError(f"could not read {tar_path.name} ({error})") from None
    except OSError as error:
        raise DownloadError(f"could not extract {tar_path.name} into {dest_dir} ({error})") from None
