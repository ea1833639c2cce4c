"""Atomic file writes: a file is replaced whole or not at all.

Writing in place loses the good file when the write is cut short (Ctrl-C, a full disk, a crash):
what is left is truncated. :func:`atomic_write` writes to a temporary file in the same folder,
flushes it to disk and ``os.replace``-s it over the target (atomic on POSIX and Windows within
one file system); on any failure, ``KeyboardInterrupt`` included, the temporary file is removed
and the previous file is left as it was. Concurrent writers to one path each write their own
temporary file, so the last ``os.replace`` wins and the file is always one complete write.

Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
    >>> with atomic_write(path, "w") as f:
    ...     _ = f.write("hello")
    >>> open(path).read()
    'hello'
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

from .errors import FxPruneError

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class DiskFullError(FxPruneError, OSError):
    """No space (or quota) left while writing a file; the previous file, if any, is unchanged.

    Example:
        >>> err = DiskFullError("model.pt")
        >>> str(err)
        "disk full while writing 'model.pt'; the previous file is unchanged (free some space or write elsewhere)"
        >>> isinstance(err, OSError), err.filename
        (True, 'model.pt')
    """

    def __init__(self, path: str | os.PathLike, code: int = errno.ENOSPC):
        self.message = (f"disk full while writing {os.fspath(path)!r}; the previous file is "
                        "unchanged (free some space or write elsewhere)")
        super().__init__(code, self.message, os.fspath(path))

    def __str__(self) -> str:  # OSError would print "[Errno 28] ...: 'path'"
        return self.message


def _umask() -> int:
    """The process umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022  # the usual default; only the new file's permission bits depend on it


def _file_mode(path: Path) -> int:
    """Permission bits the new file gets: the old file's, else what ``open`` would give."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every system can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _raise_disk_full(path: Path, err: OSError) -> None:
    """A full disk or quota while writing ``path`` is a :class:`DiskFullError`."""
    if err.errno in _DISK_FULL:
        raise DiskFullError(path, err.errno) from err


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *,
                 encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing; on success it replaces ``path``.

    ``mode`` is ``"wb"`` (default) or ``"w"`` (text, with ``encoding``, UTF-8 by default). Parent
    folders are created. On any exception (``KeyboardInterrupt`` and ``SystemExit`` included) the
    temporary file is removed and ``path`` is untouched; an ``OSError`` for a full disk or an
    exhausted quota becomes :class:`DiskFullError`, other errors propagate unchanged.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "a.bin")
        >>> with atomic_write(path) as f:
        ...     _ = f.write(b"old")
        >>> try:
        ...     with atomic_write(path) as f:
        ...         _ = f.write(b"half of the new")
        ...         raise KeyboardInterrupt
        ... except KeyboardInterrupt:
        ...     pass
        >>> open(path, "rb").read(), sorted(os.listdir(os.path.dirname(path)))
        (b'old', ['a.bin'])
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, _file_mode(path))
        text = {"encoding": encoding or "utf-8"} if mode == "w" else {}
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _sync_folder(path.parent)
    except OSError as err:
        _raise_disk_full(path, err)
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`); returns the path.

    Example:
        >>> import os, tempfile
        >>> p = write_bytes(os.path.join(tempfile.mkdtemp(), "x.bin"), b"abc")
        >>> p.read_bytes()
        b'abc'
    """
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`); returns the path.

    Example:
        >>> import os, tempfile
        >>> p = write_text(os.path.join(tempfile.mkdtemp(), "x.json"), "{}")
        >>> p.read_text()
        '{}'
    """
    with atomic_write(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """For writers that take a file name (``torch.onnx.export``, ``torch.jit.save``): yields a
    path with ``path``'s name in a new temporary folder next to it; on success every file written
    in that folder is moved next to ``path`` with ``os.replace`` (side files such as ONNX
    external data first, ``path`` itself last), so each file is replaced whole. On any failure the
    temporary folder is removed and nothing next to ``path`` changes; a full disk or quota is
    :class:`DiskFullError`. Check inside the block that the writer wrote the file.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "m.bin")
        >>> with atomic_path(path) as tmp:
        ...     _ = tmp.write_bytes(b"model")
        ...     _ = (tmp.parent / "m.bin.data").write_bytes(b"weights")
        >>> sorted(os.listdir(os.path.dirname(path)))
        ['m.bin', 'm.bin.data']
    """
    path = Path(path)
    folder: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        yield folder / path.name
        written = sorted(p for p in folder.iterdir() if p.is_file())
        for p in sorted(written, key=lambda p: p.name == path.name):
            os.replace(p, path.parent / p.name)
        _sync_folder(path.parent)
    except OSError as err:
        _raise_disk_full(path, err)
        raise
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
