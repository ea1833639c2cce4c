"""Deployment: export any ``torch.nn.Module`` to a file, check ONNX files, save and load modules.

Works on any module or ``torch.fx.GraphModule``; nothing here depends on the pruning pass.

:func:`save` / :func:`load` default to a format that is data, never code: the module is
captured with ``torch.export`` and stored as a graph of ATen operators (JSON) with its tensors,
in a ``torch.save`` file that :func:`load` reads with ``torch.load(weights_only=True)``. A file
cannot make :func:`load` import or call anything but ATen operators and a few arithmetic
functions. Pickled modules (``format="pickle"``, older fxprune files, ``torch.save(module)``)
run whatever code the file names while being read, so :func:`load` opens them only with
``trusted=True``.

Example:
    >>> import tempfile, os, torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    >>> x = torch.randn(1, 3, 16, 16)
    >>> path = export(model, os.path.join(tempfile.mkdtemp(), "m.onnx"), (x,), format="onnx")
    >>> check_onnx(path, model, (x,)) < 1e-4
    True
"""
from __future__ import annotations

import collections
import contextlib
import errno
import copy
import importlib.util
import io
import json
import keyword
import math
import operator
import os
import pickle
import pickletools
import re
import threading
import types
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

from .atomic import atomic_path, atomic_write
from .errors import FxPruneError

FORMATS = ("torchscript-trace", "torchscript-script", "onnx", "onnx-dynamo", "torch-export")
SAVE_FORMAT = "fxprune.module"
SAVE_VERSION = 2  # 2: ATen graph (JSON) + tensors, safe to load; 1: a pickled module (trusted only)
PICKLE_VERSION = 1

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


class LoadError(FxPruneError, ValueError):
    """A saved module could not be loaded; the message names the file and what is wrong with it.

    Example:
        >>> str(LoadError("model.pt", "the file does not exist"))
        "cannot load 'model.pt': the file does not exist"
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = os.fspath(path), reason
        super().__init__(f"cannot load {self.path!r}: {reason}")


def _as_tuple(example_inputs: Any) -> tuple:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _eval_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A private copy in eval mode, so exporting never changes the caller's module."""
    return copy.deepcopy(model).eval()


def _describe(err: BaseException, limit: int = 600) -> str:
    text = " ".join(str(err).split()) or "(no message)"
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"{type(err).__name__}: {text}"


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
                _EXPORTERS[format](_eval_copy(model), str(tmp), inputs, opset)
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
        expected = _flatten_tensors(_eval_copy(model)(*inputs))
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


class SaveError(FxPruneError, ValueError):
    """A module could not be saved in the requested format; the message says why and what to do.

    Example:
        >>> str(SaveError("m.pt", "no example inputs", "pass example_inputs=(x,)"))
        "cannot save to 'm.pt': no example inputs (what to do: pass example_inputs=(x,))"
    """

    def __init__(self, path: str | os.PathLike, reason: str, hint: str):
        self.path, self.reason, self.hint = os.fspath(path), reason, hint
        super().__init__(f"cannot save to {self.path!r}: {reason} (what to do: {hint})")


# --- the graph format: an exported ATen graph as JSON, its tensors as plain data ------------

class _Unsupported(Exception):
    """The module holds something the graph format does not store."""


class _Malformed(Exception):
    """A graph record that no fxprune wrote."""


_PICKLE_HINT = ("save with format='pickle' instead: any module, but the file can only be read with "
                "fxprune.load(path, trusted=True), because loading it runs code")
_PY_FUNCTIONS: dict[str, Callable] = {  # the only Python callables a graph file may name
    **{f"operator.{n}": getattr(operator, n) for n in (
        "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pos", "abs",
        "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert")},
    **{f"math.{n}": getattr(math, n) for n in ("ceil", "floor", "trunc", "sqrt")},
    **{f"torch.{n}": getattr(torch, n) for n in (
        "sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum") if hasattr(torch, n)},
}
_DENIED_OPS = frozenset({  # aten ops that touch files or global state rather than tensors
    "save", "from_file", "_print", "warn", "manual_seed", "seed", "set_grad_enabled",
    "_cufft_set_plan_cache_max_size", "_cufft_clear_plan_cache", "set_", "set_data", "record_stream"})
