"""Splitting the channel dim in a view/reshape, and channel shuffles.

A view ``(n, C, h, w) -> (n, g, C // g, h, w)`` lays the ``C`` channels out as a grid of ``g``
blocks by ``C // g`` positions. A channel value has one channel dim, so one axis of the grid
must carry the units while the unit along the other axis does not change:

- when the units already repeat along all but one axis (the inverse of a flatten, e.g.
  ``view(n, C, h, w)`` after ``flatten(1)``), that axis carries them and nothing is coupled;
- otherwise, for a two-way split, the inner axis carries the channels and position ``j`` of
  every block is coupled (*group-structure* edges): each block keeps the same positions and
  ``g`` never changes, so code that computes ``C // g`` at run time stays right.

After ``transpose(1, 2)`` and the merging view back to ``(n, C, h, w)`` (a flatten, stride map),
the channel order is the shuffled one and removal keeps the shuffle a permutation of the kept
channels. Literal sizes in both views are rewritten by the pass. ``torch.channel_shuffle`` /
``nn.ChannelShuffle`` get the same semantics directly.

Example:
    >>> import torch, fxprune
    >>> class Shuffle(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 2, 1)
    ...     def forward(self, x):
    ...         y = self.a(x).view(1, 2, 4, 5, 5).transpose(1, 2).contiguous().view(1, 8, 5, 5)
    ...         return self.b(y)
    >>> p = fxprune.plan(Shuffle(), fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 5, 5),))
    >>> (p.groups[0].size, p.groups[0].kept)
    (4, 2)
    >>> p.removed_channels()["view_1"][1] == sorted(2 * j + i for j in p.groups[0].removed for i in (0, 1))
    True
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from . import rules as R
from .conv_rules import couple_blocks
from .state import Analysis, ChannelInfo


def _split_factors(in_shape: tuple, out_shape: tuple, cd: int) -> int | None:
    """k when ``out_shape`` is ``in_shape`` with dim ``cd`` split into k >= 2 dims, else None."""
    if len(out_shape) < cd + 2 or tuple(in_shape[:cd]) != tuple(out_shape[:cd]):
        return None
    rest = math.prod(in_shape[cd + 1:])
    for k in range(2, len(out_shape) - cd + 1):
        if math.prod(out_shape[cd:cd + k]) == in_shape[cd] and math.prod(out_shape[cd + k:]) == rest:
            return k
    return None


def _natural_axis(an: Analysis, units: tuple, factors: tuple) -> int | None:
    """An axis of the grid along which alone the units change (largest first), if any."""
    roots = torch.tensor([an.units.find(u) for u in units], dtype=torch.long).reshape(factors)
    for t in sorted(range(len(factors)), key=lambda t: -factors[t]):
        r = roots.movedim(t, 0).reshape(factors[t], -1)
        if bool((r == r[:, :1]).all()):
            return t
    return None


def _along(units: tuple, factors: tuple, t: int) -> tuple:
    stride = math.prod(factors[t + 1:])
    return tuple(units[j * stride] for j in range(factors[t]))


def split_channel_dim(an: Analysis, node: fx.Node, v: ChannelInfo, in_shape: tuple, out_shape: tuple) -> Any:
    """The output of a view/reshape that splits the channel dim, or None if it does not."""
    cd = v.dim
    k = _split_factors(in_shape, out_shape, cd)
    if k is None:
        return None
    factors = tuple(out_shape[cd:cd + k])
    t = _natural_axis(an, v.units, factors)
    if t is None and k != 2:
        return None
    if t is None:
        t = 1
        why = (f"{R.describe(node)} splits the channel dim {in_shape[cd]} into {factors[0]} x {factors[1]}: "
               "position j of every block goes together")
        couple_blocks(an, v.units, factors[0], why)
    out = ChannelInfo(cd + t, _along(v.units, factors, t))
    if k == 2:  # the other factor is a structure constant (g, or C // g): keep its traced value
        an.rewrite_literal(node, "view_dims", (out.units, {cd + 1 - t: factors[1 - t]}))
    return out


def channel_shuffle(an: Analysis, node: fx.Node) -> Any:
    """``torch.channel_shuffle(x, g)`` / ``nn.ChannelShuffle(g)``: out[j*g + i] = in[i*(C//g) + j].
    Position j of every block goes together (``g`` stays), unless each block already carries a
    single unit, in which case whole blocks go and ``g`` is rewritten."""
    x = R.arg(node, 0, "input")
    v = an.tensor_info(x)
    if node.op == "call_module":
        groups = an.modules[node.target].groups
    else:
        groups = R.arg(node, 1, "groups")
    if v is None or v.dim != 1 or not isinstance(groups, int) or len(v.units) % groups:
        return R.opaque(an, node, f"{R.describe(node)}: needs channels on dim 1 and an int groups")
    per = len(v.units) // groups
    if per > 1 and _natural_axis(an, v.units, (groups, per)) == 0:
        reps = _along(v.units, (groups, per), 0)
        if node.op == "call_module":
            an.size_module(node.target, reps, R.describe(node))
        else:
            an.rewrite_literal(node, "count", (1, "groups", reps))
        return ChannelInfo(1, reps * per)
    why = f"{R.describe(node)} with groups={groups}: position j of every block goes together"
    first = couple_blocks(an, v.units, groups, why)
    return ChannelInfo(1, tuple(u for u in first for _ in range(groups)))
