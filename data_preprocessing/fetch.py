"""Fetching Medical Segmentation Decathlon (MSD) tasks: download, verify, unpack safely.

The MSD archives (`TaskNN_Name.tar`, 0.3-7 GB) are mirrored by MONAI on Amazon S3. A download
goes to `TaskNN_Name.tar.part`, resumes from there with an HTTP Range request after an interruption,
and is renamed to `TaskNN_Name.tar` only once its size, MD5 and tar structure check out. The archive
is unpacked into a hidden folder beside the task and renamed into place at the end, so a folder
`DATA/TaskNN_Name` that exists is always complete.

Every failure a user can meet (no network, HTTP errors, a truncated or corrupt archive, an unsafe
archive member) raises `DownloadError`, a `UserError`, with a one-sentence message.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from data_preprocessing.archive import CHUNK_BYTES, DownloadError, safe_extract, verify_archive
from data_preprocessing.configs import MSD_TASKS
from utils.errors import UserError
from utils.task_folders import task_number

MSD_BASE_URL = "https://msd-for-monai.s3-us-west-2.amazonaws.com"

# MD5 of each archive at MSD_BASE_URL, as published with MONAI's DecathlonDataset.
MSD_MD5: dict[str, str] = {
    "01": "240a19d752f0d9e9101544901065d872",
    "02": "06ee59366e1e5124267b774dbd654057",
    "03": "a90ec6c4aa7f6a3d087205e23d4e6397",
    "04": "9d24dba78a72977dbd1d2e110310f31b",
    "05": "35138f08b1efaef89d7424d2bcc928db",
    "06": "8afd997733c7fc0432f71255ba4e52dc",
    "07": "4f7080cfca169fa8066d17ce6eb061e4",
    "08": "641d79e80ec66453921d997fbf12a29c",
    "09": "410d4a301da4e5b2f6f86ec3ddba524e",
    "10": "bad7a188931dc2f6acf72b08eb6202d0",
}

# A stalled connection fails after this long instead of hanging; the rerun resumes.
SOCKET_TIMEOUT_S = 60.0
# Attempts per run while each one still makes progress (a stalled server ends the run at once).
DOWNLOAD_ATTEMPTS = 5


class InterruptedDownload(DownloadError):
    """The transfer stopped part-way; the `.part` file holds what arrived and can be resumed."""


def task_name(task: str) -> str:
    """Folder name of an MSD task: '9', '09' or 'Task09_Spleen' -> 'Task09_Spleen'."""
    number = task_number(str(task))
    if number not in MSD_TASKS:
        raise DownloadError(f"unknown task {task!r}: choose 00 (synthetic) or one of the MSD tasks 01-10")
    return MSD_TASKS[number]


def url_for(task: str, mirror: str | None = None) -> str:
    """URL of a task's archive.

    Args:
        task: task number ('01'-'10') or folder name.
        mirror: base URL that replaces the public location (`http://host/path`, `file:///dir`), or a
            local folder holding the archives.

    Returns:
        `<base>/TaskNN_Name.tar`.
    """
    base = mirror or MSD_BASE_URL
    if "://" not in base:
        base = Path(base).resolve().as_uri()
    return f"{base.rstrip('/')}/{task_name(task)}.tar"


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from a `Content-Range: bytes a-b/n` or `bytes */n` header."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", header or "")
    if not match:
        return None, None
    first, total = match.groups()
    return (int(first) if first else None), (int(total) if total != "*" else None)


def download(url: str, dest_part: str | os.PathLike, expected_size: int | None = None, progress: bool = False,
             timeout_s: float = SOCKET_TIMEOUT_S) -> int:
    """Download `url` into `dest_part`, continuing a partial file when the server allows it.

    A non-empty `dest_part` is resumed with `Range: bytes=<size>-`; when the server answers with
    the whole file instead (no range support) the download starts over.

    Args:
        url: http(s) or file URL.
        dest_part: the partial file, e.g. `Task09_Spleen.tar.part`.
        expected_size: size of the complete file in bytes, when known in advance.
        progress: show a progress bar on a terminal.
        timeout_s: socket timeout in seconds.

    Returns:
        Size of the complete file in bytes.

    Raises:
        InterruptedDownload: the connection dropped or stalled; `dest_part` keeps what arrived.
        DownloadError: the server could not be reached or answered with an error.
    """
    dest_part = Path(dest_part)
    offset = dest_part.stat().st_size if dest_part.exists() else 0
    if expected_size is not None and offset > expected_size:
        dest_part.unlink()
        offset = 0
    if expected_size is not None and offset == expected_size:
        return offset

    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and offset:
            # Nothing left to send from `offset`: either the part is already complete or it is
            # longer than the file on the server (then it cannot be trusted).
            _, total = _content_range(error.headers.get("Content-Range"))
            if total == offset:
                return offset
            dest_part.unlink()
            return download(url, dest_part, expected_size, progress, timeout_s)
        raise DownloadError(f"could not download {url}: HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise DownloadError(f"could not reach {url}: {error.reason}") from None
    except (OSError, http.client.HTTPException) as error:
        raise DownloadError(f"could not reach {url}: {error}") from None

    with response:
        first, total = _content_range(response.headers.get("Content-Range"))
        partial = getattr(response, "status", None) == 206
        if partial and not (offset and first == offset):
            # A range other than the one asked for cannot be appended; fetch the whole file instead.
            if not offset:
                raise DownloadError(f"{url} answered with a partial response to a request for the whole file")
            response.close()
            dest_part.unlink()
            return download(url, dest_part, expected_size, progress, timeout_s)
        if partial:
            mode = "ab"
        else:
            offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if expected_size is not None and total is not None and total != expected_size:
            raise DownloadError(f"{url} is {total} bytes on the server, expected {expected_size}")

        received = offset
        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=Path(url).name, disable=None if progress else True)
        with bar, open(dest_part, mode) as out:
            while True:
                try:
                    chunk = response.read(CHUNK_BYTES)
                except (OSError, http.client.HTTPException) as error:
                    raise InterruptedDownload(f"the download of {url} stopped at {received} of {total} bytes "
                                              f"({error}); run again to resume") from None
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as error:
                    raise DownloadError(f"could not write {dest_part}: {error.strerror or error}") from None
                received += len(chunk)
                bar.update(len(chunk))

    if total is not None and received != total:
        # http.client ends the body quietly when the server closes early, so the count is the check.
        raise InterruptedDownload(f"the download of {url} stopped at {received} of {total} bytes; "
                                  "run again to resume")
    return received


def _say(message: str, verbose: bool) -> None:
    if verbose:
        print(message, flush=True)


def fetch_task(task: str, data_dir: str | os.PathLike, keep: bool = False, mirror: str | None = None,
               md5_override: str | None = None, verbose: bool = True, attempts: int = DOWNLOAD_ATTEMPTS) -> Path:
    """Download, verify and unpack an MSD task into `data_dir/TaskNN_Name`.

    Nothing is downloaded when the task folder already holds a dataset.json, or when a verified
    `TaskNN_Name.tar` (kept by an earlier `keep=True`) is already in `data_dir`.

    Args:
        task: '01'-'10' (or '1', 'Task01_BrainTumour').
        data_dir: folder that receives the task.
        keep: keep `TaskNN_Name.tar` after extraction.
        mirror: base URL (or local folder) to fetch from instead of the public location.
        md5_override: expected MD5 instead of the published one (for mirrors with other archives).
        verbose: print progress bars and status lines.
        attempts: downloads tried in this call while each one makes progress.

    Returns:
        The task folder.

    Raises:
        DownloadError: with a one-sentence reason; no task folder and no complete-looking archive
            are left behind.
    """
    name = task_name(task)
    data_dir = Path(data_dir)
    target = data_dir / name
    if (target / "dataset.json").is_file():
        _say(f"{target} already exists with a dataset.json; nothing to download.", verbose)
        return target
    if target.exists():
        raise DownloadError(f"{target} exists but has no dataset.json; remove it and run again")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DownloadError(f"could not create {data_dir} ({error.strerror or error})") from None

    md5 = md5_override or MSD_MD5[task_number(name)]
    archive = data_dir / f"{name}.tar"
    part = data_dir / f"{name}.tar.part"
    if archive.is_file():
        _say(f"Using the archive already in {archive}.", verbose)
        try:
            verify_archive(archive, md5, progress=verbose)
        except DownloadError as error:
            raise DownloadError(f"{error}; remove {archive} to download it again") from None
    else:
        url = url_for(name, mirror)
        _say(f"Downloading {url}", verbose)
        size = _download_with_retries(url, part, verbose, attempts)
        try:
            verify_archive(part, md5, size, progress=verbose)
        except DownloadError as error:
            # Resuming a corrupt file cannot repair it, so the next run starts from scratch.
            part.unlink(missing_ok=True)
            raise DownloadError(f"{error}; the download was removed, run again to start over") from None
        os.replace(part, archive)

    # Unpacked under a hidden name and renamed at the end, so an interrupted extraction never
    # leaves a task folder that looks complete; a leftover from a killed run is cleared first.
    staging = data_dir / f".{name}.extracting"
    shutil.rmtree(staging, ignore_errors=True)
    _say(f"Extracting {archive.name}", verbose)
    try:
        safe_extract(archive, staging, top=name)
        if not (staging / "dataset.json").is_file():
            raise DownloadError(f"{archive.name} does not contain {name}/dataset.json")
        os.replace(staging, target)
    except DownloadError as error:
        # The archive passed verification, so it stays for inspection instead of being fetched again.
        raise DownloadError(f"{error}; the archive stays in {archive}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not keep:
        archive.unlink()
    return target


def _download_with_retries(url: str, part: Path, verbose: bool, attempts: int) -> int:
    """`download`, retried at once after a dropped connection as long as each attempt adds bytes."""
    attempt = 1
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            return download(url, part, progress=verbose)
        except InterruptedDownload:
            after = part.stat().st_size if part.exists() else 0
            if attempt >= attempts or after <= before:
                raise
            _say(f"Connection lost after {after} bytes; resuming.", verbose)
        attempt += 1


def obtain_task(task: str, data: str | os.PathLike, keep: bool = False, mirror: str | None = None, seed: int = 0,
                n_cases: int = 32, n_test: int = 4, size: int = 64) -> Path:
    """Make a task available in `data`: the synthetic task 00 offline, or an MSD task 01-10.

    Args:
        task, data, keep, mirror: the MSD task, the folder, keep the archive, another base URL (`fetch_task`).
        seed, n_cases, n_test, size: the synthetic task's (`make_synthetic_task`).

    Returns:
        The task folder.

    Raises:
        UserError: the task cannot be fetched or generated with these arguments.
    """
    if task_number(str(task)) == "00":
        # Imported here so that fetching MSD tasks does not need the generator's dependencies.
        from data_preprocessing.synthetic import make_synthetic_task

        try:
            return Path(make_synthetic_task(data, seed=seed, n_cases=n_cases, n_test=n_test, size=size))
        except ValueError as error:  # the generator's message names the argument that is out of range
            raise UserError(f"synthetic task 00: {error}") from None
    return fetch_task(task, data, keep=keep, mirror=mirror)