_ATEN_NAME = re.compile(r"aten\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")
_ATTR_PART = re.compile(r'[^".\\\x00-\x1f\x7f-\U0010ffff]+')  # fx writes it inside "..." in code
_ENUMS = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}
_SPEC_KINDS = {tuple: "tuple", list: "list", dict: "dict", type(None): "none", collections.OrderedDict: "dict",
               fx.immutable_collections.immutable_dict: "dict", fx.immutable_collections.immutable_list: "list"}


def _aten_op(name: str) -> torch._ops.OpOverload:
    match = _ATEN_NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None or match[1] in _DENIED_OPS or "__" in name:
        raise _Malformed(f"it calls {name!r}, which is not an allowed aten operator")
    op = getattr(getattr(torch.ops.aten, match[1], None), match[2], None)
    if not isinstance(op, torch._ops.OpOverload):
        raise _Malformed(f"it calls {name!r}, which this PyTorch does not have")
    return op


def _target_name(target: Any) -> str:
    for name, fn in _PY_FUNCTIONS.items():
        if fn is target:
            return name
    name = str(target) if isinstance(target, torch._ops.OpOverload) else ""
    try:
        if _aten_op(name) is target:
            return name
    except _Malformed:
        pass
    raise _Unsupported(f"the captured graph calls {target!r}; the safe format stores only aten "
                       "operators (not custom ops, control flow or other namespaces)")


def _encode_arg(a: Any, index: dict) -> Any:
    if isinstance(a, fx.Node):
        return {"node": index[a]}
    if a is None or isinstance(a, (bool, int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, (list, tuple)):
        items = [_encode_arg(x, index) for x in a]
        return items if isinstance(a, list) else {"tuple": items}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    for key, kind in _ENUMS.items():
        if isinstance(a, kind):
            return {key: str(a).rsplit(".", 1)[-1]}
    raise _Unsupported(f"an argument of type {type(a).__name__} ({str(a)[:60]})")


def _decode_arg(a: Any, nodes: list, device: torch.device | None) -> Any:
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    if isinstance(a, list):
        return [_decode_arg(x, nodes, device) for x in a]
    if not isinstance(a, dict) or len(a) != 1:
        raise _Malformed(f"an argument is {type(a).__name__}, not a value the format writes")
    (key, value), = a.items()
    if key == "node" and type(value) is int and 0 <= value < len(nodes):
        return nodes[value]
    if key == "tuple" and isinstance(value, list):
        return tuple(_decode_arg(x, nodes, device) for x in value)
    if key == "float" and value in ("inf", "-inf", "nan"):
        return float(value)
    if key == "device" and isinstance(value, str) and re.fullmatch(r"[a-z_]+(:[0-9]+)?", value):
        return device if device is not None else torch.device(value)
    if key in _ENUMS and isinstance(value, str) and value.isidentifier() and not value.startswith("_"):
        found = getattr(torch, value, None)
        if isinstance(found, _ENUMS[key]):
            return found
    raise _Malformed(f"an argument {json.dumps(a)[:80]} is not one the format writes")


def _encode_spec(spec: pytree.TreeSpec) -> Any:
    if spec.is_leaf():
        return "*"
    kind = _SPEC_KINDS.get(spec.type)
    if kind is None:
        raise _Unsupported(f"inputs or outputs of type {spec.type.__name__} (only tuples, lists, dicts "
                           "and tensors are stored)")
    out: dict = {"kind": kind, "children": [_encode_spec(c) for c in spec.children()]}
    if kind == "dict":
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in spec.context):
            raise _Unsupported("a dict input or output whose keys are not strings or integers")
        out["keys"] = list(spec.context)
    return out


def _decode_spec(data: Any) -> Any:
    """A dummy value with the saved structure (leaves are 0); ``pytree.tree_structure`` of it is the
    spec. Only tuples, lists, dicts and None are built: nothing is imported by name."""
    if data == "*":
        return 0
    if not isinstance(data, dict) or not isinstance(data.get("children"), list):
        raise _Malformed("an input or output structure is not one the format writes")
    children = [_decode_spec(c) for c in data["children"]]
    kind, keys = data.get("kind"), data.get("keys")
    if kind == "dict" and isinstance(keys, list) and len(keys) == len(children) and all(
            type(k) in (str, int) for k in keys):
        return dict(zip(keys, children))
    if kind in ("tuple", "list", "none") and (kind != "none" or not children):
        return {"tuple": tuple, "list": list, "none": lambda c: None}[kind](children)
    raise _Malformed(f"an input or output structure of kind {str(kind)[:30]!r} is not one the format writes")


