"""A view/reshape that splits the channel dim into factors, merges it with its neighbours, or
both: the general case behind ``layout_rules.reshape``.

A reshape keeps every element's flat position. Around the channel dim ``cd`` there is a smallest
*block* of input dims ``in[a:b]`` whose product is also the product of a run of output dims
``out[a2:b2]``, with equal products before and after; only the block is re-laid out, the dims
before and after it are the same elements in the same order. Inside the block, the unit of each
output position is the unit of the input channel it comes from: a grid over ``out[a2:b2]``.

- One output dim (a merge, ``flatten``): its units are the stride map of the input channels.
- An output axis along which alone the units change (*natural* axis, e.g. the inverse of a
  flatten, or ``(B, N, heads * d) -> (B, H, W, heads, d)`` after the heads were merged whole):
  that axis carries the channels and nothing is coupled.
- Otherwise one axis is chosen to carry the channels and every position of a slab across the
  other axes is coupled to it (group-structure edges): whole heads when the view feeds an
  attention contraction (``(B, C, H, W) -> (B, 3, heads, d, H * W)``: the heads axis, a head of
  q, k and v together); the axis that the next channel-wise op reads as its channel dim when
  one is in sight (``Linear -> view(B, 256, 4, 4) -> Conv2d``: channel ``c`` owns features
  ``[16c, 16c + 16)``, the inverse of flatten's stride map); else the innermost factor, so the
  leading factors are groups of whole copies (ResNeSt's radix split ``(B, radix * C) ->
  (B, radix, C)``: each slice loses the same channels, like ``chunk`` + add).

``layout_rules.reshape`` tries the narrower rules first: ``attention_rules.split_heads`` (the dims
around the channel dim unchanged) and ``shuffle.split_channel_dim`` (two factors: the inner one
carries the channels); this module takes every other layout.

Every choice is exact: removing a unit removes whole slabs of the output grid and the same
channels of the input, so both keep their row-major order and the pruned view maps kept
elements to kept positions. The other factors of the block keep their traced sizes (the
rewrite writes them as literals, ``fxprune.rewrite.literals.view_dims``); the channel entry
becomes the kept width.

Example:
    >>> import torch, fxprune
    >>> class Unflatten(torch.nn.Module):   # Torch-Pruning's test_reshape
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc, self.conv = torch.nn.Linear(8, 64), torch.nn.Conv2d(16, 4, 1)
    ...     def forward(self, x):
    ...         return self.conv(self.fc(x).view(1, 16, 2, 2))
    >>> p = fxprune.plan(Unflatten(), fxprune.Policy(ratio=0.5), (torch.randn(1, 8),))
    >>> [(g.size, g.kept) for g in p.groups if g.removed]   # 16 blocks of 4 features
    [(16, 8)]
    >>> fxprune.apply(p).fc.out_features
    32
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .attention_rules import _feeds_contraction
from .rules import arg, describe, norm_dim, permute_dims
from .state import Analysis, ChannelInfo
from .units import long_tensor

# Ops that read a fixed dim of their input as its channel dim: (module types, functions) -> dim
_CHANNEL_FIRST_MODULES = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                          nn.modules.instancenorm._InstanceNorm, nn.PReLU)
_CHANNEL_LAST_MODULES = (nn.Linear, nn.LayerNorm, nn.RMSNorm)
_CHANNEL_FIRST_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                            F.conv_transpose3d, F.batch_norm, F.group_norm, F.instance_norm, F.prelu}
_CHANNEL_LAST_FUNCTIONS = {F.linear, F.layer_norm, F.rms_norm}
# Ops that work along one dim given as argument 1 / ``dim``: that dim is not a channel dim there
_ALONG_DIM = {"softmax", "log_softmax", "sum", "mean", "amax", "amin", "cumsum"}
_REDUCTIONS = {"sum", "mean", "amax", "amin"}
_LOOKAHEAD = 6


def channel_block(in_shape: tuple, out_shape: tuple, cd: int) -> tuple[int, int, int, int] | None:
    """``(a, b, a2, b2)``: the smallest run of input dims ``in[a:b]`` around ``cd`` whose elements
    are the output dims ``out[a2:b2]`` (size-1 dims at the ends of the output run left out).

    Example:
        >>> channel_block((1, 1152, 7, 7), (1, 3, 3, 128, 49), 1)   # a split of the channel dim
        (1, 2, 1, 4)
        >>> channel_block((1, 3, 128, 49), (1, 384, 7, 7), 1)       # a merge, the rest re-laid
        (1, 3, 1, 2)
    """
    if math.prod(in_shape) != math.prod(out_shape) or in_shape[cd] < 2:
        return None
    in_cum = [math.prod(in_shape[:i]) for i in range(len(in_shape) + 1)]
    out_cum = [math.prod(out_shape[:j]) for j in range(len(out_shape) + 1)]
    seen = set(out_cum)
    a = max(i for i in range(cd + 1) if in_cum[i] in seen)
    b = min(i for i in range(cd + 1, len(in_shape) + 1) if in_cum[i] in seen)
    a2 = max(j for j, c in enumerate(out_cum) if c == in_cum[a])
    b2 = min(j for j, c in enumerate(out_cum) if c == in_cum[b])
    return a, b, a2, b2


def _grid(in_block: tuple, ca: int, out_block: tuple) -> torch.Tensor:
    """Index of the input channel behind each position of the output block."""
    size = [1] * len(in_block)
    size[ca] = in_block[ca]
    return torch.arange(in_block[ca]).view(size).expand(in_block).reshape(out_block)


def _natural(roots: torch.Tensor, axes: list[int]) -> list[int]:
    """Axes of the grid along which alone the roots change."""
    out = []
    for t in axes:
        r = roots.movedim(t, 0).reshape(roots.shape[t], -1)
        if bool((r == r[:, :1]).all()):
            out.append(t)
    return out


def _dims_of(an: Analysis, user: fx.Node, nd: int) -> list[int] | None:
    """How ``user`` moves the dims of its first input: the input dim behind each output dim, for
    ops that keep every element where it is or move whole dims (None: any other op)."""
    from . import lookup, rules as R
    rule = lookup.rule_for(an, user)
    rule = getattr(rule, "func", rule)  # functools.partial rows
    if rule is R.passthrough or lookup.is_elementwise(rule):  # a broadcast adding leading dims: not followed
        out = an.shape(user)
        return list(range(nd)) if isinstance(out, tuple) and len(out) == nd else None
    if rule is lookup.layout_rule("permute"):
        dims = permute_dims(user)
        return [norm_dim(d, nd) for d in dims] if all(isinstance(d, int) for d in dims) else None
    if rule is lookup.layout_rule("transpose"):
        d0, d1 = arg(user, 1, "dim0"), arg(user, 2, "dim1")
        if not isinstance(d0, int) or not isinstance(d1, int):
            return None
        dims = list(range(nd))
        d0, d1 = norm_dim(d0, nd), norm_dim(d1, nd)
        dims[d0], dims[d1] = dims[d1], dims[d0]
        return dims
    return None


def _consumer_dims(an: Analysis, node: fx.Node, nd: int) -> tuple[set[int], set[int]]:
    """(dims of ``node``'s output that a later op reads as its channel dim, dims that a later op
    works along), following elementwise and layout ops for a few steps."""
    want: set[int] = set()
    avoid: set[int] = set()
    todo = [(node, list(range(nd)), 0)]  # (value, the dim of node's output behind each of its dims)
    while todo:
        value, origin, depth = todo.pop()
        for user in value.users:
            if not user.args or user.args[0] is not value:
                continue
            m = an.modules.get(user.target) if user.op == "call_module" else None
            if isinstance(m, _CHANNEL_FIRST_MODULES) or user.target in _CHANNEL_FIRST_FUNCTIONS:
                want.add(origin[1])
                continue
            if isinstance(m, _CHANNEL_LAST_MODULES) or user.target in _CHANNEL_LAST_FUNCTIONS:
                want.add(origin[-1])
                continue
            name = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", "")
            if name in _ALONG_DIM:
                dims = arg(user, 1, "dim")
                dims = [norm_dim(d, len(origin)) for d in (dims if isinstance(dims, (list, tuple)) else [dims])
                        if isinstance(d, int)]
                avoid.update(origin[d] for d in dims)
                if dims and depth < _LOOKAHEAD:  # the reduced dims go, unless kept
                    kept = name not in _REDUCTIONS or bool(arg(user, 2, "keepdim", False))
                    todo.append((user, [o for d, o in enumerate(origin) if kept or d not in dims], depth + 1))
                continue
            moved = _dims_of(an, user, len(origin)) if depth < _LOOKAHEAD else None
            if moved is not None:
                todo.append((user, [origin[d] for d in moved], depth + 1))
    return want, avoid


def _choose(an: Analysis, node: fx.Node, a2: int, out_block: tuple, natural: list[int]) -> tuple[int, str]:
    """The axis of the output block that carries the channels, and why (no reason: a natural
    axis, nothing to couple)."""
    axes = [t for t, s in enumerate(out_block) if s > 1]
    if _feeds_contraction(node) and len(out_block) >= 2 and out_block[-2] > 1:  # (..., heads, head_dim)
        return len(out_block) - 2, "whole heads go together"
    # a single head: its head_dim carries the channels as the stream's own (pvt_v2's reused C)
    want, avoid = _consumer_dims(an, node, len(an.shape(node)))
    wanted = [t for t in axes if a2 + t in want]
    if natural:
        pick = [t for t in natural if t in wanted] or natural
        return max(pick, key=lambda t: an.shape(node)[a2 + t]), ""
    if len(wanted) == 1:
        return wanted[0], f"the next channel-wise op reads dim {a2 + wanted[0]}"
    free = [t for t in axes if a2 + t not in avoid] or axes
    return free[-1], "the leading factors are whole copies"


def regrid(an: Analysis, node: fx.Node, v: ChannelInfo, in_shape: tuple, out_shape: tuple) -> Any:
    """The output of a view/reshape that re-lays out the channel dim (see the module docstring),
    or None when the channel dim is not inside one block of the reshape."""
    cd = v.dim
    block = channel_block(tuple(in_shape), tuple(out_shape), cd)
    if block is None:
        return None
    a, b, a2, b2 = block
    out_block = tuple(out_shape[a2:b2])
    grid = _grid(tuple(in_shape[a:b]), cd - a, out_block)
    ids = long_tensor(v.units)[grid]
    axes = [t for t, s in enumerate(out_block) if s > 1]
    if len(axes) == 1:  # a merge or a plain move: the stride map
        t = axes[0]
        return ChannelInfo(a2 + t, tuple(ids.movedim(t, 0).reshape(out_block[t], -1)[:, 0].tolist()))
    roots = an.units.root_tensor()[ids]
    t, how = _choose(an, node, a2, out_block, _natural(roots, axes))
    slabs = ids.movedim(t, 0).reshape(out_block[t], -1)
    reps = tuple(slabs[:, 0].tolist())
    if how:
        why = (f"{describe(node)} lays the channel dim {in_shape} -> {out_shape} out as {out_block}: "
               f"axis {t} carries the channels ({how})")
        kind = "heads" if how.startswith("whole heads") else "group-structure"
        an.units.union(slabs.reshape(-1).tolist(), slabs[:, :1].expand_as(slabs).reshape(-1).tolist(), kind, why)
    fixed = {a2 + s: out_block[s] for s in range(len(out_block)) if s != t}
    an.rewrite_literal(node, "view_dims", (reps, fixed))
    return ChannelInfo(a2 + t, reps)


def unsplittable(in_shape: tuple, out_shape: tuple, cd: int) -> str:
    """Why ``regrid`` cannot follow the channel dim ``cd`` of ``in_shape`` through a reshape.

    Example:
        >>> unsplittable((1, 1, 256), (1, 256, 1, 1), 1)
        'the channel dim has a single channel, laid out anywhere among size-1 dims'
    """
    if not all(isinstance(s, int) for s in (*in_shape, *out_shape)) or math.prod(in_shape) != math.prod(out_shape):
        return "the shapes are not static or hold different numbers of elements"
    if in_shape[cd] < 2:
        return "the channel dim has a single channel, laid out anywhere among size-1 dims"
    return "the channel dim is not inside one block of dims that the reshape keeps together"
