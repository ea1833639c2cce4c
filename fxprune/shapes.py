"""Stage 2: one shape-propagation pass; every later stage reads shapes from node meta."""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from .errors import InputError

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


def _same(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _params_fit(m: torch.nn.Module, x: torch.Tensor, shape: tuple, names: tuple = ("weight", "bias")) -> bool:
    return all(getattr(m, n, None) is None or (tuple(getattr(m, n).shape) == shape and getattr(m, n).dtype == x.dtype)
               for n in names)


def _batch_norm(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Eval-mode batch norm: the input's shape when the channel count fits everything."""
    c = (m.num_features,)
    if x.dim() >= 2 and x.shape[1] == m.num_features and not m.training \
            and _params_fit(m, x, c, ("weight", "bias", "running_mean", "running_var")):
        return _same(x)
    return None


def _layer_norm(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    shape = tuple(m.normalized_shape)
    if tuple(x.shape[x.dim() - len(shape):]) == shape and _params_fit(m, x, shape):
        return _same(x)
    return None


def _group_norm(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    if x.dim() >= 2 and x.shape[1] == m.num_channels and m.num_channels % m.num_groups == 0 \
            and _params_fit(m, x, (m.num_channels,)):
        return _same(x)
    return None


def _linear(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    w = m.weight
    if x.dim() >= 1 and w.dim() == 2 and x.shape[-1] == w.shape[1] == m.in_features \
            and w.shape[0] == m.out_features and w.dtype == x.dtype and _params_fit(m, x, (m.out_features,), ("bias",)):
        return x.new_empty((*x.shape[:-1], m.out_features))
    return None


# Output of a module from its input's meta tensor, after the checks its kernel would make; None
# defers to the meta kernel. These modules' meta kernels (decompositions, for norms above all)
# cost far more than the shapes they return.
_SHAPE_RULES = {
    torch.nn.BatchNorm1d: _batch_norm, torch.nn.BatchNorm2d: _batch_norm, torch.nn.BatchNorm3d: _batch_norm,
    torch.nn.LayerNorm: _layer_norm, torch.nn.GroupNorm: _group_norm, torch.nn.Linear: _linear,
    **{cls: lambda _m, x: _same(x) for cls in (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.SiLU, torch.nn.GELU, torch.nn.Hardswish,
                                     torch.nn.Hardsigmoid, torch.nn.Sigmoid, torch.nn.Tanh, torch.nn.Identity,
                                     torch.nn.Dropout, torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.Mish)},
}


class _MetaRecorder(fx.Interpreter):
    """Runs the graph on meta tensors (shapes and dtypes only) and records every node."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        _record(n, result)
        return result

    def call_module(self, target, args, kwargs) -> Any:
        module = self.fetch_attr(target)
        rule = _SHAPE_RULES.get(type(module))
        if rule is not None and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) \
                and args[0].is_floating_point():
            out = rule(module, args[0])
            if out is not None:
                return out
        return super().call_module(target, args, kwargs)

    def get_attr(self, target, args, kwargs) -> Any:
        value = super().get_attr(target, args, kwargs)
        return value.to("meta") if isinstance(value, torch.Tensor) else value


class _MetaRun(torch.nn.Module):
    """Holds the graph module as a submodule so ``torch.func.functional_call`` can swap every
    parameter and buffer for a meta tensor while the recorder runs (the module keeps its own)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, *inputs: Any) -> Any:
        return _MetaRecorder(self.gm).run(*inputs)


def _to_meta(value: Any) -> Any:
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def _meta_propagate(gm: fx.GraphModule, example_inputs: tuple) -> bool:
    """Shapes from meta tensors: no data, no fake-tensor bookkeeping, the fastest way; False
    when some op has no meta kernel or reads data (the caller then falls back)."""
    state = {f"gm.{k}": torch.empty_like(v, device="meta")
             for k, v in (*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False))}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.func.functional_call(_MetaRun(gm), state, tuple(_to_meta(t) for t in example_inputs),
                                       tie_weights=False, strict=False)
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
    outputs.
    Inputs the model rejects raise ``InputError`` carrying the model's own message.

    Example:
        >>> gm = torch.fx.symbolic_trace(torch.nn.Conv2d(3, 8, 3))
        >>> _ = propagate(gm, (torch.randn(1, 3, 8, 8),))
        >>> [n.meta["fxprune"]["shape"] for n in gm.graph.nodes][-2]
        (1, 8, 6, 6)
    """
    modes = [(m, m.training) for m in gm.modules()]
    gm.eval()
    if fake and (_meta_propagate(gm, example_inputs) or _fake_propagate(gm, example_inputs)):
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
        module.training = training


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
