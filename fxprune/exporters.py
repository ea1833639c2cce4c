"""Deployment: export any ``torch.nn.Module`` to a file, check ONNX files, save and load modules.

Works on any module or ``torch.fx.GraphModule``; nothing here depends on the pruning pass.
:func:`export` writes TorchScript, ONNX or ``torch.export`` files and :func:`check_onnx` compares
an ONNX file with the model under onnxruntime. :func:`save` / :func:`load` (fxprune's own safe
graph format, or a pickle for trusted files only) live in :mod:`fxprune.saving` and the format
itself in :mod:`fxprune.graph_format`; they are re-exported here.

Example:
    >>> import tempfile, os, torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    >>> x = torch.randn(1, 3, 16, 16)
    >>> path = export(model, os.path.join(tempfile.mkdtemp(), "m.onnx"), (x,), format="onnx")
    >>> check_onnx(path, model, (x,)) < 1e-4
    True
"""
from __future__ import annotations

import errno
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from .atomic import atomic_path
from .copying import eval_copy
from .errors import FxPruneError
from .saving import (PICKLE_VERSION, SAVE_FORMAT, SAVE_VERSION, LoadError, SaveError, _as_tuple, _describe,
                     load, save)

__all__ = ["FORMATS", "export", "check_onnx", "ExportError", "save", "load", "SaveError", "LoadError",
           "SAVE_FORMAT", "SAVE_VERSION", "PICKLE_VERSION"]

FORMATS = ("torchscript-trace", "torchscript-script", "onnx", "onnx-dynamo", "torch-export")

_HINTS = {
    "torchscript-trace": "tracing records a single execution path; for data-dependent control flow "
                         "try format='torchscript-script' or format='torch-export'",
    "torchscript-script": "scripting needs TorchScript-compatible Python; symbolic-trace the model "
                          "first (torch.fx.symbolic_trace) or try format='torchscript-trace'",
    "onnx": "try another opset (opset=17), format='onnx-dynamo', or replace the op named in the "
            "error by an equivalent one that ONNX supports",
    "onnx-dynamo": "this exporter needs `pip install onnxscript`; otherwise try format='onnx' "
                   "(the TorchScript-based exporter)",
    "torch-export": "torch.export cannot follow Python control flow that depends on tensor values; "
                    "see the error above, or try format='torchscript-trace'",
}


class ExportError(FxPruneError, ValueError):
    """Exporting, or checking an exported file, failed; the message says what and what to try.

    Example:
        >>> err = ExportError("onnx", "op 'foo' is not supported", "try opset=18")
        >>> str(err)
        "export as 'onnx' failed: op 'foo' is not supported (hint: try opset=18)"
        >>> err.format, err.hint
        ('onnx', 'try opset=18')
    """

    def __init__(self, format: str, reason: str, hint: str):
        self.format, self.reason, self.hint = format, reason, hint
        super().__init__(f"export as {format!r} failed: {reason} (hint: {hint})")


def _export_torchscript_trace(model, path, inputs, opset):
    traced = torch.jit.trace(model, inputs, strict=False, check_trace=False)
    torch.jit.save(traced, path)


def _export_torchscript_script(model, path, inputs, opset):
    torch.jit.save(torch.jit.script(model), path)


def _export_onnx(model, path, inputs, opset):
    names = [f"input_{i}" for i in range(len(inputs))]
    with warnings.catch_warnings():  # this exporter warns that it is deprecated, in several ways
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, inputs, path, dynamo=False, opset_version=opset,
                          input_names=names)


def _export_onnx_dynamo(model, path, inputs, opset):
    if importlib.util.find_spec("onnxscript") is None:
        raise ExportError("onnx-dynamo", "the package 'onnxscript' is not installed",
                          "`pip install onnxscript`, or use format='onnx'")
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    torch.onnx.export(model, inputs, path, dynamo=True, opset_version=opset, verbose=False,
                      external_data=weight_bytes > 1_500_000_000)  # protobuf's 2 GB limit


def _export_torch_export(model, path, inputs, opset):
    torch.export.save(torch.export.export(model, inputs), path)


_EXPORTERS: dict[str, Callable] = {
    "torchscript-trace": _export_torchscript_trace,
    "torchscript-script": _export_torchscript_script,
    "onnx": _export_onnx,
    "onnx-dynamo": _export_onnx_dynamo,
    "torch-export": _export_torch_export,
}


