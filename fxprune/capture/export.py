"""The torch.export front end: capture with ``torch.export`` (non-strict), hand on an FX graph.

``torch.export.export(model, inputs, strict=False)`` runs the model's own Python on fake tensors
and records the ATen ops it calls, so it gets through code ``symbolic_trace`` cannot (``list(
x.chunk(2, 1))``, ``Proxy`` item assignment, shape checks, HF mask builders). Its graph then
becomes the graph form every later stage reads, the same one the FX front end makes:

- calls that came from a module of a known type with exactly that module's parameters and
  settings are lifted back to ``call_module`` (``relift.LIFTS``), so the pruned model keeps
  ``nn.Conv2d``/``nn.BatchNorm2d``/... and follows ``.train()``/``.eval()`` like the original;
- every other ATen call becomes its Python-level twin (``aten_twins.TWINS``): one op table,
  one rule per op for both front ends; an ATen op without a twin stays and blocks its channels;
- metadata asserts and export's guard function are dropped, aliases read their input;
- regions that cannot change forward values (``torch.no_grad()``, ``torch.autocast(...,
  enabled=False)`` inside ``forward``; export makes each a higher-order op calling a subgraph)
  are inlined, so their ops meet the op table (``regions.py``); an enabled autocast stays whole;
- parameters and buffers keep the model's names (``layer1.0.conv1.weight``), so ``state_dict``
  keys are the original ones; tensors export created (lifted constants) become non-persistent;
- the output keeps its structure: tuples, lists and dicts as FX output containers, anything
  else registered with ``torch.utils._pytree`` (HF ``ModelOutput``) through pytree code.

Example:
    >>> import torch
    >>> gm = capture_export(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()),
    ...                     (torch.randn(1, 3, 8, 8),))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_function', 'output']
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from ..errors import TraceError
from .aten_twins import ALIASES, DROPPED, twin_of
from .fx_trace import copy_training_flags, structural_copy
from .regions import inline_regions
from .relift import lift_target, resolve

try:
    from torch.fx._lazy_graph_module import _LazyGraphModule as _CapturedModule
except ImportError:  # pragma: no cover - torch without lazy graph modules
    _CapturedModule = fx.GraphModule

_PLAIN_CONTAINERS = (tuple, list, dict)
_STAT_COUNTER = "num_batches_tracked"


def _first_line(err: BaseException, limit: int = 400) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    line = next((ln for ln in text.splitlines() if ln.strip()), text)
    return line if len(line) <= limit else line[:limit] + "..."


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export logs warnings and prints a failed capture's partial graph to stderr; the
    TraceError says why once. (stderr is redirected while export runs, under the capture lock.)"""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_NOISY_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export",
                  "torch._export", "torch._subclasses.fake_tensor", "torch.fx.experimental.recording")


def export_program(model: nn.Module, inputs: tuple, kwargs: dict | None = None) -> torch.export.ExportedProgram:
    """``torch.export.export`` (non-strict) of ``model``; failures are a ``TraceError`` with export's reason.

    Example:
        >>> import torch
        >>> ep = export_program(torch.nn.Linear(2, 3), (torch.randn(1, 2),))
        >>> list(ep.graph_signature.parameters)
        ['weight', 'bias']
    """
    try:
        with warnings.catch_warnings(), _quiet_torch_logs():
            warnings.simplefilter("ignore")
            return torch.export.export(model, inputs, kwargs=kwargs or {}, strict=False)
    except Exception as err:  # export raises many types (UserError, GuardOnDataDependentSymNode, ...)
        raise TraceError(f"torch.export could not capture {type(model).__name__}: {_first_line(err)}") from err


def _place(root: nn.Module, target: str, value: Any) -> None:
    """Put an exported constant on the private copy, as a non-persistent buffer where it is a tensor."""
    *prefix, field = target.split(".")
    owner = root
    for part in prefix:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        owner.register_buffer(field, value, persistent=False)
    else:
        setattr(owner, field, value)


def _stat_counter_update(node: fx.Node, lifted: set) -> bool:
    """``aten.add_(bn.num_batches_tracked, 1)`` of a BatchNorm lifted to its module (which counts itself)."""
    if getattr(node.target, "overloadpacket", None) is not torch.ops.aten.add_:
        return False
    counter = node.args[0]
    if not (isinstance(counter, fx.Node) and counter.op == "get_attr"):
        return False
    owner, _, name = counter.target.rpartition(".")
    return name == _STAT_COUNTER and owner in lifted


def _needs_pytree(spec: pytree.TreeSpec) -> bool:
    if spec.is_leaf():
        return False
    if spec.type not in _PLAIN_CONTAINERS:
        return True
    children = spec.children() if callable(getattr(spec, "children", None)) else spec.children_specs
    return any(_needs_pytree(child) for child in children)


