"""Channel semantics of ``F.scaled_dot_product_attention`` (and its ATen twin after export) when
its operands carry channels on their head widths: the query/key width ``E`` and the value
width ``F``.

``out = softmax(q @ k.T * scale + mask) @ v`` with ``q: (..., L, E)``, ``k: (..., S, E)``,
``v: (..., S, F)`` and ``out: (..., L, F)``. With the mask oracle's removed channels zeroed:

- a removed ``E`` channel is zero in q and in k, so its term ``q_e * k_e`` is zero in every
  score: the scores lose nothing but that term. The default ``scale`` is ``1 / sqrt(E)`` of the
  width the call sees, so a pruned call gets an explicit ``scale=`` equal to the original one
  (``fxprune.rewrite.literals.sdpa_scale``); a scale the user gave is kept. Exact.
- a removed ``F`` channel is zero in v, so output column ``f`` is zero (the softmax weights do
  not read v): it passes through like a per-channel value. Exact.

The two are independent, so they may even be the *same* channels: a key and a value unbound
from one ``(B, N, 2, 1, C)`` view of one projection (pvt_v2, CoAtNet, single-head blocks), or
``q = k = v = x``. Removing channel ``c`` then zeroes q·k's term ``c`` and output column ``c`` at
once, and the pruned call computes the kept columns of the masked original. This is particular
to attention, where the contracted operands (q, k) and the passed-through operand (v) are
different tensors that each carry their channels on one index; a general matmul/einsum whose
operand carries channels on one index and meets tracked channels on another stays blocked
(``contraction_rules.contract_labels``).

Operands that carry channels on their heads (batch) dims, or on the sequence dims, go through
``contraction_rules.contract_labels`` as before.

Example:
    >>> import torch, torch.nn.functional as F, fxprune
    >>> class OneHead(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.q, self.kv, self.out = torch.nn.Linear(4, 6), torch.nn.Linear(4, 12), torch.nn.Linear(6, 4)
    ...     def forward(self, x):
    ...         k, v = self.kv(x).reshape(1, 5, 2, 1, 6).permute(2, 0, 3, 1, 4).unbind(0)
    ...         o = F.scaled_dot_product_attention(self.q(x).unsqueeze(1), k, v)
    ...         return self.out(o.squeeze(1))
    >>> p = fxprune.plan(OneHead(), fxprune.Policy(ratio=0.5), (torch.randn(1, 5, 4),))
    >>> [(g.size, g.kept, g.exact) for g in p.groups if g.removed]
    [(6, 3, True)]
    >>> "scale = 0.408" in fxprune.apply(p).code
    True
"""
from __future__ import annotations

import math
import string
from typing import Any

import torch.fx as fx

from .rules import arg, describe, ndim, opaque
from .state import Analysis, ChannelInfo, ParamRef
from .contraction_rules import _BROADCAST, _without_broadcasts, contract_labels

QK, VALUE = "E", "F"  # the query/key width and the value width (PyTorch's docs name them so)
SCALE_LITERAL = "sdpa_scale"  # the literal kind, rewritten by fxprune.rewrite.literals.sdpa_scale


def operands(an: Analysis, node: fx.Node) -> tuple[list[tuple[Any, str]], str] | None:
    """``([(operand, labels)], output labels)`` of an attention call, batch dims ``a, b, ...``,
    sequence dims ``L`` (queries) and ``S`` (keys); None when q, k, v differ in rank.

    Example:
        >>> import torch, torch.nn.functional as F, fxprune
        >>> class Attend(torch.nn.Module):
        ...     def forward(self, q, k, v):
        ...         return F.scaled_dot_product_attention(q, k, v)
        >>> x = torch.randn(2, 3, 5, 4)
        >>> p = fxprune.plan(Attend(), fxprune.Policy(), (x, x, x))
        >>> node = next(n for n in p.traced.graph.nodes if n.op == "call_function")
        >>> ops, out = operands(p.analysis, node)
        >>> [labels for _, labels in ops], out
        (['abLE', 'abSE', 'abSF'], 'abLF')
    """
    q, k, v = arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")
    nd = ndim(an, q)
    if nd is None or nd < 2 or ndim(an, k) != nd or ndim(an, v) != nd:
        return None
    batch = string.ascii_lowercase[: nd - 2]
    out = [(q, batch + "L" + QK), (k, batch + "S" + QK), (v, batch + "S" + VALUE)]
    mask = arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node) and ndim(an, mask):
        out.append((mask, (batch + "LS")[-ndim(an, mask):]))
    return out, batch + "L" + VALUE


