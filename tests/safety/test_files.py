"""Files are safe: writes are atomic (an interrupted or failed write keeps the previous file and
leaves no temporary file), a full disk is a clear error, and loading never runs code a file names."""
import errno
import os
import threading

import pytest

from fxprune.atomic import DiskFullError, atomic_write, write_bytes, write_text
from fxprune.errors import FxPruneError


def _folder_names(path):
    return sorted(os.listdir(path.parent))


# --- atomic writes -------------------------------------------------------------------------

def test_atomic_write_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "out.bin"
    write_bytes(path, b"old")
    write_bytes(path, b"new content")
    assert path.read_bytes() == b"new content"
    assert _folder_names(path) == ["out.bin"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, RuntimeError])
def test_interrupted_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, exc):
    path = tmp_path / "out.bin"
    write_bytes(path, b"the good file")
    with pytest.raises(exc):
        with atomic_write(path) as f:
            f.write(b"half of a new fi")
            f.flush()
            raise exc()
    assert path.read_bytes() == b"the good file"
    assert _folder_names(path) == ["out.bin"]


@pytest.mark.parametrize("code", [errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)])
def test_disk_full_is_a_clear_error_and_the_old_file_is_unchanged(tmp_path, code):
    path = tmp_path / "out.json"
    write_text(path, "{}")
    with pytest.raises(DiskFullError) as info:
        with atomic_write(path, "w") as f:
            f.write("{\"a\": ")
            raise OSError(code, os.strerror(code))
    err = info.value
    assert isinstance(err, FxPruneError) and isinstance(err, OSError) and err.errno == code
    assert str(err) == f"disk full while writing {str(path)!r}; the previous file is unchanged " \
                       "(free some space or write elsewhere)"
    assert isinstance(err.__cause__, OSError)
    assert path.read_text() == "{}" and _folder_names(path) == ["out.json"]


def test_other_os_errors_pass_through_unchanged(tmp_path):
    path = tmp_path / "out.bin"
    with pytest.raises(PermissionError):
        with atomic_write(path) as f:
            raise PermissionError(errno.EACCES, "no")
    assert _folder_names(path) == []


def test_new_file_gets_normal_permissions_and_keeps_the_old_ones(tmp_path):
    path = tmp_path / "out.bin"
    write_bytes(path, b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    os.chmod(path, 0o640)
    write_bytes(path, b"y")
    assert path.stat().st_mode & 0o777 == 0o640


def test_concurrent_writers_leave_one_complete_file(tmp_path):
    path = tmp_path / "out.bin"
    payloads = [bytes([i]) * (200_000 + i) for i in range(8)]
    errors = []

    def writer(data):
        try:
            for _ in range(5):
                write_bytes(path, data)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert path.read_bytes() in payloads
    assert _folder_names(path) == ["out.bin"]