def _encode_graph_module(gm: fx.GraphModule, model_name: str) -> dict:
    """The record :func:`save` writes for ``gm = torch.export.export(...).module()``."""
    codegen = gm.graph._codegen
    if not isinstance(codegen, _PyTreeCodeGen):
        raise _Unsupported("the captured module has no input/output structure")
    index: dict = {}
    nodes: list = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            entry = [node.op, node.target]
        elif node.op == "call_function":
            entry = [node.op, _target_name(node.target), _encode_arg(list(node.args), index),
                     {k: _encode_arg(v, index) for k, v in node.kwargs.items()}]
        elif node.op == "output":
            entry = [node.op, _encode_arg(node.args[0], index)]
        else:
            raise _Unsupported(f"a {node.op} node ({node.name}) in the captured graph")
        index[node] = len(nodes)
        nodes.append(entry)
    params = dict(gm.named_parameters(remove_duplicate=False))
    buffers = dict(gm.named_buffers(remove_duplicate=False))
    constants = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        if node.target not in params and node.target not in buffers:
            value = gm.get_submodule(node.target.rpartition(".")[0]) if "." in node.target else gm
            constants[node.target] = getattr(value, node.target.rpartition(".")[2])
    for name, t in {**params, **buffers, **constants}.items():
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise _Unsupported(f"{name!r} is a {type(t).__name__}, not a plain tensor")
    graph = {"inputs": list(codegen.pytree_info.orig_args), "in_spec": _encode_spec(codegen.pytree_info.in_spec),
             "out_spec": _encode_spec(codegen.pytree_info.out_spec), "nodes": nodes,
             "frozen": [n for n, p in params.items() if not p.requires_grad],
             "non_persistent": [n for n in buffers if n.rpartition(".")[2] in
                                gm.get_submodule(n.rpartition(".")[0])._non_persistent_buffers_set]}
    return {"format": SAVE_FORMAT, "version": SAVE_VERSION, "model": model_name,
            "torch": str(torch.__version__), "graph": json.dumps(graph),
            "parameters": {n: p.detach() for n, p in params.items()}, "buffers": buffers,
            "constants": constants}


def _attach(gm: torch.nn.Module, name: Any, value: torch.Tensor, kind: str) -> None:
    """Register ``value`` at dotted ``name`` under ``gm`` (parent modules made as needed)."""
    parts = name.split(".") if isinstance(name, str) else []
    if not parts or not all(_ATTR_PART.fullmatch(p) and not p.startswith("__") for p in parts):
        raise _Malformed(f"the tensor name {str(name)[:80]!r} is not a module attribute path")
    owner = gm
    for part in parts[:-1]:
        child = owner._modules.get(part)
        if child is None:
            if hasattr(owner, part):
                raise _Malformed(f"the tensor name {name!r} clashes with the attribute {part!r}")
            child = torch.nn.Module()
            owner.add_module(part, child)
        owner = child
    if hasattr(owner, parts[-1]):
        raise _Malformed(f"the tensor name {name!r} is used twice or clashes with an attribute")
    if kind == "parameter":
        owner.register_parameter(parts[-1], value)
    else:
        owner.register_buffer(parts[-1], value, persistent=kind == "buffer")


def _tensor_table(record: dict, key: str) -> dict:
    table = record.get(key)
    if not isinstance(table, dict) or not all(isinstance(t, torch.Tensor) for t in table.values()):
        raise _Malformed(f"its {key!r} entry is not a table of tensors")
    return table


def _attach_tensors(gm: torch.nn.Module, record: dict, graph: dict) -> set:
    frozen, non_persistent = set(graph.get("frozen", ())), set(graph.get("non_persistent", ()))
    shared: dict = {}  # one Parameter for names that share a tensor (tied weights)
    for name, t in _tensor_table(record, "parameters").items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)
        param = shared.get(key) if t.numel() else None
        if param is None:
            param = shared[key] = torch.nn.Parameter(t, requires_grad=name not in frozen and t.is_floating_point())
        _attach(gm, name, param, "parameter")
    for name, t in _tensor_table(record, "buffers").items():
        _attach(gm, name, t, "non-persistent" if name in non_persistent else "buffer")
    for name, t in _tensor_table(record, "constants").items():
        _attach(gm, name, t, "non-persistent")
    return {n for key in ("parameters", "buffers", "constants") for n in record[key]}


