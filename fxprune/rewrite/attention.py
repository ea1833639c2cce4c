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
from ..errors import StageError


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


def repeat_kv(node: fx.Node, payload: tuple, kept: Callable) -> None:
    """The ``expand`` of grouped-query attention's ``repeat_kv`` when query heads go
    (``fxprune.coupling.gqa_rules``): its ``n_rep`` entry becomes the query heads each kv group
    keeps. Every kv group must keep the same number (``fxprune.select`` sees to it); a plan that
    does not (e.g. an edited plan file) is refused rather than rewritten into a wrong model.

    Example:
        >>> g = fx.Graph()
        >>> x = g.placeholder("x")
        >>> e = g.call_method("expand", (x, [1, 2, 3, 5, 4]))
        >>> dead = {1, 4}   # query head 1 of kv group 0, head 1 of kv group 1
        >>> repeat_kv(e, (tuple(range(6)), 2, 2, "reshape"), lambda u: sum(i not in dead for i in u))
        >>> e.args[1]
        [1, 2, 2, 5, 4]
    """
    units, kv, dim, _reshape = payload
    total = kept(units)
    if total == len(units):
        return
    rep = len(units) // kv
    per_group = [kept(units[g * rep:(g + 1) * rep]) for g in range(kv)]
    if len(set(per_group)) != 1 or not per_group[0]:
        raise StageError("rewrite", node.name, f"repeat_kv keeps {per_group} query heads in its {kv} kv groups: "
                                               "every kv group must keep the same number, at least one")
    if "size" in node.kwargs:
        node.kwargs = {**node.kwargs, "size": _with_entry(node.kwargs["size"], dim, per_group[0])}
    elif len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        node.args = (node.args[0], _with_entry(node.args[1], dim, per_group[0]))
    else:
        node.args = (node.args[0], *_with_entry(node.args[1:], dim, per_group[0]))


def _with_entry(sizes: Any, dim: int, value: int) -> Any:
    out = list(sizes)
    out[dim] = value
    return type(sizes)(out) if isinstance(sizes, (list, tuple)) else out
