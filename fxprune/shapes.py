"""Stage 2: one shape-propagation pass; every later stage reads shapes from node meta.

The meta pass uses the shape rules of ``fxprune.shape_rules`` (``register_shape_rule``,
``conv_shape`` and ``batch_norm_shape`` are re-exported here, where callers have found them).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from .errors import InputError
from .shape_rules import (_FUNCTION_RULES, _HASHABLE, _METHOD_RULES, _MODULE_CALL_RULES, _SHAPE_RULES,
                          batch_norm_shape, conv_shape, register_shape_rule)

META_KEY = "fxprune"


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, torch.Size):
        return None
    if isinstance(value, (tuple, list)):
        return tuple(_shape_of(v) for v in value)
    if isinstance(value, dict):
        return {k: _shape_of(v) for k, v in value.items()}
    return None


class _Recorder(ShapeProp):
    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        _record(n, result)
        return result




class _MetaRecorder(fx.Interpreter):
    """Runs the graph on meta tensors (shapes and dtypes only) and records every node.

    A module with a shape rule is not run; any other module runs on meta copies of its own
    parameters and buffers (``torch.func.functional_call``; the module keeps its tensors)."""

    def run(self, *args: Any) -> Any:
        """``fx.Interpreter.run`` without its per-node progress bar, current-node context and
        garbage collection (meta tensors hold no memory); the first failure ends the run."""
        env = self.env = {}
        self.args_iter = iter(args)
        for node in self.graph.nodes:
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            env[node] = value = getattr(self, node.op)(node.target, args, kwargs)
            _record(node, value)
            if node.op == "output":
                return value
        return None

    def call_module(self, target, args, kwargs) -> Any:
        module = self.submodules.get(target)
        if module is None:
            module = self.fetch_attr(target)
        rule = _SHAPE_RULES.get(type(module))
        if rule is not None and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) \
                and args[0].is_floating_point():
            out = rule(module, args[0])
            if out is not None:
                return out
        call_rule = _MODULE_CALL_RULES.get(type(module))
        out = call_rule(module, args, kwargs) if call_rule is not None else None
        if out is not None:
            return out
        state = {k: torch.empty_like(v, device="meta")
                 for k, v in (*module.named_parameters(remove_duplicate=False),
                              *module.named_buffers(remove_duplicate=False))}
        if not state:
            return module(*args, **kwargs)
        return torch.func.functional_call(module, state, args, kwargs, tie_weights=False, strict=False)

    def call_function(self, target, args, kwargs) -> Any:
        rule = _FUNCTION_RULES.get(target) if isinstance(target, _HASHABLE) else None
        out = rule(args, kwargs) if rule is not None else None
        return super().call_function(target, args, kwargs) if out is None else out

    def call_method(self, target, args, kwargs) -> Any:
        rule = _METHOD_RULES.get(target)
        out = rule(args, kwargs) if rule is not None else None
        return super().call_method(target, args, kwargs) if out is None else out

    def get_attr(self, target, args, kwargs) -> Any:
        return _to_meta(super().get_attr(target, args, kwargs))


def _to_meta(value: Any) -> Any:
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def _meta_propagate(gm: fx.GraphModule, example_inputs: tuple, recorder: _MetaRecorder | None = None) -> bool:
    """Shapes from meta tensors: no data, no fake-tensor bookkeeping, the fastest way; False
    when some op has no meta kernel or reads data (the caller then falls back). ``recorder``:
    one already made for ``gm`` (its table of submodules is the caller's walk of ``gm``)."""
    recorder = _MetaRecorder(gm, garbage_collect_values=False) if recorder is None else recorder
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            recorder.run(*(_to_meta(t) for t in example_inputs))
    except Exception:
        return False
    return True


def _fake_propagate(gm: fx.GraphModule, example_inputs: tuple) -> bool:
    """Shapes from fake tensors (no arithmetic); False when some op cannot run on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs]
    try:
        with torch.no_grad():
            FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    except Exception:
        return False
    for n in gm.graph.nodes:
        _record(n, n.meta.pop("val", None))
    return True


def _record(n: fx.Node, value: Any) -> None:
    """Write a fresh meta dict: graph copies share meta dicts shallowly, so never mutate one."""
    entry = dict(n.meta.get(META_KEY, {}))
    entry["shape"] = _shape_of(value)
    entry["dtype"] = value.dtype if isinstance(value, torch.Tensor) else None
    n.meta[META_KEY] = entry


def propagate(gm: fx.GraphModule, example_inputs: tuple, fake: bool = True) -> Any:
    """Store each node's output shape at ``node.meta["fxprune"]["shape"]``.

    Shapes come from meta tensors when every op has a meta kernel (fastest: no data), else from
    fake tensors, else from one real run in eval mode without grad, which then also returns the
    outputs. On meta tensors, the common modules and ops (convolutions, norms, Linear,
    activations, adaptive pools, attention, cat, broadcasting arithmetic) use shape rules that
    make their kernels' checks on widths, groups, weights and dtypes without running them.
    Inputs the model rejects raise ``InputError`` carrying the model's own message.

    Example:
        >>> gm = torch.fx.symbolic_trace(torch.nn.Conv2d(3, 8, 3))
        >>> _ = propagate(gm, (torch.randn(1, 3, 8, 8),))
        >>> [n.meta["fxprune"]["shape"] for n in gm.graph.nodes][-2]
        (1, 8, 6, 6)
    """
    recorder = _MetaRecorder(gm, garbage_collect_values=False)
    modes = [(m, m.training) for m in recorder.submodules.values()]  # gm.modules(), walked once
    for module, _ in modes:  # eval mode, as gm.eval() would set it, without its recursion
        module.__dict__["training"] = False  # what Module.__setattr__ would do, without its checks
    if fake and (_meta_propagate(gm, example_inputs, recorder) or _fake_propagate(gm, example_inputs)):
        _restore(modes)
        return None
    try:
        with torch.no_grad():
            return _Recorder(gm).propagate(*example_inputs)
    except Exception as err:
        cause = err.__cause__ or err
        raise InputError(
            f"the model rejected the example inputs: {type(cause).__name__}: {cause}\n"
            "  fix: pass example_inputs as a tuple of tensors the model accepts, e.g. (torch.randn(1, 3, 224, 224),)"
        ) from err
    finally:
        _restore(modes)


def _restore(modes: list) -> None:
    """Put back every submodule's own train/eval flag (a model may mix them, e.g. frozen norms)."""
    for module, training in modes:
        module.__dict__["training"] = training


def shape(node: Any) -> Any:
    """The recorded output shape of ``node`` (None for non-tensors or non-nodes).

    Example:
        >>> shape(3) is None
        True
    """
    if isinstance(node, fx.Node):
        return node.meta.get(META_KEY, {}).get("shape")
    return None


def is_tensor_shape(s: Any) -> bool:
    return isinstance(s, tuple) and all(isinstance(d, int) for d in s)


__all__ = ["META_KEY", "batch_norm_shape", "conv_shape", "is_tensor_shape", "propagate",
           "register_shape_rule", "shape"]
