"""Stage 1: symbolic tracing with a tracer that keeps torch.nn leaf modules."""
from __future__ import annotations

import copy
import os
import threading
import traceback
from typing import Any, Iterable

import torch
import torch.fx as fx

from ..copying import copy_graph_module, copy_module
from ..errors import TraceError
from .scoped_patcher import scoped_module_patches

try:  # generates code on first use: a plan rarely runs its traced module, apply makes its own
    from torch.fx._lazy_graph_module import _LazyGraphModule as _TracedModule
except ImportError:  # pragma: no cover - older or newer torch without it
    _TracedModule = fx.GraphModule


class LeafTracer(fx.Tracer):
    """A ``torch.fx.Tracer`` that also keeps the user's ``leaf_modules`` (types or names) as leaves,
    and lets modules called from other threads while it traces run eagerly (torch.fx's patch of
    ``nn.Module.__call__``/``__getattr__`` is process-wide; this tracer only answers its own thread).

    Example:
        >>> gm = trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)))
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_module', 'output']
    """

    def __init__(self, leaf_modules: Iterable = ()):
        super().__init__()
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}

    def trace(self, root, concrete_args=None):
        # torch.fx patches nn.Module.__call__ and __getattr__ for the whole process while it
        # traces: calls from other threads must run eagerly, untouched by this trace
        self._owner = threading.get_ident()
        self.__dict__.pop("_parameter_names", None)  # tables of the previous root, if any
        self.__dict__.pop("_buffer_names", None)
        self.__dict__.pop("_failure", None)
        if not isinstance(root, torch.nn.Module):
            return super().trace(root, concrete_args)
        with scoped_module_patches(type(m) for m in root.modules()):  # not nn.Module's: see scoped_patcher
            return super().trace(root, concrete_args)

    def _other_thread(self) -> bool:
        return threading.get_ident() != getattr(self, "_owner", threading.get_ident())

    def call_module(self, m, forward, args, kwargs):
        if self._other_thread():
            return forward(*args, **kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as err:
            self._note_failure(err, m)
            raise

    def _note_failure(self, err: BaseException, m: torch.nn.Module) -> None:
        """Record the types of the modules an error leaves, innermost first (``failed_inside``)."""
        failure = self.__dict__.get("_failure")
        if failure is None or failure[0] is not err:  # a new error (an earlier one was caught)
            failure = self.__dict__["_failure"] = (err, [])
        failure[1].append(type(m))

    def failed_inside(self, err: BaseException) -> tuple:
        """The module types ``err`` was raised inside while tracing, innermost first; () when it
        was raised outside every module call (or by another trace).

        Example:
            >>> class Bad(torch.nn.Module):
            ...     def forward(self, x):
            ...         return x if x.sum() > 0 else -x
            >>> tracer = LeafTracer()
            >>> try:
            ...     tracer.trace(torch.nn.Sequential(Bad()))
            ... except Exception as err:
            ...     [t.__name__ for t in tracer.failed_inside(err)]
            ['Bad']
        """
        failure = self.__dict__.get("_failure")
        return tuple(failure[1]) if failure is not None and failure[0] is err else ()

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        """torch.fx's own lookup scans every named parameter of the root per attribute read
        (quadratic in model size); this one reads a table made once per trace, same result."""
        if self._other_thread():
            return attr_val
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        name = None
        if isinstance(attr_val, torch.nn.Parameter):
            name = self._names("_parameter_names", self.root.named_parameters).get(id(attr_val))
        if name is None and self.proxy_buffer_attributes:
            name = self._names("_buffer_names", self.root.named_buffers).get(id(attr_val))
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            factory = None if not self.param_shapes_constant else \
                (lambda node: fx.proxy.ParameterProxy(self, node, name, attr_val))
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {}, proxy_factory_fn=factory)
        return parameter_proxy_cache[name]

    def create_arg(self, a: Any) -> Any:
        """A parameter or buffer passed as a plain tensor becomes a ``get_attr`` node found in a
        table, not by torch.fx's scan of every named parameter/buffer per argument."""
        if isinstance(a, torch.Tensor) and not self._other_thread():
            name = self._names("_parameter_names", self.root.named_parameters).get(id(a)) \
                if isinstance(a, torch.nn.Parameter) else self._names("_buffer_names", self.root.named_buffers).get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def _names(self, slot: str, named) -> dict:
        """``{id(tensor): first name}`` of the root's parameters or buffers, made on first use."""
        table = self.__dict__.get(slot)
        if table is None:
            table = {}
            for n, t in named():
                table.setdefault(id(t), n)
            self.__dict__[slot] = table
        return table

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)


