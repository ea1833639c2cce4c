"""MACs and parameters counted from the FX graph's recorded shapes (no extra forward pass).

A MAC is one multiply-accumulate; ``torch.utils.flop_counter.FlopCounterMode`` reports
2 FLOPs per MAC, and ``count(gm)["macs"] * 2`` equals its total on graphs made of the ops below.

Counted: ``nn.ConvNd`` / ``nn.ConvTransposeNd`` / ``nn.Linear`` / ``nn.Bilinear`` /
``nn.MultiheadAttention`` modules; ``F.convNd``, ``F.conv_transposeNd``, ``F.linear``,
``F.bilinear``, ``F.scaled_dot_product_attention``; ``matmul`` / ``@`` / ``mm`` / ``bmm`` /
``addmm`` / ``baddbmm`` (functions and methods); two-operand ``einsum``.

Not counted, on purpose (``FlopCounterMode`` does not count them either): biases, norms,
activations, pooling, elementwise arithmetic, softmax. Known differences from ``FlopCounterMode``
(each checked in tests/test_cost.py): ``einsum`` with more than two operands counts 0 here (torch
counts the bmm calls it lowers to, whose order depends on its contraction path); ``nn.Bilinear`` /
``F.bilinear`` are counted here (``out * in1 * in2`` per output element) but not by torch,
which has no formula for ``aten._trilinear``; attention products are counted here whichever
kernel runs, while torch counts only the math path (its fused CPU SDPA kernel and the inference
fast path of ``nn.MultiheadAttention`` report 0).
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .shapes import is_tensor_shape, shape

_CONV = {F.conv1d: False, F.conv2d: False, F.conv3d: False,
         F.conv_transpose1d: True, F.conv_transpose2d: True, F.conv_transpose3d: True}
_MATMUL = (torch.matmul, torch.mm, torch.bmm, operator.matmul, "matmul", "mm", "bmm", "__matmul__")
_ADD_MATMUL = (torch.addmm, torch.baddbmm, "addmm", "baddbmm")


def _arg(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _conv(out: tuple, x: tuple, w: tuple, transposed: bool) -> int:
    """Every output element (input element, when transposed) meets ``w[1] * kernel`` weights."""
    return math.prod(x if transposed else out) * w[1] * math.prod(w[2:])


def _mha(node: fx.Node, m: nn.MultiheadAttention) -> int:
    q = shape(_arg(node, 0, "query"))
    k = shape(_arg(node, 1, "key"))
    v = shape(_arg(node, 2, "value"))
    if not all(is_tensor_shape(s) for s in (q, k, v)):
        return 0
    e = m.embed_dim
    if len(q) == 2:  # unbatched (L, E)
        batch, lq, lk = 1, q[0], k[0]
    elif m.batch_first:
        batch, lq, lk = q[0], q[1], k[1]
    else:
        batch, lq, lk = q[1], q[0], k[0]
    projections = batch * (lq * e * e + lk * m.kdim * e + lk * m.vdim * e + lq * e * e)
    attended = lk + int(m.bias_k is not None) + int(m.add_zero_attn)  # extra key/value rows
    return projections + 2 * batch * lq * attended * e


def _sdpa(node: fx.Node) -> int:
    q, k, v = (shape(_arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    if not all(is_tensor_shape(s) for s in (q, k, v)):
        return 0
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def _einsum(node: fx.Node) -> int:
    """Two operands: MACs = product of the sizes of every index (``...`` dims broadcast)."""
    equation = node.args[0] if node.args else None
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not isinstance(equation, str) or len(operands) != 2:
        return 0
    lhs = equation.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for letters, op in zip(lhs, operands):
        s = shape(op)
        if not is_tensor_shape(s):
            return 0
        keys = list(letters)
        if "..." in letters:  # broadcast dims, aligned from the right
            head, tail = letters.split("...")
            n = len(s) - len(head) - len(tail)
            keys = list(head) + [f"...{i}" for i in range(n, 0, -1)] + list(tail)
        if len(keys) != len(s):
            return 0
        for k, d in zip(keys, s):
            sizes[k] = max(sizes.get(k, 1), d)
    return math.prod(sizes.values())


def _module_cost(gm: fx.GraphModule, node: fx.Node) -> tuple[int, list[str]]:
    m = gm.get_submodule(node.target)
    out, x = shape(node), shape(_arg(node, 0, "input"))
    if isinstance(m, nn.modules.conv._ConvNd) and is_tensor_shape(out) and is_tensor_shape(x):
        return _conv(out, x, tuple(m.weight.shape), m.transposed), [f"{node.target}.weight"]
    if isinstance(m, nn.Linear) and is_tensor_shape(out):
        return math.prod(out) * m.in_features, [f"{node.target}.weight"]
    if isinstance(m, nn.Bilinear) and is_tensor_shape(out):
        return math.prod(out) * m.in1_features * m.in2_features, [f"{node.target}.weight"]
    if isinstance(m, nn.MultiheadAttention):
        return _mha(node, m), []
    return 0, []


def _weight(node: fx.Node, pos: int) -> tuple[tuple | None, list[str]]:
    w = _arg(node, pos, "weight")
    targets = [w.target] if isinstance(w, fx.Node) and w.op == "get_attr" else []
    return shape(w), targets


def _function_cost(node: fx.Node) -> tuple[int, list[str]]:
    t, out = node.target, shape(node)
    if not is_tensor_shape(out):
        return 0, []
    if t in _CONV:
        w, targets = _weight(node, 1)
        x = shape(_arg(node, 0, "input"))
        if is_tensor_shape(w) and is_tensor_shape(x):
            return _conv(out, x, w, _CONV[t]), targets
    elif t is F.linear:
        w, targets = _weight(node, 1)
        if is_tensor_shape(w):
            return math.prod(out) * w[-1], targets
    elif t is F.bilinear:
        w, targets = _weight(node, 2)
        if is_tensor_shape(w):
            return math.prod(out) * w[1] * w[2], targets
    elif t is F.scaled_dot_product_attention:
        return _sdpa(node), []
    elif t in (torch.einsum, "einsum"):
        return _einsum(node), []
    elif t in _MATMUL or t in _ADD_MATMUL:
        a = shape(node.args[1 if t in _ADD_MATMUL else 0])
        if is_tensor_shape(a) and a:
            return math.prod(out) * a[-1], []
    return 0, []


def node_cost(gm: fx.GraphModule, node: fx.Node) -> tuple[int, list[str]]:
    """``(MACs, weight targets)`` of one node, from recorded shapes (0 for uncounted ops).

    Example:
        >>> from fxprune.shapes import propagate
        >>> gm = torch.fx.symbolic_trace(nn.Conv2d(3, 8, 3))
        >>> _ = propagate(gm, (torch.randn(1, 3, 8, 8),))
        >>> node_cost(gm, list(gm.graph.nodes)[-2])
        (7776, ['weight'])
    """
    if node.op == "call_module":
        macs, targets = _module_cost(gm, node)
    elif node.op in ("call_function", "call_method"):
        macs, targets = _function_cost(node)
    else:
        return 0, []
    return int(macs), targets


def count(gm: fx.GraphModule) -> dict:
    """``{"macs": int, "params": int, "per_node": {node: macs}}`` from recorded shapes.

    ``params`` counts every parameter once (shared parameters once), buffers not at all.

    Example:
        >>> from fxprune.shapes import propagate
        >>> gm = torch.fx.symbolic_trace(nn.Linear(4, 3))
        >>> _ = propagate(gm, (torch.randn(2, 4),))
        >>> count(gm)["macs"], count(gm)["params"]
        (24, 15)
    """
    per_node = {}
    for node in gm.graph.nodes:
        macs, _ = node_cost(gm, node)
        if macs:
            per_node[node.name] = macs
    params = sum(p.numel() for p in gm.parameters())
    return {"macs": sum(per_node.values()), "params": params, "per_node": per_node}


def param_macs(gm: fx.GraphModule) -> dict[str, int]:
    """MACs each weight takes part in, summed over every call: ``{weight target: MACs}``.

    ``param_macs(gm)[w] / gm.get_parameter(w).numel()`` is the MACs that one element of ``w``
    costs, so removing ``n`` elements of ``w`` saves ``n`` times that (conv, linear, grouped and
    transposed conv alike).

    Example:
        >>> from fxprune.shapes import propagate
        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)))
        >>> _ = propagate(gm, (torch.randn(5, 4),))
        >>> param_macs(gm)
        {'0.weight': 60, '1.weight': 30}
    """
    out: dict[str, int] = {}
    for node in gm.graph.nodes:
        macs, targets = node_cost(gm, node)
        for t in targets:
            out[t] = out.get(t, 0) + macs
    return out
