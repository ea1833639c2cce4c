"""Stage 1, capture: the model's forward as an FX graph, by one of two front ends.

- ``"fx"``: ``torch.fx.symbolic_trace`` with a tracer that keeps torch.nn layers as leaves
  (``fx_trace``). Fast; fails on data-dependent Python (shape checks, iterating a proxy).
- ``"export"``: ``torch.export.export(strict=False)`` (``export``), its ATen graph lifted back to
  modules and Python-level twins, so both front ends hand the pipeline the same graph form.
- ``"auto"`` (the default): FX first, export when FX fails; the ``CaptureInfo`` says which and why.
  Where FX failed inside a timm layer that fxprune has a rule for and timm registers as not
  traceable (``Conv2dSame``'s "same" padding computes shapes in Python), FX is tried once more
  with those layers kept whole (``timm_leaf_retry``) before export, which costs ten times more.
  ``"fx"`` makes the same retry (it is still torch.fx) and raises where it does not help.

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
    the first line of FX's first failure when ``auto`` tried again (with ``timm_leaves`` kept
    whole, ``frontend`` then ``"fx"``) or fell back to export; ``timm_leaves`` with no
    ``fx_error``: the timm layers FX kept whole from the start (``timm_rules.default_leaves``).

    Example:
        >>> CaptureInfo("export", "auto", "TraceError: ...").reason
        'torch.fx failed (TraceError: ...); captured with torch.export'
        >>> CaptureInfo("fx", "auto", "TraceError: ...", ("Conv2dSame",)).reason
        "torch.fx with timm's leaf layers (Conv2dSame) kept whole: tracing through them failed (TraceError: ...)"
    """

    frontend: str
    requested: str = "auto"
    fx_error: str | None = None
    timm_leaves: tuple = ()

    @property
    def reason(self) -> str:
        if self.timm_leaves and self.frontend == "fx":
            asked = "" if self.requested == "auto" else f"capture={self.requested!r} was asked for; "
            if self.fx_error is None:
                return (f"{asked}torch.fx traced the model (the fast path) with timm's leaf layers "
                        f"({', '.join(self.timm_leaves)}) kept whole, as timm registers them for torch.fx")
            return (f"{asked}torch.fx with timm's leaf layers ({', '.join(self.timm_leaves)}) kept whole: "
                    f"tracing through them failed ({self.fx_error})")
        if self.requested != "auto":
            return f"capture={self.requested!r} was asked for"
        if self.fx_error:
            return f"torch.fx failed ({self.fx_error}); captured with torch.export"
        return "torch.fx traced the model (the fast path)"

    def to_dict(self) -> dict:
        return {"frontend": self.frontend, "requested": self.requested, "fx_error": self.fx_error,
                "timm_leaves": list(self.timm_leaves), "reason": self.reason}


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
        names, kept = _default_timm_leaves(model, leaf_modules)
        leaves = tuple(leaf_modules) + names
        try:
            return trace(model, leaves, concrete_args), CaptureInfo("fx", how, None, tuple(t.__name__ for t in kept))
        except TraceError as fx_err:
            retried = timm_leaf_retry(model, leaves, concrete_args, fx_err,
                                      getattr(fx_err, "failed_inside", ()), requested=how, kept=kept)
            if retried is not None:
                return retried
            if how == "fx":
                raise
            return export_fallback(model, inputs, concrete_args, fx_err)


def _default_timm_leaves(model: torch.nn.Module, leaf_modules: Iterable) -> tuple[tuple[str, ...], tuple[type, ...]]:
    """``timm_rules.default_leaves``: the timm layers FX keeps whole from the start (names, types);
    ((), ()) without importing timm when the model holds no timm module."""
    from ..coupling import ops  # noqa: F401  (installs the op table the rows read)
    from ..coupling.timm_rules import default_leaves, is_timm
    named = list(model.named_modules())  # one walk for the three questions
    if not any(is_timm(m) for _, m in named):
        return (), ()
    return default_leaves(model, leaf_modules, named)


def timm_leaf_retry(model: torch.nn.Module, leaf_modules: Iterable, concrete_args: dict | None,
                    fx_err: BaseException, failed_inside: Iterable[type] | None = None,
                    requested: str = "auto", kept: tuple = ()) -> tuple[fx.GraphModule, CaptureInfo] | None:
    """FX again with the timm layers FX failed inside kept whole as leaves, where fxprune has a
    coupling rule for them and timm registers them as not traceable (``timm_rules.leaf_types``);
    a retry that fails inside another such layer adds it and tries again. ``failed_inside``: the
    module types the first failure happened in (``TraceError.failed_inside``); None (the failure's
    place is unknown): every such layer of the model at once. None where no such layer is on the
    failure's path or the last retry fails outside them. timm is imported only for a model that
    holds a timm module. ``requested``: the ``capture=`` argument the ``CaptureInfo`` records;
    ``kept``: the types already kept whole by default (named in ``leaf_modules``), reported too.

    Example:
        >>> import torch, timm.layers as tl
        >>> m = torch.nn.Sequential(tl.Conv2dSame(3, 8, 3, stride=2), torch.nn.ReLU())
        >>> gm, info = timm_leaf_retry(m, (), None, TraceError("control flow"))
        >>> info.frontend, info.timm_leaves, type(gm.get_submodule("0")).__name__
        ('fx', ('Conv2dSame',), 'Conv2dSame')
    """
    from ..coupling.timm_rules import is_timm_type, leaf_types
    inside = None if failed_inside is None else tuple(failed_inside)
    if inside is not None and not any(is_timm_type(t) for t in inside):
        return None  # no timm layer on the failure's path: no leaf of ours would help
    leaf_modules = tuple(leaf_modules)
    given = tuple(t for t in leaf_modules if isinstance(t, type))
    candidates = tuple(t for t in leaf_types(model) if not (given and issubclass(t, given)))
    chosen: set = set()
    with _CAPTURE_LOCK:
        while True:
            new = {t for t in candidates if t not in chosen
                   and (inside is None or any(issubclass(f, t) for f in inside))}
            if not new:
                return None
            chosen |= new
            leaves = tuple(t for t in candidates if t in chosen)  # in the model's order
            try:
                gm = trace(model, leaf_modules + leaves, concrete_args)
            except TraceError as err:
                if inside is None:
                    return None
                inside = getattr(err, "failed_inside", ())
                continue
            reported = tuple(dict.fromkeys((*kept, *leaves)))
            return gm, CaptureInfo("fx", requested, first_line(fx_err), tuple(t.__name__ for t in reported))


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


__all__ = ["CAPTURE_MODES", "CaptureInfo", "both_failed", "capture", "check_mode", "export_fallback", "first_line",
           "timm_leaf_retry"]