_LIBRARY_DIRS = (os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), ""),  # torch's package
                 os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ""))  # fxprune's


def _offending_frame(err: BaseException) -> str:
    """The innermost frame of ``err`` outside torch's and fxprune's own package directories (a
    user's code may live anywhere, a checkout named ``fxprune`` included)."""
    frames = traceback.extract_tb(err.__traceback__)
    user = [f for f in frames if not os.path.abspath(f.filename).startswith(_LIBRARY_DIRS)]
    if not user:
        return ""
    f = user[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def _bake_concrete_args(graph: fx.Graph, concrete_args: dict, model: torch.nn.Module) -> None:
    """Replace the placeholders of concrete arguments by their values, so the traced module
    is called with the remaining inputs only (the same positional inputs as the model)."""
    import inspect
    names = list(inspect.signature(model.forward).parameters)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for name, node in zip(names, placeholders):
        if name in concrete_args:
            value = concrete_args[name]
            if isinstance(value, (bool, int, float, str, type(None))):
                for user in list(node.users):
                    user.args = fx.node.map_arg(user.args, lambda n: value if n is node else n)
                    user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is node else n)
                graph.erase_node(node)


def structural_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model``'s modules and attributes that shares its parameter and buffer
    tensors (no data is copied).

    Example:
        >>> m = torch.nn.Linear(2, 2)
        >>> c = structural_copy(m)
        >>> c is not m, c.weight is m.weight
        (True, True)
    """
    memo = {id(t): t for m in model.modules() for t in (*m._parameters.values(), *m._buffers.values())
            if t is not None}
    if isinstance(model, fx.GraphModule):
        return copy_graph_module(model, memo)
    return copy_module(model, memo)


def trace(model: torch.nn.Module, leaf_modules: Iterable = (), concrete_args: dict | None = None) -> fx.GraphModule:
    """Trace a private structural copy of ``model`` into a GraphModule; the model is never touched.

    The copy has its own submodule objects (tracing may set attributes on them) but shares the
    model's parameter and buffer tensors, read-only: no stage of fxprune writes to them, and
    ``apply`` gives the pruned module tensors of its own. Copying 100 MB of weights only to read
    them would be the slowest step of a prune.

    Raises ``TraceError`` naming the module class and the offending line, with advice; its
    ``failed_inside`` holds the types of the modules the failure happened in, innermost first.

    Example:
        >>> gm = trace(torch.nn.Linear(4, 2))
        >>> isinstance(gm, torch.fx.GraphModule)
        True
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    private = structural_copy(model)
    if isinstance(model, fx.GraphModule) and not leaf_modules and not concrete_args:
        gm = _TracedModule(private, copy.deepcopy(private.graph), type(model).__name__)
    else:
        tracer = LeafTracer(leaf_modules)
        try:
            graph = tracer.trace(private, concrete_args=concrete_args)
        except Exception as err:  # torch.fx raises many exception types
            where = _offending_frame(err)
            failure = TraceError(
                f"torch.fx could not trace {type(model).__name__}: {type(err).__name__}: {err}"
                + (f"\n  at {where}" if where else "")
                + "\n  fix: pass leaf_modules=[TheSubmoduleType or 'its.name'] to keep the module that has "
                  "data-dependent control flow as an opaque leaf (its channels will be blocked), or "
                  "concrete_args={'arg': value} to fix the argument the control flow depends on.")
            failure.failed_inside = tracer.failed_inside(err)
            raise failure from err
        _bake_concrete_args(graph, concrete_args or {}, private)
        name = type(model).__name__
        gm = _TracedModule(tracer.root, graph, name)
    gm._tracer_cls = gm.graph._tracer_cls = None  # pickles of the result must not need fxprune
    copy_training_flags(model, gm)
    return gm


def copy_training_flags(model: torch.nn.Module, gm: torch.nn.Module) -> None:
    """Every submodule of ``gm`` takes the train/eval flag of ``model``'s module of the same name
    (mixed modes too), the root's flag where ``model`` has no such module.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2)).eval()
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))  # train mode
        >>> copy_training_flags(m, gm)
        >>> gm.training, gm.get_submodule("0").training
        (False, False)
    """
    flags = {name: m.training for name, m in model.named_modules()}
    for name, m in gm.named_modules():
        m.__dict__["training"] = flags.get(name, model.training)  # as Module.__setattr__ would


def check_inputs(example_inputs: Any) -> tuple:
    """Normalise example inputs to a tuple (a lone tensor becomes a 1-tuple).

    Example:
        >>> len(check_inputs(torch.zeros(1)))
        1
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, dict):
        raise TraceError("example_inputs must be a tensor or a tuple of positional inputs, not a dict")
    return (example_inputs,)