def _identifier(name: Any, what: str = "input name") -> str:
    """``name`` if fx may write it into generated code as it is (inputs and keyword names)."""
    if not (isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)
            and name != "self" and not name.startswith("__")):
        raise _Malformed(f"the {what} {str(name)[:40]!r} is not a Python identifier")
    return name


def _build_graph(graph: dict, attributes: set, device: torch.device | None) -> fx.Graph:
    out, nodes = fx.Graph(), []
    for entry in graph["nodes"]:
        op = entry[0] if isinstance(entry, list) and entry else None
        if op == "placeholder" and len(entry) == 2:
            node = out.placeholder(_identifier(entry[1]))
        elif op == "get_attr" and len(entry) == 2 and entry[1] in attributes:
            node = out.get_attr(entry[1])
        elif op == "call_function" and len(entry) == 4 and isinstance(entry[2], list) and isinstance(entry[3], dict):
            kwargs = {_identifier(k, "keyword name"): _decode_arg(v, nodes, device) for k, v in entry[3].items()}
            node = out.call_function(_aten_op(entry[1]) if entry[1] not in _PY_FUNCTIONS else
                                     _PY_FUNCTIONS[entry[1]], tuple(_decode_arg(entry[2], nodes, device)), kwargs)
        elif op == "output" and len(entry) == 2:
            node = out.output(_decode_arg(entry[1], nodes, device))
        else:
            raise _Malformed(f"node {len(nodes)} ({json.dumps(entry)[:80]}) is not one the format writes")
        nodes.append(node)
    inputs = [_identifier(n) for n in graph["inputs"]]
    args_kwargs = _decode_spec(graph["in_spec"])
    in_spec = pytree.tree_structure(args_kwargs)
    out_spec = pytree.tree_structure(_decode_spec(graph["out_spec"]))
    if not (isinstance(args_kwargs, tuple) and len(args_kwargs) == 2 and isinstance(args_kwargs[0], tuple)
            and isinstance(args_kwargs[1], dict) and len(inputs) == sum(map(len, args_kwargs))
            and in_spec.num_leaves == sum(n.op == "placeholder" for n in nodes)):
        raise _Malformed("its input structure does not match its inputs")
    results = nodes[-1].args[0] if nodes and nodes[-1].op == "output" else None
    if not isinstance(results, (tuple, list)) or len(results) != out_spec.num_leaves:
        raise _Malformed("its output structure does not match its outputs")
    out._codegen = _PyTreeCodeGen(_PyTreeInfo(inputs, in_spec, out_spec))
    out.lint()
    return out


def _decode_graph_module(record: dict, device: torch.device | None) -> fx.GraphModule:
    """The module of a graph record; raises ``_Malformed`` for anything :func:`save` does not write."""
    try:
        graph = json.loads(record["graph"]) if isinstance(record.get("graph"), str) else None
    except (json.JSONDecodeError, RecursionError):
        graph = None
    if not isinstance(graph, dict) or not all(isinstance(graph.get(k), list) for k in ("inputs", "nodes")):
        raise _Malformed("its 'graph' entry is not a graph description")
    gm = fx.GraphModule(torch.nn.Module(), fx.Graph(), class_name="FxPruneModule")
    attributes = _attach_tensors(gm, record, graph)
    gm.graph = _build_graph(graph, attributes, device)
    return gm.eval()


# --- save ----------------------------------------------------------------------------------

def _is_torch_class(cls: Any) -> bool:
    return getattr(cls, "__module__", "").split(".")[0] == "torch"


def _stripped_body(body: dict) -> dict:
    """A GraphModule's pickled state without metadata and without a non-torch tracer class."""
    body = dict(body)
    body["meta"] = {}
    if not _is_torch_class(body.get("_tracer_cls")):
        body["_tracer_cls"] = None
        body["_tracer_extras"] = {}
    return body


class _StrippingPickler(pickle.Pickler):
    """Pickles every GraphModule (nested ones too) without ``meta``, leaving the module intact."""

    def reducer_override(self, obj):
        if isinstance(obj, fx.GraphModule):
            rebuild, (body, *rest) = obj.__reduce__()
            return rebuild, (_stripped_body(body), *rest)
        return NotImplemented