def export(model: torch.nn.Module, path: str | os.PathLike, example_inputs: Any,
           format: str = "onnx", *, opset: int | None = None) -> Path:
    """Export ``model`` (in eval mode) to ``path`` in one of :data:`FORMATS`; returns the path.

    Formats: ``"torchscript-trace"`` (``torch.jit.trace``), ``"torchscript-script"``
    (``torch.jit.script``), ``"onnx"`` (TorchScript-based ONNX exporter), ``"onnx-dynamo"``
    (``torch.export``-based ONNX exporter; needs ``onnxscript``), ``"torch-export"``
    (``torch.export.export`` + ``torch.export.save``; name the file ``*.pt2`` and reload it with
    ``torch.export.load(path).module()``). TorchScript and the TorchScript-based ONNX exporter
    are deprecated upstream; their deprecation warnings are silenced here.
    ``opset`` applies to the ONNX formats. A private copy is exported, so the caller's module
    (its mode included) is not changed. Parent folders are created. The exporter writes into a
    temporary folder and its files replace the old ones only when it succeeded
    (:func:`fxprune.atomic.atomic_path`). Any failure raises :class:`ExportError` naming the
    format, the cause and what to try (a full disk: :class:`~fxprune.atomic.DiskFullError`).

    Example:
        >>> import tempfile, os, torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> path = export(model, os.path.join(tempfile.mkdtemp(), "m.pt"), torch.randn(1, 4),
        ...               format="torchscript-trace")
        >>> torch.jit.load(path)(torch.ones(1, 4)).shape
        torch.Size([1, 2])
    """
    if format not in _EXPORTERS:
        raise ExportError(format, "unknown format", f"use one of {', '.join(FORMATS)}")
    if not isinstance(model, torch.nn.Module):
        raise ExportError(format, f"expected a torch.nn.Module, got {type(model).__name__}",
                          "pass the model itself, not its state_dict or an exported file")
    path = Path(path)
    inputs = _as_tuple(example_inputs)
    with atomic_path(path) as tmp:
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # The caller chose the format; upstream deprecation notices are not news to them.
                warnings.filterwarnings("ignore", category=FutureWarning, message=".*deprecated.*")
                warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*legacy.*")
                _EXPORTERS[format](eval_copy(model), str(tmp), inputs, opset)
        except ExportError:
            raise
        except Exception as err:  # every exporter has its own exception types; report them uniformly
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", None)):
                raise  # atomic_path makes it a DiskFullError
            raise ExportError(format, _describe(err), _HINTS[format]) from err
        if not tmp.exists():
            raise ExportError(format, f"the exporter finished but wrote no file at {str(path)!r}",
                              _HINTS[format])
    return path


def _flatten_tensors(value: Any) -> list[torch.Tensor]:
    """Tensors of a (nested) output in the order exporters flatten them; other leaves dropped."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _flatten_tensors(item)]
    return []


def check_onnx(path: str | os.PathLike, model: torch.nn.Module, example_inputs: Any,
               rtol: float = 1e-4) -> float:
    """Run the ONNX file under onnxruntime (CPU) and compare it with ``model``; returns the error.

    Outputs are flattened (tuples, lists, dict values in order) and compared one by one. The
    error of an output is ``max|onnx - torch| / max|torch|`` (relative to the output's scale,
    so values near zero do not inflate it); the largest over all outputs is returned. Raises
    :class:`ExportError` if it exceeds ``rtol`` or the outputs do not line up. The model is run
    on an eval-mode copy; the caller's module is not changed.

    Example:
        >>> import tempfile, os, torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> x = torch.randn(3, 4)
        >>> path = export(model, os.path.join(tempfile.mkdtemp(), "m.onnx"), (x,))
        >>> check_onnx(path, model, (x,)) <= 1e-4
        True
    """
    try:
        import onnxruntime
    except ImportError as err:
        raise ExportError("onnx", "onnxruntime is not installed",
                          "`pip install onnxruntime`") from err
    inputs = _as_tuple(example_inputs)
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ExportError("onnx", f"onnxruntime cannot open {str(path)!r}: {_describe(err)}",
                          "re-export the model; check the file is a complete .onnx file") from err
    feeds_in = _flatten_tensors(inputs)
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(feeds_in):
        raise ExportError("onnx", f"the file takes {len(names)} inputs but {len(feeds_in)} "
                          "example tensors were given",
                          "pass the same example inputs that were used for export")
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, feeds_in)}
    got = session.run(None, feeds)
    with torch.no_grad():
        expected = _flatten_tensors(eval_copy(model)(*inputs))
    if len(got) != len(expected):
        raise ExportError("onnx", f"the file has {len(got)} outputs, the model {len(expected)}",
                          "non-tensor or constant outputs are dropped by ONNX; return tensors only")
    worst = 0.0
    for index, (onnx_out, torch_out) in enumerate(zip(got, expected)):
        ref = torch_out.detach().cpu().float()
        out = torch.as_tensor(onnx_out).float()
        if out.shape != ref.shape:
            raise ExportError("onnx", f"output {index} has shape {tuple(out.shape)}, "
                              f"the model gives {tuple(ref.shape)}",
                              "re-export with the same example inputs")
        scale = ref.abs().max().item() if ref.numel() else 0.0
        diff = (out - ref).abs().max().item() if ref.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    if worst > rtol:
        raise ExportError("onnx", f"onnxruntime output differs from the model: relative error "
                          f"{worst:.3g} > rtol {rtol:.3g}",
                          "try another opset or format='onnx-dynamo'; look for ops whose ONNX "
                          "translation differs (resize modes, in-place ops, random ops)")
    return worst
