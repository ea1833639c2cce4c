"""Stage 1, capture: the model's forward as an FX graph, by one of two front ends.

- ``"fx"``: ``torch.fx.symbolic_trace`` with a tracer that keeps torch.nn layers as leaves
  (``fx_trace``). Fast; fails on data-dependent Python (shape checks, iterating a proxy).
- ``"export"``: ``torch.export.export(strict=False)`` (``export``), its ATen graph lifted back to
  modules and Python-level twins, so both front ends hand the pipeline the same graph form.
- ``"auto"`` (the default): FX first, export when FX fails; the ``CaptureInfo`` says which and why.

Captures are serialised under one process-wide lock: ``symbolic_trace`` patches
``torch.nn.Module.__call__`` and ``__getattr__`` for the whole process while it runs, so two
traces at once would break each other. The FX tracer answers only its own thread: modules called
from other threads meanwhile (eager forwards, fxprune's own stages) run as if no trace were on.

Example:
    >>> import torch
    >>> gm, info = capture(torch.nn.Linear(4, 2), (torch.randn(1, 4),))
    >>> info.frontend, info.fx_error is None
    ('fx', True)
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Iterable

import torch
import torch.fx as fx

from ..errors import FxPruneError, TraceError
from .export import capture_export
from .fx_trace import _offending_frame, trace

CAPTURE_MODES = ("auto", "fx", "export")
_CAPTURE_LOCK = threading.RLock()


@dataclasses.dataclass
class CaptureInfo:
    """Which front end captured the model and why.

    ``frontend`` is ``"fx"`` or ``"export"``; ``requested`` the ``capture=`` argument; ``fx_error``
    the first line of FX's failure when ``auto`` fell back to export.

    Example:
        >>> CaptureInfo("export", "auto", "TraceError: ...").reason
        'torch.fx failed (TraceError: ...); captured with torch.export'
    """

    frontend: str
    requested: str = "auto"
    fx_error: str | None = None

    @property
    def reason(self) -> str:
        if self.requested != "auto":
            return f"capture={self.requested!r} was asked for"
        if self.fx_error:
            return f"torch.fx failed ({self.fx_error}); captured with torch.export"
        return "torch.fx traced the model (the fast path)"

    def to_dict(self) -> dict:
        return {"frontend": self.frontend, "requested": self.requested, "fx_error": self.fx_error,
                "reason": self.reason}


def check_mode(how: Any) -> str:
    """``how`` if it is a capture mode, else a ``FxPruneError`` listing them.

    Example:
        >>> check_mode("export")
        'export'
    """
    if how not in CAPTURE_MODES:
        raise FxPruneError(f"capture={how!r} is not a capture mode; use one of {', '.join(map(repr, CAPTURE_MODES))}")
    return how


def first_line(err: BaseException) -> str:
    """The first non-empty line of an error's message (its type name when it has none).

    Example:
        >>> first_line(ValueError("\\nbad input\\nmore"))
        'bad input'
    """
    text = str(err).strip()
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)


def _where(err: BaseException) -> str:
    """The user's line a front end failed at: FX's message names it; export's traceback holds it."""
    for line in str(err).splitlines():
        if line.strip().startswith("at "):
            return line.strip()[3:]
    cause = err.__cause__ or err
    where = _offending_frame(cause)
    return where


def both_failed(model: torch.nn.Module, fx_err: BaseException, export_err: BaseException) -> TraceError:
    """One error that shows why each front end failed and what to do.

    Example:
        >>> err = both_failed(torch.nn.Identity(), TraceError("fx: a"), TraceError("export: b"))
        >>> "torch.fx" in str(err) and "torch.export" in str(err)
        True
    """
    lines = [f"fxprune could not capture {type(model).__name__} with either front end:"]
    for name, err in (("torch.fx", fx_err), ("torch.export", export_err)):
        lines.append(f"  {name}: {first_line(err)}")
        where = _where(err)
        if where:
            lines.append(f"    at {where}")
    return TraceError(
        "\n".join(lines) + "\n"
        "  fix: make the failing line traceable (no Python branch on tensor values; torch.export's "
        "message names it), or keep the module that holds it as an opaque leaf with "
        "leaf_modules=[TheSubmoduleType or 'its.name'] and capture='fx' (its channels are blocked), "
        "or fix the argument the control flow depends on with concrete_args={'arg': value}.")


def capture(model: torch.nn.Module, inputs: tuple, how: str = "auto", leaf_modules: Iterable = (),
            concrete_args: dict | None = None) -> tuple[fx.GraphModule, CaptureInfo]:
    """Capture ``model`` (never touched) into fxprune's graph form with the front end ``how`` asks for.

    Example:
        >>> import torch
        >>> gm, info = capture(torch.nn.Linear(4, 2), (torch.randn(1, 4),), how="export")
        >>> info.frontend, sorted(gm.state_dict())
        ('export', ['bias', 'weight'])
    """
    how = check_mode(how)
    with _CAPTURE_LOCK:
        if how == "export":
            return capture_export(model, inputs, concrete_args), CaptureInfo("export", how)
        try:
            return trace(model, leaf_modules, concrete_args), CaptureInfo("fx", how)
        except TraceError as fx_err:
            if how == "fx":
                raise
            return export_fallback(model, inputs, concrete_args, fx_err)


def export_fallback(model: torch.nn.Module, inputs: tuple, concrete_args: dict | None,
                    fx_err: BaseException) -> tuple[fx.GraphModule, CaptureInfo]:
    """Capture with torch.export after FX failed (at trace, or later on the FX graph); if export
    fails too, one ``TraceError`` shows both reasons.

    Example:
        >>> import torch
        >>> gm, info = export_fallback(torch.nn.Linear(4, 2), (torch.randn(1, 4),), None, TraceError("x"))
        >>> info.frontend, info.fx_error
        ('export', 'x')
    """
    with _CAPTURE_LOCK:
        try:
            gm = capture_export(model, inputs, concrete_args)
        except FxPruneError as export_err:
            raise both_failed(model, fx_err, export_err) from export_err
    return gm, CaptureInfo("export", "auto", first_line(fx_err))


__all__ = ["CAPTURE_MODES", "CaptureInfo", "both_failed", "capture", "check_mode", "export_fallback", "first_line"]