_STRIPPING_PICKLE = types.SimpleNamespace(__name__="fxprune_stripping_pickle",
                                          Pickler=_StrippingPickler)


def _recorded_inputs(module: torch.nn.Module) -> tuple | None:
    """Example inputs a module carries: a pruned module's plan's, else zeros of the shapes its
    placeholders record (``node.meta["fxprune"]``, ``"tensor_meta"`` or ``"val"``)."""
    if not isinstance(module, fx.GraphModule):
        return None
    recorded = getattr(module.meta.get("fxprune"), "example_inputs", None)
    if isinstance(recorded, tuple) and recorded:
        return recorded
    inputs = []
    for node in module.graph.find_nodes(op="placeholder"):
        meta = node.meta.get("fxprune") or {}
        found = [(meta.get("shape"), meta.get("dtype")),
                 *[(getattr(node.meta.get(k), "shape", None), getattr(node.meta.get(k), "dtype", None))
                   for k in ("tensor_meta", "val")]]
        shape, dtype = next(((s, d) for s, d in found if s is not None and isinstance(d, torch.dtype)), (None, None))
        try:
            inputs.append(torch.zeros([int(d) for d in shape], dtype=dtype))
        except (TypeError, ValueError, RuntimeError):
            return None
    return tuple(inputs) or None


@contextlib.contextmanager
def _eval_flags(module: torch.nn.Module):
    """Every submodule in eval mode for the capture, the caller's flags restored after."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        for m, _ in flags:
            m.training = False
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _batch_is_dynamic(program: Any, positions: list[int]) -> bool:
    users = program.graph_signature.user_inputs
    vals = {n.name: n.meta.get("val") for n in program.graph.find_nodes(op="placeholder")}
    return all(isinstance(getattr(vals.get(users[i]), "shape", [1])[0], torch.SymInt) for i in positions)


_CAPTURE_LOCK = threading.Lock()


def _capture(module: torch.nn.Module, inputs: tuple) -> fx.GraphModule:
    """``torch.export`` of the module in eval mode, with a dynamic batch dimension where the
    export allows it (captured at batch 2, so a batch-1 example is not specialised), else static."""
    positions = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.dim() > 0]
    with _eval_flags(module), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if positions and len(positions) == len(inputs):  # inputs map one to one onto placeholders
            wide = tuple(torch.cat([t, t]) if i in positions and t.shape[0] == 1 else t
                         for i, t in enumerate(inputs))
            spec = tuple({0: torch.export.Dim.AUTO} if i in positions else None for i in range(len(inputs)))
            try:
                program = torch.export.export(module, wide, dynamic_shapes=spec)
                if _batch_is_dynamic(program, positions):
                    return program.module(check_guards=False)
            except Exception:  # noqa: BLE001 - the static capture below reports the real error
                pass
        return torch.export.export(module, inputs).module(check_guards=False)


def _save_graph(module: torch.nn.Module, path: Path, example_inputs: Any) -> dict:
    inputs = _as_tuple(example_inputs) if example_inputs is not None else _recorded_inputs(module)
    if inputs is None:
        raise SaveError(path, "no example inputs: the module is captured with torch.export, which runs "
                              "it on inputs of the right shapes",
                        "pass example_inputs=(x,) (the inputs you pruned with; modules made by "
                        "fxprune.transform carry theirs)")
    try:
        with _CAPTURE_LOCK:  # torch.export is not documented thread-safe; writing the file is
            gm = _capture(module, inputs)
    except Exception as err:  # torch.export raises many types; report them uniformly
        raise SaveError(path, f"torch.export could not capture the module ({_describe(err, 400)})",
                        "pass example inputs that forward accepts; for Python control flow on tensor "
                        "values, " + _PICKLE_HINT) from err
    try:
        record = _encode_graph_module(gm, type(module).__name__)
        _decode_graph_module(record, None)  # what load would refuse is refused now, not later
    except (_Unsupported, _Malformed) as err:
        raise SaveError(path, f"the safe format cannot store {err}", _PICKLE_HINT) from None
    return record


def save(module: torch.nn.Module, path: str | os.PathLike, example_inputs: Any = None, *,
         format: str = "graph") -> Path:
    """Save a module so that :func:`load` restores it without fxprune's objects or the model's class.

    ``format="graph"`` (default, safe to load): the module is captured in eval mode with
    ``torch.export`` on ``example_inputs`` (default: the inputs a module made by
    ``fxprune.transform`` carries, else shapes recorded on its placeholders; else
    :class:`SaveError` asking for them), with a dynamic batch dimension where export allows.
    The file is a ``torch.save`` of plain data: the ATen graph as JSON and the tensors under
    their original names, so :func:`load` never runs code named by the file. The loaded module
    is an inference graph: it computes what ``module.eval()`` computes, whatever its train flag.
    Models torch.export cannot capture (control flow on tensor values, custom ops) raise
    :class:`SaveError`.

    ``format="pickle"``: today's pickled module (version 1: for a ``GraphModule``, ``gm.meta``
    and a custom tracer class are left out, so it loads without them; submodules of custom
    classes need their class at load time). Any module, no inputs needed, but a pickle runs code
    when read, so :func:`load` opens it only with ``trusted=True``.

    The file is replaced atomically (:func:`fxprune.atomic.atomic_write`): an interrupted save or
    a full disk (:class:`~fxprune.atomic.DiskFullError`) leaves the previous file unchanged.

    Example:
        >>> import tempfile, os, torch
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 2)))
        >>> x = torch.randn(3, 4)
        >>> path = save(gm, os.path.join(tempfile.mkdtemp(), "m.pt"), (x,))
        >>> torch.equal(load(path)(x), gm(x))
        True
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"save expects a torch.nn.Module, got {type(module).__name__}")
    if format not in ("graph", "pickle"):
        raise ValueError(f"save format must be 'graph' (safe to load) or 'pickle' (trusted only), got {format!r}")
    path = Path(path)
    if format == "pickle":
        record = {"format": SAVE_FORMAT, "version": PICKLE_VERSION, "module": module}
        with atomic_write(path) as f:
            torch.save(record, f, pickle_module=_STRIPPING_PICKLE)
        return path
    record = _save_graph(module, path, example_inputs)
    with atomic_write(path) as f:
        torch.save(record, f)
    return path


