"""Stage 2: one shape-propagation pass; every later stage reads shapes from node meta."""
from __future__ import annotations

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

    Shapes come from fake tensors when every op supports them (fast: no arithmetic), else from
    one real run in eval mode without grad, which then also returns the outputs.
    Inputs the model rejects raise ``InputError`` carrying the model's own message.

    Example:
        >>> gm = torch.fx.symbolic_trace(torch.nn.Conv2d(3, 8, 3))
        >>> _ = propagate(gm, (torch.randn(1, 3, 8, 8),))
        >>> [n.meta["fxprune"]["shape"] for n in gm.graph.nodes][-2]
        (1, 8, 6, 6)
    """
    modes = [(m, m.training) for m in gm.modules()]
    gm.eval()
    if fake and _fake_propagate(gm, example_inputs):
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