def _carried(an: Analysis, ops: list[tuple[Any, str]]) -> set[str | None]:
    """The labels on which operands carry tracked channels (None: a channel dim without a label)."""
    labels = set()
    for a, spec in ops:
        v = an.value(a)
        if isinstance(v, ChannelInfo):
            label = spec[v.dim] if v.dim < len(spec) else None
            if label != _BROADCAST:
                labels.add(label)
    return labels


def _couple_width(an: Analysis, node: fx.Node, ops: list[tuple[Any, str]], label: str) -> tuple[int, ...] | str:
    """Couple the channels every operand carries on ``label``: the units, or why it cannot."""
    why = describe(node)
    tracked = [(a, spec) for a, spec in ops if label in spec and isinstance(an.value(a), ChannelInfo)
               and spec[an.value(a).dim] == label]
    units = an.value(tracked[0][0]).units
    for a, spec in ops:
        if label not in spec:
            continue
        v, d = an.value(a), spec.index(label)
        if (a, spec) in tracked:
            if len(v.units) != len(units):
                return f"{why}: index {label!r} has {len(units)} and {len(v.units)} channels in different operands"
            an.units.union(units, v.units, "identity", f"{why} (index {label!r})")
        elif isinstance(v, ParamRef) and an.param_tensor(v.target).shape[d] == len(units):
            role = "consumer" if label == QK else "passenger"
            an.slice_param(v.target, d, role, units, v.target, why)
        else:
            return f"{why}: an operand without tracked channels meets them on index {label!r}"
    return units


def _keep_scale(an: Analysis, node: fx.Node, ops: list[tuple[Any, str]], units: tuple[int, ...]) -> None:
    """The softmax scale must not follow a cut query width: a default scale becomes an explicit
    ``1/sqrt(E)`` of the original width when channels go; a number the user gave stays as it
    is; one computed in the graph may follow the width (``q.size(-1) ** -0.5``), so it is marked
    approximate with the reason."""
    scale = arg(node, 6, "scale")
    if scale is None:
        width = an.shape(ops[0][0])[-1]
        an.rewrite_literal(node, SCALE_LITERAL, (units, 1.0 / math.sqrt(width)))
    elif isinstance(scale, fx.Node):
        an.units.mark_inexact(units, f"{describe(node)}: its scale is computed at run time "
                                     f"(node {scale.name!r}) and may follow the query width")


def attention(an: Analysis, node: fx.Node) -> Any:
    """Channel semantics of one ``scaled_dot_product_attention`` call (see the module docstring).

    Example:
        >>> import torch, torch.nn.functional as F, fxprune
        >>> class SelfAttention(torch.nn.Module):   # q = k = v: one channel space on E and F
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
        ...     def forward(self, x):
        ...         y = self.a(x)
        ...         return self.b(F.scaled_dot_product_attention(y, y, y))
        >>> p = fxprune.plan(SelfAttention(), fxprune.Policy(ratio=0.5), (torch.randn(1, 5, 3),))
        >>> [(g.size, g.kept, g.exact) for g in p.groups if g.removed]
        [(4, 2, True)]
    """
    found = operands(an, node)
    if found is None:
        return opaque(an, node)
    ops, out = found
    ops = _without_broadcasts(an, ops)
    carried = _carried(an, ops[:3])
    if not carried or not carried <= {QK, VALUE} or arg(node, 7, "enable_gqa", False) is not False:
        return contract_labels(an, node, ops, out, inexact_if_contracted=_default_scale_note(node))
    if len(ops) > 3 and _carried(an, ops[3:]):  # the mask's dims are heads and positions: kept whole
        an.units.pin(an.value(ops[3][0]).units, f"{describe(node)}: its attn_mask carries channels on "
                                                "its heads or positions, which the call keeps whole")
    if QK in carried:
        units = _couple_width(an, node, ops, QK)
        if isinstance(units, str):
            return opaque(an, node, units)
        _keep_scale(an, node, ops, units)
    if VALUE in carried:
        units = _couple_width(an, node, ops, VALUE)
        if isinstance(units, str):
            return opaque(an, node, units)
        return ChannelInfo(out.index(VALUE), units)
    return an.fresh(node, an.shape(node), "opaque",
                    f"{describe(node)}: its value carries no tracked channels; its result carries none")


def _default_scale_note(node: fx.Node) -> str | None:
    """The approximation note for a query width cut by ``contract_labels`` (heads tracked
    elsewhere, the width mixed with them): the default scale follows the width there."""
    if arg(node, 6, "scale") is None:
        return "the default softmax scale 1/sqrt(E) follows the query width"
    return None
