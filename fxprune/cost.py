"""MACs and parameters counted from the FX graph's recorded shapes (no extra forward pass)."""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .shapes import is_tensor_shape, shape


def _conv_macs(node: fx.Node, weight: torch.Tensor, groups: int, transposed: bool) -> int:
    out = shape(node)
    x = shape(node.args[0])
    k = math.prod(weight.shape[2:])
    if transposed:  # every input element meets out_channels/groups * k weights
        return math.prod(x) * weight.shape[1] * k
    return math.prod(out) * weight.shape[1] * k


def _linear_macs(node: fx.Node, weight: torch.Tensor) -> int:
    return math.prod(shape(node)) * weight.shape[1]


def _module_macs(gm: fx.GraphModule, node: fx.Node) -> int:
    m = gm.get_submodule(node.target)
    if isinstance(m, nn.modules.conv._ConvNd):
        return _conv_macs(node, m.weight, m.groups, m.transposed)
    if isinstance(m, nn.Linear):
        return _linear_macs(node, m.weight)
    if isinstance(m, nn.MultiheadAttention):
        return _mha_macs(node, m)
    return 0


def _mha_macs(node: fx.Node, m: nn.MultiheadAttention) -> int:
    q = shape(node.args[0])
    if not is_tensor_shape(q):
        return 0
    tokens = math.prod(q[:-1])
    length = q[0] if not m.batch_first else q[1]
    e = m.embed_dim
    return tokens * (3 * e * e + e * e) + 2 * tokens * length * e


def _tensor_attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    *path, name = target.split(".")
    return getattr(gm.get_submodule(".".join(path)) if path else gm, name)


def _function_macs(gm: fx.GraphModule, node: fx.Node) -> int:
    from .coupling.rules import arg
    if node.target in (F.conv1d, F.conv2d, F.conv3d, F.linear):
        w = arg(node, 1, "weight")
        if isinstance(w, fx.Node) and w.op == "get_attr":
            weight = _tensor_attr(gm, w.target)
            if node.target is F.linear:
                return _linear_macs(node, weight)
            return _conv_macs(node, weight, arg(node, 6, "groups", 1), False)
    if node.target in (torch.matmul, torch.bmm, operator.matmul, "matmul", "bmm"):
        a, b = shape(node.args[0]), shape(node.args[1])
        if is_tensor_shape(a) and is_tensor_shape(b) and is_tensor_shape(shape(node)):
            return math.prod(shape(node)) * a[-1]
    return 0


def count(gm: fx.GraphModule) -> dict:
    """``{"macs": int, "params": int, "per_node": {node: macs}}`` from recorded shapes.

    Example:
        >>> from fxprune.shapes import propagate
        >>> gm = torch.fx.symbolic_trace(nn.Linear(4, 3))
        >>> _ = propagate(gm, (torch.randn(2, 4),))
        >>> count(gm)["macs"], count(gm)["params"]
        (24, 15)
    """
    per_node = {}
    for node in gm.graph.nodes:
        if not is_tensor_shape(shape(node)) and not isinstance(shape(node), tuple):
            continue
        if node.op == "call_module":
            macs = _module_macs(gm, node)
        elif node.op in ("call_function", "call_method"):
            macs = _function_macs(gm, node)
        else:
            macs = 0
        if macs:
            per_node[node.name] = int(macs)
    params = sum(p.numel() for p in gm.parameters())
    return {"macs": sum(per_node.values()), "params": params, "per_node": per_node}