def _translate(exported: fx.GraphModule, private: nn.Module) -> tuple[fx.Graph, list]:
    """The exported graph in fxprune's graph form, and the flat output nodes."""
    modules = dict(private.named_modules())
    lifts = {node: lift_target(node, modules) for node in exported.graph.nodes}
    lifted = {lift[0] for lift in lifts.values() if lift is not None}
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    read = lambda value: fx.node.map_arg(value, lambda n: env[n])  # noqa: E731
    outputs: list = []
    for node in exported.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
        elif node.op == "get_attr":
            if resolve(private, node.target) is None:
                _place(private, node.target, resolve(exported, node.target))
            env[node] = graph.get_attr(node.target)
        elif node.op == "call_module":
            if node.users:
                raise TraceError(f"torch.export left a call of submodule {node.target!r} with users; "
                                 "capture with capture='fx' instead")
        elif node.op == "call_function":
            packet = getattr(node.target, "overloadpacket", None)
            if packet in DROPPED:
                continue
            if packet in ALIASES or _stat_counter_update(node, lifted):
                env[node] = read(node.args[0])
                continue
            if lifts[node] is not None:
                path, position = lifts[node]
                env[node] = graph.call_module(path, (read(node.args[position]),))
                continue
            twin = twin_of(node.target)
            args, kwargs = read(node.args), read(node.kwargs)
            if twin is None:
                env[node] = graph.call_function(node.target, args, kwargs)
            else:
                args, kwargs = twin.adapt(tuple(args), dict(kwargs))
                make = graph.call_function if twin.op == "call_function" else graph.call_method
                env[node] = make(twin.target, tuple(args), kwargs)
        elif node.op == "output":
            outputs = list(pytree.tree_leaves(read(node.args[0])))
        else:  # pragma: no cover - torch.fx has no other opcodes
            raise TraceError(f"unexpected node {node.op} in the exported graph")
        if node in env and isinstance(env[node], fx.Node) and "nn_module_stack" in node.meta:
            env[node].meta["nn_module_stack"] = node.meta["nn_module_stack"]
    return graph, outputs


def _kept_when_unused(node: fx.Node) -> bool:
    """Nodes dead-code elimination keeps: torch.fx's impure ones, in-place methods, module calls."""
    return node.is_impure() or node.op == "call_module" or (
        node.op == "call_method" and str(node.target).endswith("_"))


def _finish_output(graph: fx.Graph, outputs: list, out_spec: pytree.TreeSpec | None, gm_attrs: dict) -> None:
    """Give the graph an output of the model's structure (plain containers in the graph, anything
    else through pytree code that rebuilds it)."""
    if out_spec is None:
        graph.output(tuple(outputs))
        return
    if not _needs_pytree(out_spec):
        graph.output(pytree.tree_unflatten(outputs, out_spec))
        return
    placeholders = [n.name for n in graph.nodes if n.op == "placeholder"]
    in_spec = pytree.tree_structure((tuple(range(len(placeholders))), {}))
    graph._codegen = fx.graph._PyTreeCodeGen(fx.graph._PyTreeInfo(placeholders, in_spec, out_spec))
    graph.output(outputs)
    gm_attrs.update(_in_spec=in_spec, _out_spec=out_spec)


def capture_export(model: nn.Module, inputs: tuple, concrete_args: dict | None = None) -> fx.GraphModule:
    """Capture a private structural copy of ``model`` with ``torch.export`` into fxprune's graph form.

    ``concrete_args`` are passed to the model as keyword arguments and fixed in the graph. The
    model is never touched: export runs a copy that shares its tensors, and nothing writes them.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> gm = capture_export(m, (torch.randn(2, 4),))
        >>> sorted(gm.state_dict()) == sorted(m.state_dict())
        True
    """
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        raise TraceError("the torch.export front end takes tensor example inputs only; pass other "
                         "values by name with concrete_args={'name': value}")
    private = structural_copy(model)
    program = export_program(private, inputs, concrete_args)
    exported = program.module()
    inline_regions(exported)
    graph, outputs = _translate(exported, private)
    attrs: dict = {}
    _finish_output(graph, outputs, getattr(exported, "_out_spec", None), attrs)
    gm = _CapturedModule(private, graph, type(model).__name__)
    if gm.graph.eliminate_dead_code(is_impure_node=_kept_when_unused):
        gm.recompile()
    for name, value in attrs.items():
        setattr(gm, name, value)
    _keep_buffer_kinds(gm, private)
    copy_training_flags(model, gm)
    return gm


def _keep_buffer_kinds(gm: fx.GraphModule, private: nn.Module) -> None:
    """Buffers the model does not save (non-persistent, export's constants) are not saved here either."""
    persistent = set(private.state_dict(keep_vars=True))
    for name, module in gm.named_modules():
        for buffer in list(module._buffers):
            full = f"{name}.{buffer}" if name else buffer
            if full not in persistent:
                module._non_persistent_buffers_set.add(buffer)


__all__ = ["capture_export", "export_program"]
