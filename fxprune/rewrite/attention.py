"""``nn.MultiheadAttention`` calls in their functional form, for heads that no longer match the
embedding they read.

``nn.MultiheadAttention`` requires ``query.shape[-1] == embed_dim == num_heads * head_dim`` and
an ``embed_dim x embed_dim`` output projection. Once heads are removed independently of the
embedding (``attention_rules.multihead_attention``), the call is rewritten into plain torch ops
on the module's own (sliced) parameters::

    q, k, v = F.linear(x, in_proj_weight, in_proj_bias).chunk(3, -1)     # or one linear each
    q = q.unflatten(-1, (heads, head_dim)).transpose(-3, -2)             # same for k, v
    o = F.scaled_dot_product_attention(q, k, v).transpose(-3, -2).flatten(-2)
    out = out_proj(o)

This is what the module computes for a call without masks, dropout, bias_kv or zero_attn (the
only calls the rule declares separate). The module stays in the GraphModule as the owner of
its parameters; nothing from fxprune is referenced by the result.

Example:
    >>> import torch, fxprune
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.mha = torch.nn.MultiheadAttention(8, 4, batch_first=True)
    ...         self.out = torch.nn.Linear(8, 2)
    ...     def forward(self, x):
    ...         return self.out(self.mha(x, x, x, need_weights=False)[0])
    >>> pruned = fxprune.transform(Net(), fxprune.Policy(ratio=0.5), (torch.randn(2, 3, 8),))
    >>> "scaled_dot_product_attention" in pruned.code, pruned.mha.num_heads
    (True, 2)
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..coupling.rules import arg


def _projections(g: fx.Graph, t: str, m: torch.nn.Module, q: Any, k: Any, v: Any) -> list:
    """q, k, v after their input projections, as graph values."""
    bias = g.get_attr(f"{t}.in_proj_bias") if m.in_proj_bias is not None else None
    biases = [None] * 3
    if bias is not None:
        chunks = g.call_function(torch.chunk, (bias, 3))
        biases = [g.call_function(operator.getitem, (chunks, i)) for i in range(3)]
    if not m._qkv_same_embed_dim:
        names = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        return [g.call_function(F.linear, (x, g.get_attr(f"{t}.{n}"), b)) for x, n, b in zip((q, k, v), names, biases)]
    weight = g.get_attr(f"{t}.in_proj_weight")
    if q is k and k is v:
        packed = g.call_function(torch.chunk, (g.call_function(F.linear, (q, weight, bias)), 3, -1))
        return [g.call_function(operator.getitem, (packed, i)) for i in range(3)]
    rows = g.call_function(torch.chunk, (weight, 3))
    return [g.call_function(F.linear, (x, g.call_function(operator.getitem, (rows, i)), b))
            for i, (x, b) in enumerate(zip((q, k, v), biases))]


def decompose(node: fx.Node, payload: tuple, kept: Callable) -> None:
    """Replace a ``call_module`` of ``nn.MultiheadAttention`` by its functional form when any of
    its widths changed; its users read output 0 only (``attention_rules`` checked that)."""
    spaces, seq_first = payload
    if all(kept(u) == len(u) for u in spaces):
        return
    g, t = node.graph, node.target
    m = g.owning_module.get_submodule(t)
    q, k, v = arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")
    with g.inserting_before(node):
        if seq_first:  # (L, N, E) -> (N, L, E); the same input stays one value
            moved = {x: g.call_method("transpose", (x, 0, 1)) for x in dict.fromkeys((q, k, v))}
            q, k, v = moved[q], moved[k], moved[v]
        split = (m.num_heads, m.head_dim)  # as the fixer left them after slicing
        qkv = [g.call_method("transpose", (g.call_method("unflatten", (x, -1, split)), -3, -2))
               for x in _projections(g, t, m, q, k, v)]
        o = g.call_function(F.scaled_dot_product_attention, tuple(qkv))
        o = g.call_method("flatten", (g.call_method("transpose", (o, -3, -2)), -2))
        out = g.call_module(f"{t}.out_proj", (o,))
        if seq_first:
            out = g.call_method("transpose", (out, 0, 1))
    for user in list(node.users):
        if user.args[1] == 0:
            user.replace_all_uses_with(out)
        g.erase_node(user)
    g.erase_node(node)
