"""Files the ``fxprune`` command writes: checked before the work, written whole or not at all.

An output path (``--out``, ``--json PATH``) is checked before a long prune or benchmark starts:
it must not be a folder and its folder must exist (or, where the command creates it, its nearest
existing folder) and accept a new file. The file is then written to a temporary file in the
same folder and moved over the target with ``os.replace``, so an interrupt (Ctrl-C) or a full
disk leaves either the old file or the new one, never a half-written one. :data:`WRITTEN` lists
the files completed by the current command, so an interrupt can say what was written. The
pruned model of ``fxprune prune --out`` is written in fxprune's safe graph format
(:func:`save_graph`), or as a pickle with ``--format pickle`` (:func:`save_module`).

Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "out.txt")
    >>> _ = check_out_path(path, "--out")
    >>> write_atomic(path, lambda f: f.write(b"hello"), "--out").read_bytes()
    b'hello'
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from .atomic import DiskFullError, atomic_write
from .cli_args import CliError

WRITTEN: list[str] = []  # files completed by the running command, in order


def check_out_path(path: str | os.PathLike, flag: str, make_parents: bool = False) -> Path:
    """Check that ``path`` can be written as a file before any work is done; return it.

    With ``make_parents`` a missing folder is fine (it is created when writing) as long as its
    nearest existing ancestor is a writable folder.

    Example:
        >>> check_out_path("/no/such/folder/pruned.pt", "--out")
        Traceback (most recent call last):
        ...
        fxprune.cli_args.CliError: --out /no/such/folder/pruned.pt: the folder /no/such/folder does not exist; create it first (mkdir -p /no/such/folder) or choose another path
    """
    target = Path(path)
    if target.is_dir():
        raise CliError(f"{flag} {path}: is a folder; give a file name, e.g. {target / 'pruned.pt'}")
    folder = target.parent
    if make_parents:
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
    if not folder.exists():
        raise CliError(f"{flag} {path}: the folder {folder} does not exist; create it first "
                       f"(mkdir -p {folder}) or choose another path")
    if not folder.is_dir():
        raise CliError(f"{flag} {path}: {folder} is not a folder; choose another path")
    try:  # os.access is not enough (root, read-only mounts): try it
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".check")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise CliError(f"{flag} {path}: cannot create a file in {folder} ({err.strerror or err}); "
                       "choose a folder you can write to") from None
    return target


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object], flag: str) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it to ``path``
    (:func:`fxprune.atomic.atomic_write`; the missing folders of ``path`` are created).

    On any failure or interrupt the temporary file is removed and ``path`` is left as it was; an
    ``OSError`` (e.g. a full disk) becomes a one-line :class:`CliError` naming ``flag`` and path.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "sub", "a.json")
        >>> write_atomic(path, lambda f: f.write(b"{}"), "--json").name
        'a.json'
    """
    target = Path(path)
    existed = target.exists()
    try:
        with atomic_write(target, "wb") as f:
            write(f)
    except OSError as err:
        raise _write_failed(err, path, flag, existed) from None
    WRITTEN.append(str(target))
    return target


def _write_failed(err: OSError, path: str | os.PathLike, flag: str, existed: bool) -> CliError:
    """One line for a failed write (a full disk says to free space), naming ``flag`` and path."""
    full = isinstance(err, DiskFullError) or err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    reason = os.strerror(err.errno) if err.errno else str(err)
    hint = "free some space or choose another folder" if full else "check the path and its permissions"
    kept = "the old file is unchanged" if existed else "nothing was written"
    return CliError(f"{flag} {path}: writing failed: {reason}; {hint} ({kept})")


def save_graph(pruned, path: str | os.PathLike, inputs: tuple, flag: str = "--out") -> Path:
    """Save a module with :func:`fxprune.save` (the safe graph format: ``fxprune.load(path)`` reads
    it back without running code from the file), atomically, captured on ``inputs``.

    A module torch.export cannot capture is a :class:`CliError` saying to use ``--format pickle``;
    a failed write (e.g. a full disk) one naming ``flag`` and path, the old file kept.

    Example:
        >>> import os, tempfile, torch, fxprune
        >>> x = torch.randn(2, 4)
        >>> path = save_graph(torch.nn.Linear(4, 3), os.path.join(tempfile.mkdtemp(), "m.pt"), (x,))
        >>> fxprune.load(path)(x).shape
        torch.Size([2, 3])
    """
    from .saving import SaveError, save
    target = Path(path)
    existed = target.exists()
    try:
        save(pruned, target, inputs)
    except SaveError as err:
        raise CliError(f"{flag} {path}: the safe graph format cannot store this model: {err.reason}; pass "
                       "--format pickle to save a pickled module instead (loading it runs code from the file: "
                       "fxprune.load(path, trusted=True))") from None
    except OSError as err:
        raise _write_failed(err, path, flag, existed) from None
    WRITTEN.append(str(target))
    return target


def save_module(pruned, path: str | os.PathLike, flag: str = "--out") -> Path:
    """Save a pickled plain GraphModule (no fxprune metadata) atomically: ``fxprune prune --format
    pickle``. ``torch.load(path, weights_only=False)`` restores it without fxprune, and
    ``fxprune.load(path, trusted=True)`` with it; unpickling runs code named by the file, so load
    it only if you made it or trust its source (:func:`save_graph` writes the safe format).

    Example:
        >>> import os, tempfile, torch
        >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 1))
        >>> path = save_module(gm, os.path.join(tempfile.mkdtemp(), "m.pt"))
        >>> type(torch.load(path, weights_only=False)).__name__
        'GraphModule'
    """
    import copy
    import torch
    plain = copy.copy(pruned)
    plain.meta = {}
    for node in plain.graph.nodes:
        node.meta.pop("fxprune", None)
    return write_atomic(path, lambda f: torch.save(plain, f), flag)


def interrupted_message() -> str:
    """The one line printed on Ctrl-C: what, if anything, the command had written.

    Example:
        >>> WRITTEN.clear(); interrupted_message()
        'fxprune: interrupted; nothing was written'
    """
    if not WRITTEN:
        return "fxprune: interrupted; nothing was written"
    return f"fxprune: interrupted; written before the interrupt: {', '.join(WRITTEN)}"
