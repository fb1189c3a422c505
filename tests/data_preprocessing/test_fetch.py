"""Fetching MSD archives, against a local HTTP server: resume, verification, safe extraction, CLI errors."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import subprocess
import sys
import tarfile
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import download
from data_preprocessing import fetch
from data_preprocessing.fetch import DownloadError, InterruptedDownload

REPO = Path(__file__).resolve().parents[2]
TASK = "04"
NAME = "Task04_Hippocampus"


# ---------------------------------------------------------------------------------------------
# A local archive server
# ---------------------------------------------------------------------------------------------
class ArchiveServer:
    """Serves in-memory files over HTTP/1.0 with `Range: bytes=N-` support and scripted faults.

    Attributes:
        files: URL path -> body.
        requests: (path, Range header or None) of every request, in order.
        drop_after: with `drops` > 0, the next responses stop after this many body bytes.
        truncate_by: every response sends this many bytes fewer than its Content-Length.
        honour_ranges: answer Range requests with 206 (else the whole file with 200).
        ranges_from_zero: answer Range requests with 206 and the whole file (a misbehaving server).
        stall: when set, responses send `drop_after` bytes and then wait for this event (a stalled server).
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.drop_after = 0
        self.drops = 0
        self.truncate_by = 0
        self.honour_ranges = True
        self.ranges_from_zero = False
        self.stall: threading.Event | None = None
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.archive_server = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def publish(self, data: bytes, name: str = NAME) -> str:
        self.files[f"/{name}.tar"] = data
        return hashlib.md5(data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        state: ArchiveServer = self.server.archive_server
        range_header = self.headers.get("Range")
        state.requests.append((self.path, range_header))
        data = state.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = int(range_header.removeprefix("bytes=").rstrip("-")) if range_header and state.honour_ranges else 0
        if start >= len(data) and range_header:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        partial = bool(start) or (bool(range_header) and state.ranges_from_zero)
        if state.ranges_from_zero:
            start = 0
        body = data[start:]
        self.send_response(206 if partial else 200)
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if state.stall is not None:
            self.wfile.write(body[: state.drop_after])
            self.wfile.flush()
            state.stall.wait(timeout=30)
            return
        if state.drops > 0:
            state.drops -= 1
            body = body[: state.drop_after]
        elif state.truncate_by:
            body = body[: max(0, len(body) - state.truncate_by)]
        self.wfile.write(body)


@pytest.fixture
def server():
    archive_server = ArchiveServer()
    thread = threading.Thread(target=archive_server.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield archive_server
    archive_server.httpd.shutdown()
    archive_server.httpd.server_close()
    thread.join()


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ---------------------------------------------------------------------------------------------
# Archives
# ---------------------------------------------------------------------------------------------
def payload(n_bytes: int, seed: int) -> bytes:
    return bytes((seed + 31 * i + (i >> 7)) % 256 for i in range(n_bytes))


MSD_FILES = {
    "dataset.json": json.dumps({"name": "Hippocampus", "modality": {"0": "MRI"},
                                "labels": {"0": "background", "1": "Anterior"},
                                "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}],
                                "test": ["./imagesTs/y.nii.gz"]}).encode(),
    "imagesTr/x.nii.gz": payload(3000, 1),
    "labelsTr/x.nii.gz": payload(1500, 2),
    "imagesTs/y.nii.gz": payload(2500, 3),
}


def add_file(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


def add_entry(archive: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    archive.addfile(info)


def msd_tar(extra: list[tuple[str, bytes, str]] | None = None, with_dataset_json: bool = True) -> bytes:
    """An MSD-layout archive `Task04_Hippocampus/...`, with a macOS `._` companion and optional extra entries.

    Args:
        extra: (name, tar type, link target or file content as text) appended after the task's files.
        with_dataset_json: include `dataset.json`.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for folder in ("", "/imagesTr", "/labelsTr", "/imagesTs"):
            add_entry(archive, NAME + folder, tarfile.DIRTYPE)
        for name, data in MSD_FILES.items():
            if name != "dataset.json" or with_dataset_json:
                add_file(archive, f"{NAME}/{name}", data)
        add_file(archive, f"{NAME}/imagesTr/._x.nii.gz", b"resource fork")
        for name, kind, text in extra or []:
            if kind == tarfile.REGTYPE:
                add_file(archive, name, text.encode())
            else:
                add_entry(archive, name, kind, text)
    return buffer.getvalue()


def all_paths(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "download.py"), *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


# ---------------------------------------------------------------------------------------------
# URLs and task names
# ---------------------------------------------------------------------------------------------
def test_url_for_public_location_and_mirrors(tmp_path):
    assert fetch.url_for("9") == "https://msd-for-monai.s3-us-west-2.amazonaws.com/Task09_Spleen.tar"
    assert fetch.url_for("Task01_BrainTumour", "http://mirror.local/msd/") == \
        "http://mirror.local/msd/Task01_BrainTumour.tar"
    assert fetch.url_for("10", str(tmp_path)) == f"file://{tmp_path.resolve()}/Task10_Colon.tar"
    assert set(fetch.MSD_MD5) == {f"{n:02d}" for n in range(1, 11)}
    with pytest.raises(DownloadError, match="unknown task '11'"):
        fetch.url_for("11")


# ---------------------------------------------------------------------------------------------
# Success paths
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [False, True])
def test_fetch_verifies_extracts_and_handles_the_archive(server, tmp_path, keep):
    md5 = server.publish(msd_tar())
    task_dir = fetch.fetch_task(TASK, tmp_path, keep=keep, mirror=server.url, md5_override=md5, verbose=False)

    assert task_dir == tmp_path / NAME
    for name, data in MSD_FILES.items():
        assert (task_dir / name).read_bytes() == data
    assert not (task_dir / "imagesTr" / "._x.nii.gz").exists()
    expected = {NAME, *(f"{NAME}/{folder}" for folder in ("imagesTr", "labelsTr", "imagesTs"))}
    expected |= {f"{NAME}/{name}" for name in MSD_FILES}
    if keep:
        expected.add(f"{NAME}.tar")
        assert hashlib.md5((tmp_path / f"{NAME}.tar").read_bytes()).hexdigest() == md5
    assert all_paths(tmp_path) == expected
    assert server.requests == [(f"/{NAME}.tar", None)]


def test_kept_archive_is_reused_without_network(tmp_path, closed_port_url):
    data = msd_tar()
    (tmp_path / f"{NAME}.tar").write_bytes(data)
    task_dir = fetch.fetch_task(TASK, tmp_path, mirror=closed_port_url, md5_override=hashlib.md5(data).hexdigest(),
                                verbose=False)
    assert (task_dir / "dataset.json").read_bytes() == MSD_FILES["dataset.json"]
    assert not (tmp_path / f"{NAME}.tar").exists()


def test_local_folder_mirror(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    data = msd_tar()
    (mirror / f"{NAME}.tar").write_bytes(data)
    task_dir = fetch.fetch_task(TASK, tmp_path / "data", mirror=str(mirror), md5_override=hashlib.md5(data).hexdigest(),
                                verbose=False)
    assert (task_dir / "imagesTs" / "y.nii.gz").read_bytes() == MSD_FILES["imagesTs/y.nii.gz"]


def test_existing_task_is_left_alone_and_exits_zero(tmp_path, closed_port_url):
    (tmp_path / NAME).mkdir()
    (tmp_path / NAME / "dataset.json").write_text("{}")
    result = run_cli("--task", TASK, "--data", str(tmp_path), "--mirror", closed_port_url)
    assert result.returncode == 0, result.stderr
    assert "already exists" in result.stdout
    assert all_paths(tmp_path) == {NAME, f"{NAME}/dataset.json"}


def test_existing_folder_without_dataset_json_is_an_error(tmp_path, closed_port_url):
    (tmp_path / NAME).mkdir()
    result = run_cli("--task", TASK, "--data", str(tmp_path), "--mirror", closed_port_url)
    assert_one_error_line(result, "has no dataset.json")


def test_task_00_writes_the_synthetic_task_offline(tmp_path, monkeypatch, capsys, closed_port_url):
    calls = []

    def make_synthetic_task(data_dir, seed, n_cases, n_test, size):
        calls.append((Path(data_dir), seed, n_cases, n_test, size))
        return Path(data_dir) / "Task00_Synthetic"

    monkeypatch.setitem(sys.modules, "data_preprocessing.synthetic",
                        types.SimpleNamespace(make_synthetic_task=make_synthetic_task))
    argv = ["--task", "00", "--data", str(tmp_path), "--mirror", closed_port_url,
            "--seed", "3", "--n_cases", "5", "--n_test", "2", "--size", "24"]
    assert download.main(argv) == 0
    assert calls == [(tmp_path, 3, 5, 2, 24)]
    assert str(tmp_path / "Task00_Synthetic") in capsys.readouterr().out


def test_task_00_reports_bad_arguments_in_one_line(tmp_path, monkeypatch, capsys):
    def make_synthetic_task(data_dir, seed, n_cases, n_test, size):
        raise ValueError(f"size must be at least 16 voxels, got {size}")

    monkeypatch.setitem(sys.modules, "data_preprocessing.synthetic",
                        types.SimpleNamespace(make_synthetic_task=make_synthetic_task))
    assert download.main(["--task", "0", "--data", str(tmp_path), "--size", "8"]) == 1
    assert capsys.readouterr().err == "error: synthetic task 00: size must be at least 16 voxels, got 8\n"


# ---------------------------------------------------------------------------------------------
# Interrupted and truncated transfers
# ---------------------------------------------------------------------------------------------
def test_interrupted_download_resumes_on_rerun(server, tmp_path):
    data = msd_tar()
    md5 = server.publish(data)
    server.drops, server.drop_after = 1, 5000

    with pytest.raises(InterruptedDownload, match="stopped at 5000 of"):
        fetch.fetch_task(TASK, tmp_path, mirror=server.url, md5_override=md5, verbose=False, attempts=1)
    part = tmp_path / f"{NAME}.tar.part"
    assert part.read_bytes() == data[:5000]
    assert all_paths(tmp_path) == {part.name}

    task_dir = fetch.fetch_task(TASK, tmp_path, mirror=server.url, md5_override=md5, verbose=False)
    assert server.requests == [(f"/{NAME}.tar", None), (f"/{NAME}.tar", "bytes=5000-")]
    assert (task_dir / "imagesTr" / "x.nii.gz").read_bytes() == MSD_FILES["imagesTr/x.nii.gz"]
    assert not part.exists()


def test_dropped_connections_are_resumed_within_one_run(server, tmp_path):
    data = msd_tar()
    md5 = server.publish(data)
    server.drops, server.drop_after = 2, 4000
    fetch.fetch_task(TASK, tmp_path, mirror=server.url, md5_override=md5, verbose=False)
    assert [header for _, header in server.requests] == [None, "bytes=4000-", "bytes=8000-"]
    assert (tmp_path / NAME / "dataset.json").is_file()


def test_server_without_range_support_starts_over(server, tmp_path):
    data = msd_tar()
    server.publish(data)
    server.honour_ranges = False
    part = tmp_path / "x.tar.part"
    part.write_bytes(b"stale bytes from another file")
    assert fetch.download(f"{server.url}/{NAME}.tar", part) == len(data)
    assert part.read_bytes() == data
    assert server.requests[0][1] == f"bytes={len(b'stale bytes from another file')}-"


def test_partial_response_from_the_wrong_offset_starts_over(server, tmp_path):
    data = msd_tar()
    server.publish(data)
    server.ranges_from_zero = True
    part = tmp_path / "x.tar.part"
    part.write_bytes(data[:3000])
    assert fetch.download(f"{server.url}/{NAME}.tar", part) == len(data)
    assert part.read_bytes() == data
    assert [header for _, header in server.requests] == ["bytes=3000-", None]


def test_part_longer_than_the_file_starts_over(server, tmp_path):
    data = msd_tar()
    server.publish(data)
    part = tmp_path / "x.tar.part"
    part.write_bytes(data + b"trailing garbage")
    assert fetch.download(f"{server.url}/{NAME}.tar", part) == len(data)
    assert part.read_bytes() == data
    assert [header for _, header in server.requests] == [f"bytes={len(data) + 16}-", None]


def test_stalled_server_times_out_and_keeps_the_part(server, tmp_path):
    data = msd_tar()
    server.publish(data)
    server.stall, server.drop_after = threading.Event(), 4096
    part = tmp_path / "x.tar.part"
    try:
        with pytest.raises(InterruptedDownload, match="run again to resume"):
            fetch.download(f"{server.url}/{NAME}.tar", part, timeout_s=0.3)
    finally:
        server.stall.set()
    assert data.startswith(part.read_bytes())


def test_complete_part_is_not_downloaded_again(server, tmp_path):
    data = msd_tar()
    server.publish(data)
    part = tmp_path / "x.tar.part"
    part.write_bytes(data)
    assert fetch.download(f"{server.url}/{NAME}.tar", part) == len(data)
    assert part.read_bytes() == data
    assert server.requests == [(f"/{NAME}.tar", f"bytes={len(data)}-")]


def test_truncated_download_fails_cleanly_through_the_cli(server, tmp_path):
    data = msd_tar()
    server.publish(data)
    server.truncate_by = 700
    result = run_cli("--task", TASK, "--data", str(tmp_path), "--mirror", server.url)
    assert_one_error_line(result, f"stopped at {len(data) - 700} of {len(data)} bytes", "run again to resume")
    # Only the .part remains: no archive or task folder that could pass for complete.
    assert all_paths(tmp_path) == {f"{NAME}.tar.part"}
    assert (tmp_path / f"{NAME}.tar.part").read_bytes() == data[: len(data) - 700]


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------
def test_checksum_mismatch_keeps_nothing(server, tmp_path):
    server.publish(msd_tar())
    with pytest.raises(DownloadError, match=r"MD5 [0-9a-f]{32}, expected 0{32}; the download was removed"):
        fetch.fetch_task(TASK, tmp_path, mirror=server.url, md5_override="0" * 32, verbose=False)
    assert all_paths(tmp_path) == set()


def test_published_md5_is_checked_through_the_cli(server, tmp_path):
    data = msd_tar()
    server.publish(data)
    result = run_cli("--task", TASK, "--data", str(tmp_path), "--mirror", server.url)
    assert_one_error_line(result, f"MD5 {hashlib.md5(data).hexdigest()}, expected {fetch.MSD_MD5[TASK]}")
    assert all_paths(tmp_path) == set()


def member_offsets(data: bytes) -> dict[str, tuple[int, int]]:
    """(header offset, data offset) of each member of a tar archive."""
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return {member.name: (member.offset, member.offset_data) for member in archive}


@pytest.mark.parametrize("corrupt", ["not a tar", "cut at a header", "cut inside a member", "no end block"])
def test_broken_tar_is_rejected(server, tmp_path, corrupt):
    data = msd_tar()
    header, body = member_offsets(data)[f"{NAME}/labelsTr/x.nii.gz"]
    end = max(header for header, _ in member_offsets(data).values())
    broken = {"not a tar": payload(20_000, 9), "cut at a header": data[:header],
              "cut inside a member": data[: body + 100], "no end block": data[: end + 1024]}[corrupt]
    md5 = server.publish(broken)
    with pytest.raises(DownloadError, match="is not a readable tar archive"):
        fetch.fetch_task(TASK, tmp_path, mirror=server.url, md5_override=md5, verbose=False)
    assert all_paths(tmp_path) == set()


def test_verify_archive_checks_size(tmp_path):
    path = tmp_path / "a.tar"
    path.write_bytes(msd_tar())
    fetch.verify_archive(path, hashlib.md5(path.read_bytes()).hexdigest(), path.stat().st_size)
    with pytest.raises(DownloadError, match="expected 1$"):
        fetch.verify_archive(path, size=1)


def test_archive_without_dataset_json_is_rejected(server, tmp_path):
    md5 = server.publish(msd_tar(with_dataset_json=False))
    with pytest.raises(DownloadError, match=f"does not contain {NAME}/dataset.json"):
        fetch.fetch_task(TASK, tmp_path, mirror=server.url, md5_override=md5, verbose=False)
    assert all_paths(tmp_path) == {f"{NAME}.tar"}


# ---------------------------------------------------------------------------------------------
# Unsafe archives
# ---------------------------------------------------------------------------------------------
UNSAFE = {
    "parent traversal": [("../evil", tarfile.REGTYPE, "x")],
    "traversal inside the task": [(f"{NAME}/../../evil", tarfile.REGTYPE, "x")],
    "absolute path": [("{outside}/evil", tarfile.REGTYPE, "x")],
    "relative symlink escaping": [(f"{NAME}/imagesTr/link", tarfile.SYMTYPE, "../../evil"),
                                  (f"{NAME}/imagesTr/link/f", tarfile.REGTYPE, "x")],
    "absolute symlink": [(f"{NAME}/link", tarfile.SYMTYPE, "{outside}")],
    "symlink escaping through another symlink": [(f"{NAME}/a", tarfile.DIRTYPE, ""),
                                                 (f"{NAME}/a/up", tarfile.SYMTYPE, ".."),
                                                 (f"{NAME}/a/out", tarfile.SYMTYPE, "up/.."),
                                                 (f"{NAME}/a/out/evil", tarfile.REGTYPE, "x")],
    "hard link outside the task": [(f"{NAME}/hard", tarfile.LNKTYPE, f"{NAME}/../evil")],
    "hard link to a member beside the task": [(f"{NAME}/hard", tarfile.LNKTYPE, "other/file")],
    "character device": [(f"{NAME}/dev", tarfile.CHRTYPE, "")],
    "fifo": [(f"{NAME}/pipe", tarfile.FIFOTYPE, "")],
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_members_are_refused(server, tmp_path, case):
    outside = tmp_path / "outside"
    extra = [(name.format(outside=outside), kind, text.format(outside=outside)) for name, kind, text in UNSAFE[case]]
    md5 = server.publish(msd_tar(extra))
    data_dir = tmp_path / "data" / "raw"

    with pytest.raises(DownloadError, match="refusing to extract"):
        fetch.fetch_task(TASK, data_dir, mirror=server.url, md5_override=md5, verbose=False)
    # Nothing outside the data folder, no task folder and no staging folder; the verified archive stays.
    assert all_paths(tmp_path) == {"data", "data/raw", f"data/raw/{NAME}.tar"}


def test_links_inside_the_task_are_kept(tmp_path):
    archive = tmp_path / "links.tar"
    archive.write_bytes(msd_tar([(f"{NAME}/imagesTr/alias.nii.gz", tarfile.SYMTYPE, "x.nii.gz"),
                                 (f"{NAME}/labels", tarfile.SYMTYPE, "labelsTr"),
                                 (f"{NAME}/imagesTs/copy.nii.gz", tarfile.LNKTYPE, f"{NAME}/imagesTs/y.nii.gz")]))
    fetch.safe_extract(archive, tmp_path / "task", top=NAME)
    task_dir = tmp_path / "task"
    assert (task_dir / "imagesTr" / "alias.nii.gz").is_symlink()
    assert (task_dir / "imagesTr" / "alias.nii.gz").read_bytes() == MSD_FILES["imagesTr/x.nii.gz"]
    assert (task_dir / "labels" / "x.nii.gz").read_bytes() == MSD_FILES["labelsTr/x.nii.gz"]
    assert (task_dir / "imagesTs" / "copy.nii.gz").read_bytes() == MSD_FILES["imagesTs/y.nii.gz"]


def test_archive_without_top_folder_is_extracted_as_is(tmp_path):
    archive = tmp_path / "flat.tar"
    with tarfile.open(archive, "w") as flat:
        add_file(flat, "dataset.json", MSD_FILES["dataset.json"])
        add_file(flat, "imagesTr/x.nii.gz", MSD_FILES["imagesTr/x.nii.gz"])
    fetch.safe_extract(archive, tmp_path / "task", top=NAME)
    assert all_paths(tmp_path / "task") == {"dataset.json", "imagesTr", "imagesTr/x.nii.gz"}


def test_cli_reports_an_unsafe_archive_in_one_line(server, tmp_path, monkeypatch, capsys):
    md5 = server.publish(msd_tar([("../evil", tarfile.REGTYPE, "x")]))
    monkeypatch.setitem(fetch.MSD_MD5, TASK, md5)
    assert download.main(["--task", TASK, "--data", str(tmp_path), "--mirror", server.url]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: {NAME}.tar: refusing to extract '../evil' ('..' in the path); "
                     f"the archive stays in {tmp_path / NAME}.tar"]
    assert all_paths(tmp_path) == {f"{NAME}.tar"}


def test_cli_downloads_with_the_published_md5(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(fetch.MSD_MD5, TASK, server.publish(msd_tar()))
    assert download.main(["--task", TASK, "--data", str(tmp_path), "--mirror", server.url, "--keep"]) == 0
    assert f"Task ready in {tmp_path / NAME}" in capsys.readouterr().out
    assert (tmp_path / NAME / "dataset.json").is_file() and (tmp_path / f"{NAME}.tar").is_file()


# ---------------------------------------------------------------------------------------------
# Network errors through the command line
# ---------------------------------------------------------------------------------------------
def test_missing_archive_is_one_clear_line(server, tmp_path):
    result = run_cli("--task", TASK, "--data", str(tmp_path), "--mirror", server.url)
    assert_one_error_line(result, "HTTP 404", f"{NAME}.tar")
    assert all_paths(tmp_path) == set()


def test_refused_connection_is_one_clear_line(tmp_path, closed_port_url):
    result = run_cli("--task", TASK, "--data", str(tmp_path), "--mirror", closed_port_url)
    assert_one_error_line(result, "could not reach", "refused")
    assert all_paths(tmp_path) == set()


def test_data_path_that_is_a_file_is_one_clear_line(tmp_path, closed_port_url, capsys):
    (tmp_path / "data").write_text("not a folder")
    assert download.main(["--task", TASK, "--data", str(tmp_path / "data"), "--mirror", closed_port_url]) == 1
    assert capsys.readouterr().err.startswith(f"error: could not create {tmp_path / 'data'} (")


def test_unknown_task_is_one_clear_line(tmp_path):
    result = run_cli("--task", "42", "--data", str(tmp_path))
    assert_one_error_line(result, "unknown task '42'")
