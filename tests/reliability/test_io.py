"""Atomic writes that fail (disk full, no permission) leave nothing behind; damaged .npy files are recognised."""

from __future__ import annotations

import errno
import gzip
import os
import pickle
import stat

import nibabel as nib
import numpy as np
import pytest

import utils.io as io
from utils.errors import UserError
from utils.io import (
    WriteError,
    atomic_open,
    check_writable,
    npy_is_complete,
    npy_problem,
    read_npy_header,
    save_json,
    save_nifti,
    save_npy,
)
from utils.logger import DLLogger


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_rename_leaves_neither_file_nor_temporary(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(WriteError, match=r"cannot write .*case_x\.npy: No space left on device") as caught:
        save_npy(tmp_path / "case_x.npy", np.zeros((2, 3), np.float32))
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, UserError)
    assert list(tmp_path.iterdir()) == []


def test_a_write_cut_by_a_full_disk_leaves_the_old_file(tmp_path):
    path = tmp_path / "config.json"
    save_json(path, {"version": 1})
    with pytest.raises(WriteError, match="No space left on device"), atomic_open(path, "w") as handle:
        handle.write('{"version": 2, "trunc')
        no_space()
    assert path.read_text() == '{\n  "version": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_other_errors_pass_through_and_clean_up(tmp_path):
    with pytest.raises(ZeroDivisionError), atomic_open(tmp_path / "out.bin") as handle:
        handle.write(b"partial")
        1 / 0  # noqa: B018
    assert list(tmp_path.iterdir()) == []


def test_written_files_get_the_usual_mode_and_the_folder_is_synced(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(io, "fsync_folder", lambda folder: synced.append(folder))
    save_npy(tmp_path / "a.npy", np.arange(3))
    assert stat.S_IMODE((tmp_path / "a.npy").stat().st_mode) == io.FILE_MODE
    umask = os.umask(0)
    os.umask(umask)
    assert io.FILE_MODE == 0o666 & ~umask
    assert synced == [tmp_path]


def test_a_write_error_survives_pickling():
    error = WriteError("/out/case_0_x.npy", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    copy = pickle.loads(pickle.dumps(error))  # as it crosses from a worker process to the parent
    assert type(copy) is WriteError and str(copy) == "cannot write /out/case_0_x.npy: No space left on device"
    assert (copy.path, copy.errno) == (error.path, errno.ENOSPC)


@pytest.mark.parametrize("name", ["case.nii.gz", "case.nii"])
def test_save_nifti_writes_what_nibabel_writes_and_nothing_on_failure(tmp_path, monkeypatch, name):
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    image = nib.Nifti1Image(np.arange(60, dtype=np.uint8).reshape(3, 4, 5), affine)
    nib.save(image, str(tmp_path / f"reference_{name}"))
    save_nifti(tmp_path / name, image)
    written, reference = (tmp_path / name).read_bytes(), (tmp_path / f"reference_{name}").read_bytes()
    if name.endswith(".gz"):
        written, reference = gzip.decompress(written), gzip.decompress(reference)
    assert written == reference
    assert stat.S_IMODE((tmp_path / name).stat().st_mode) == io.FILE_MODE

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(WriteError, match=f"cannot write .*new_{name}: No space left on device"):
        save_nifti(tmp_path / f"new_{name}", image)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, f"reference_{name}"])


def test_check_writable_names_the_folder(tmp_path, monkeypatch):
    check_writable(tmp_path / "new" / "folder")
    assert (tmp_path / "new" / "folder").is_dir() and not list((tmp_path / "new" / "folder").iterdir())
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(WriteError, match=f"cannot write {blocker / 'sub'}"):
        check_writable(blocker / "sub")

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(io.tempfile, "mkstemp", denied)
    with pytest.raises(WriteError, match="Permission denied"):
        check_writable(tmp_path)


# The header takes 128 bytes and the data 2 * 4 * 4 * 2 float32 = 256 bytes.
@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:-7], "has 377 bytes but its header describes 384"),
    (lambda data: data + b"\0" * 3, "has 387 bytes but its header describes 384"),
    (lambda data: b"\x93NUMPY\x01\x00" + b"garbage" * 9, "is not a readable .npy file"),
    (lambda data: os.urandom(len(data)), "is not a readable .npy file"),
    (lambda data: data[:20], "is not a readable .npy file"),
    (lambda data: b"", "is not a readable .npy file"),
])
def test_damaged_npy_files_are_described(tmp_path, damage, message):
    path = tmp_path / "case_x.npy"
    np.save(path, np.zeros((2, 4, 4, 2), np.float32))
    assert npy_problem(path) is None and read_npy_header(path).shape == (2, 4, 4, 2)
    path.write_bytes(damage(path.read_bytes()))
    assert message in npy_problem(path) and not npy_is_complete(path)


def test_npy_checks_shape_and_refuses_objects(tmp_path):
    path = tmp_path / "case_y.npy"
    np.save(path, np.zeros((1, 3, 3), np.uint8))
    assert npy_is_complete(path, (1, 3, 3))
    assert npy_problem(path, (1, 3, 4)) == "has shape (1, 3, 3), expected (1, 3, 4)"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert npy_problem(path) == "holds Python objects, not numbers"
    assert npy_problem(tmp_path / "missing.npy") == "does not exist"


def test_a_log_that_cannot_be_written_is_a_clear_error(tmp_path, monkeypatch):
    logger = DLLogger(tmp_path / "logs.json")
    logger.log(0, {"train_loss": 1.0})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(WriteError, match=r"logs\.json: No space left on device"):
        logger.log(1, {"train_loss": 0.5})