# --- load ----------------------------------------------------------------------------------

_SCAN_LIMIT = 16 << 20


def _pickle_globals(data: bytes) -> list[str]:
    """Names a pickle stream would import (GLOBAL, STACK_GLOBAL, INST), read with pickletools,
    which parses and runs nothing; every pickle in sequence (torch's legacy format has several)."""
    found: list[str] = []
    strings: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    found.append(".".join(strings[-2:]))
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:  # noqa: BLE001 - not (or no longer) a pickle: stop reading
            break
    return found


def _code_named_by(path: Path) -> list[str]:
    """What a file that ``torch.load(weights_only=True)`` refused would import (not allowlisted)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")][:1]
                data = archive.open(names[0]).read(_SCAN_LIMIT) if names else b""
        else:
            with open(path, "rb") as f:
                data = f.read(_SCAN_LIMIT)
    except Exception:  # noqa: BLE001 - unreadable: the caller reports the file as corrupt
        return []
    allowed = getattr(torch._weights_only_unpickler, "_get_allowed_globals", dict)()
    return list(dict.fromkeys(n for n in _pickle_globals(data) if n not in allowed))


def _needs_trust(path: Path, names: list[str]) -> LoadError:
    shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    return LoadError(path, f"the file is a pickle that imports {shown} while it is read (a module "
                     "saved with format='pickle' or by fxprune before the graph format, torch.save(module), "
                     "or pickle.dump); reading it would run whatever code the file names, so it is refused "
                     "by default. Only if you made it yourself or trust its source: fxprune.load(path, "
                     "trusted=True); then re-save it with fxprune.save(module, path, example_inputs) to get "
                     "the safe graph format")


def _corrupt(path: Path, err: BaseException, map_location: Any = None) -> LoadError:
    if "deserialize object on" in str(err):  # e.g. CUDA tensors on a machine without a GPU
        return LoadError(path, f"its tensors cannot go to map_location={map_location!r} "
                         f"({_describe(err, 200)}); pass map_location='cpu'")
    return LoadError(path, f"the file is corrupt, truncated or not a torch.save file "
                     f"({path.stat().st_size} bytes; {_describe(err, 300)})")


def _read_safe(path: Path, map_location: Any) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, no code run."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for bad files
        names = _code_named_by(path)
        raise (_needs_trust(path, names) if names else _corrupt(path, err, map_location)) from None


def _read_trusted(path: Path, map_location: Any) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return torch.load(path, map_location=map_location, weights_only=False)
            except RuntimeError as err:
                if "magic number" not in str(err):
                    raise
            with open(path, "rb") as plain:  # written by pickle.dump, not torch.save
                return pickle.load(plain)
    except (ModuleNotFoundError, AttributeError, ImportError) as err:
        raise LoadError(path, f"the file refers to code that cannot be imported here "
                        f"({_describe(err, 300)}); make the model's module importable, or save "
                        "the module with fxprune.save(module, path, example_inputs)") from err
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError, ValueError,
            TypeError, KeyError, IndexError, OSError, UnicodeDecodeError) as err:
        raise _corrupt(path, err, map_location) from err


def _module_of(path: Path, obj: Any, map_location: Any) -> torch.nn.Module:
    if isinstance(obj, dict) and obj.get("format") == SAVE_FORMAT:
        version = obj.get("version")
        if type(version) is not int or version < 1:
            raise LoadError(path, f"the record's 'version' is {version!r}, not a positive integer; "
                            "the file was not written by fxprune.save")
        if version > SAVE_VERSION:
            raise LoadError(path, f"format version {version!r} is newer than this fxprune reads "
                            f"(up to {SAVE_VERSION}); upgrade fxprune")
        if version == PICKLE_VERSION:
            if "module" not in obj:
                raise LoadError(path, "the record has no 'module' entry")
            obj = obj["module"]
        else:
            device = torch.device(map_location) if isinstance(map_location, (str, torch.device)) else None
            try:
                return _decode_graph_module(obj, device)
            except (_Malformed, KeyError, TypeError, ValueError, AttributeError, RuntimeError,
                    RecursionError) as err:
                raise LoadError(path, f"the graph record is malformed: {err}; the file was not written "
                                "by fxprune.save, or was changed after: save the model again") from None
    if not isinstance(obj, torch.nn.Module):
        note = (" (a state_dict: load it into the pruned architecture, e.g. fxprune.rebuild(model, "
                "plan, example_inputs, state_dict=...))" if isinstance(obj, dict) else "")
        raise LoadError(path, f"the file holds an object of type {type(obj).__name__}, "
                        f"not a torch.nn.Module{note}")
    return obj


def load(path: str | os.PathLike, map_location: Any = "cpu", *, trusted: bool = False) -> torch.nn.Module:
    """Load a module written by :func:`save`; with ``trusted=True`` also any pickled module.

    By default the file is read with ``torch.load(weights_only=True)`` and only the graph format
    is accepted: nothing the file names is imported or run, beyond ATen operators and a few
    arithmetic functions in its graph. The result is a ``torch.fx.GraphModule`` in eval mode
    whose ``state_dict`` keys are the original module's. A pickle (``format="pickle"``, files of
    earlier fxprune versions, ``torch.save(module)``, ``pickle.dump``) is refused with a
    :class:`LoadError` naming what it would import, *without* unpickling it: unpickling runs
    any code the file names, so a file from someone else could do anything. ``trusted=True``
    unpickles it (today's behaviour, plain ``pickle`` files included): use it only for files you
    made or trust. (A hostile graph file still cannot run Python code; like any model file it can
    make the model compute nonsense or allocate much memory when called.) Tensors go to ``map_location`` (``"cpu"`` by default). A missing, truncated or
    corrupt file, or one that holds something other than a module, raises :class:`LoadError`
    naming the path.

    Example:
        >>> import tempfile, os, torch
        >>> path = save(torch.nn.Linear(4, 2), os.path.join(tempfile.mkdtemp(), "m.pt"), torch.randn(2, 4))
        >>> sorted(load(path).state_dict())
        ['bias', 'weight']
        >>> _ = save(torch.nn.Linear(4, 2), path, format="pickle")
        >>> type(load(path, trusted=True)).__name__
        'Linear'
    """
    path = Path(path)
    if not path.exists():
        raise LoadError(path, "the file does not exist")
    if not path.is_file():
        raise LoadError(path, "the path is not a regular file")
    obj = _read_trusted(path, map_location) if trusted else _read_safe(path, map_location)
    return _module_of(path, obj, map_location)
