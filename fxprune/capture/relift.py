"""Lift ATen layer calls of an exported graph back to calls of the model's own modules.

``torch.export`` inlines every module: a BatchNorm2d becomes ``aten.batch_norm(x, w, b, mean, var,
training=False, ...)`` with the mode baked in. Where the node came from a module of a known type
(its ``nn_module_stack``) and its arguments are exactly that module's parameters and settings,
the call is replaced by ``call_module`` of that module, as ``torch.fx.symbolic_trace`` would have
left it. The pruned model then follows ``.train()``/``.eval()`` like the original, and keeps the
module-level slicers (``in_channels``, ``num_features``, ...). A call that does not match is left
to its functional twin, which computes the same.

Example:
    >>> sorted(t.__name__ for t in LIFTS[torch.ops.aten.batch_norm].types)
    ['BatchNorm1d', 'BatchNorm2d', 'BatchNorm3d']
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class Lift:
    """Module types an ATen op may come from, and a check that the call is the module's forward.

    ``matches(module, path, kwargs)`` gets the ATen call's arguments by schema name (``get_attr``
    nodes as their targets) and returns whether ``module(input)`` computes the same.

    Example:
        >>> Lift((nn.Linear,), lambda m, path, kw: True).types
        (<class 'torch.nn.modules.linear.Linear'>,)
    """

    types: tuple
    matches: Callable[[nn.Module, str, dict], bool]
    input_position: int = 0  # where the ATen call takes the module's input (embedding: 1)


def _param(kwargs: dict, name: str, path: str, attr: str, module: nn.Module) -> bool:
    """The argument ``name`` is the tensor ``module.attr`` (or both are absent). Arguments read
    through ``get_attr`` arrive as the tensors they name, so a tied weight (GPT-2's ``wte`` and
    ``lm_head``) matches under either of its names."""
    value, own = kwargs.get(name), getattr(module, attr, None)
    if own is None:
        return value is None
    return value is own


def _ints(value: Any, n: int) -> tuple:
    if isinstance(value, int):
        return (value,) * n
    return tuple(value) if len(value) == n else tuple(value) * n


def _conv(m: nn.Module, path: str, kw: dict) -> bool:
    n = len(m.kernel_size)
    if m.padding_mode != "zeros" or not (_param(kw, "weight", path, "weight", m)
                                         and _param(kw, "bias", path, "bias", m)):
        return False
    padding = kw.get("padding", 0)
    if isinstance(m.padding, str) or isinstance(padding, str):
        same_padding = padding == m.padding
    else:
        same_padding = _ints(padding, n) == tuple(m.padding)
    return same_padding and _ints(kw.get("stride", 1), n) == tuple(m.stride) \
        and _ints(kw.get("dilation", 1), n) == tuple(m.dilation) and kw.get("groups", 1) == m.groups


def _linear(m: nn.Module, path: str, kw: dict) -> bool:
    return _param(kw, "weight", path, "weight", m) and _param(kw, "bias", path, "bias", m)


def _batch_norm(m: nn.Module, path: str, kw: dict) -> bool:
    stats = m.track_running_stats
    if m.momentum is None or not all(_param(kw, k, path, k, m) for k in ("weight", "bias")):
        return False
    if stats and not all(_param(kw, k, path, k, m) for k in ("running_mean", "running_var")):
        return False
    if not stats and (kw.get("running_mean") is not None or kw.get("running_var") is not None):
        return False
    return bool(kw.get("training")) == (m.training or not stats) and kw.get("eps") == m.eps \
        and kw.get("momentum") == m.momentum


def _layer_norm(m: nn.Module, path: str, kw: dict) -> bool:
    return tuple(kw.get("normalized_shape", ())) == tuple(m.normalized_shape) and kw.get("eps", 1e-5) == m.eps \
        and _param(kw, "weight", path, "weight", m) and _param(kw, "bias", path, "bias", m)


def _group_norm(m: nn.Module, path: str, kw: dict) -> bool:
    return kw.get("num_groups") == m.num_groups and kw.get("eps", 1e-5) == m.eps \
        and _param(kw, "weight", path, "weight", m) and _param(kw, "bias", path, "bias", m)


def _embedding(m: nn.Module, path: str, kw: dict) -> bool:
    padding = -1 if m.padding_idx is None else m.padding_idx
    return m.max_norm is None and not m.sparse and _param(kw, "weight", path, "weight", m) \
        and kw.get("padding_idx", -1) == padding


def _dropout(m: nn.Module, path: str, kw: dict) -> bool:
    return kw.get("p") == m.p and bool(kw.get("train")) == m.training


LIFTS: dict[Any, Lift] = {
    aten.conv1d: Lift((nn.Conv1d,), _conv), aten.conv2d: Lift((nn.Conv2d,), _conv),
    aten.conv3d: Lift((nn.Conv3d,), _conv),
    aten.linear: Lift((nn.Linear,), _linear),
    aten.batch_norm: Lift((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), _batch_norm),
    aten.layer_norm: Lift((nn.LayerNorm,), _layer_norm),
    aten.group_norm: Lift((nn.GroupNorm,), _group_norm),
    aten.embedding: Lift((nn.Embedding,), _embedding, input_position=1),
    aten.dropout: Lift((nn.Dropout,), _dropout),
}


def innermost_module(node: fx.Node) -> tuple[str, str] | None:
    """``(path, type name)`` of the innermost module a node of an exported graph came from.

    Example:
        >>> innermost_module(fx.Graph().placeholder("x")) is None
        True
    """
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    return path, cls


def resolve(root: nn.Module, target: str) -> Any:
    """``root``'s attribute at the dotted path ``target`` (``"layer1.0.conv1.weight"``), None when absent.

    Example:
        >>> resolve(nn.Sequential(nn.Linear(2, 3)), "0.weight").shape
        torch.Size([3, 2])
    """
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _schema_kwargs(node: fx.Node, root: nn.Module) -> dict | None:
    """The call's arguments by schema name, ``get_attr`` nodes replaced by the tensors they read."""
    schema = node.target._schema
    out = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            value = node.args[i]
        elif a.name in node.kwargs:
            value = node.kwargs[a.name]
        elif a.has_default_value():
            value = a.default_value
        else:
            return None
        if isinstance(value, fx.Node):
            value = resolve(root, value.target) if value.op == "get_attr" else value
        out[a.name] = value
    return out


def lift_target(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, int] | None:
    """``(module path, position of the module's input)`` a ``call_function`` node of an exported
    graph can be replaced by (``call_module(path, (node.args[position],))``), or None.

    Example:
        >>> lift_target(fx.Graph().placeholder("x"), {}) is None
        True
    """
    if node.op != "call_function":
        return None
    lift = LIFTS.get(getattr(node.target, "overloadpacket", None))
    origin = innermost_module(node)
    if lift is None or origin is None:
        return None
    path = origin[0]
    module = modules.get(path)
    if module is None or type(module) not in lift.types or path == "":
        return None
    if type(module).forward is not lift.types[lift.types.index(type(module))].forward:
        return None
    kwargs = _schema_kwargs(node, modules[""])
    if kwargs is None or not lift.matches(module, path, kwargs):
        return None
    if not isinstance(node.args[lift.input_position], fx.Node):
        return None
    return path, lift.input_position
