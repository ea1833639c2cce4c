"""Channel semantics of ``repeat_interleave``: each entry along one dim repeated in place.

- Along a dim other than the channel dim the channels pass through unchanged (any ``repeats``,
  a tensor too: the channel dim keeps its size and order).
- Along the channel dim with a literal int ``repeats`` ``r``, output position ``j`` comes from
  input channel ``j // r``: the output's channel dim lists every input unit ``r`` times in a row
  (the stride map of ``F.unfold``'s columns). Removing a channel removes its ``r`` copies, so the
  pruned op, which repeats the kept channels with the same ``r``, is exact; an ``output_size``
  argument (``r * width``) is rewritten to ``r`` times the kept width.
- Along the channel dim with a tensor ``repeats`` (a count per channel, read at run time), an int
  computed at run time (it may follow a pruned width), or without ``dim`` (the input is
  flattened first, mixing the channel dim with the others): blocked, with the reason.

The module also holds ``permute`` of a parameter table (a position embedding ``(1, L, C)``
permuted to ``(1, C, L)`` so ``F.interpolate`` resamples ``L``, as timm's NaFlexViT does): the
table's channel dim is the one that the ops after it keep as their channel dim.

Example:
    >>> import torch, fxprune
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(8, 2, 1)
    ...     def forward(self, x):
    ...         return self.b(self.a(x).repeat_interleave(2, dim=1))
    >>> pruned = fxprune.transform(Net(), fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 4, 4),))
    >>> pruned.a.out_channels, pruned.b.in_channels, fxprune.verify(pruned).ok
    (2, 4, True)
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from . import layout_rules as L
from . import lookup
from . import table_rules as TB
from .regrid import _consumer_dims
from .rules import arg, describe, ndim, norm_dim, opaque, permute_dims
from .state import Analysis, ChannelInfo, ParamRef
from .tensor_rules import param_channels
from ..shapes import is_tensor_shape

_OUTPUT_SIZE_POS = 3  # (input, repeats, dim, output_size): keyword-only, at 3 where given by position


def _channel_repeats(an: Analysis, node: fx.Node, repeats: Any) -> int | str:
    """The literal int ``repeats`` along the channel dim, or why there is none."""
    if isinstance(repeats, fx.Node):
        if is_tensor_shape(an.shape(repeats)):
            return (f"repeats is a tensor (node {repeats.name!r}): each channel's count is read at "
                    "run time, so which output positions a channel owns is not known")
        return (f"repeats is computed at run time (node {repeats.name!r}): its value may follow a "
                "pruned width")
    if isinstance(repeats, bool) or not isinstance(repeats, int):
        return f"repeats {repeats!r} is not a literal int"
    return repeats


def repeat_interleave(an: Analysis, node: fx.Node) -> Any:
    """``x.repeat_interleave(repeats, dim)`` / ``torch.repeat_interleave(x, repeats, dim,
    output_size=None)`` (see the module docstring).

    Example:
        >>> import torch
        >>> from fxprune.coupling.ops import FUNCTION_RULES, METHOD_RULES
        >>> FUNCTION_RULES[torch.repeat_interleave] is METHOD_RULES["repeat_interleave"] is repeat_interleave
        True
    """
    x = arg(node, 0, "input")
    v, in_shape, out_shape = an.tensor_info(x), an.shape(x), an.shape(node)
    if len(node.args) < 2 and "repeats" not in node.kwargs:
        return opaque(an, node, f"{describe(node)} with one argument returns indices, not channel values")
    repeats, dim = arg(node, 1, "repeats"), arg(node, 2, "dim")
    p = an.value(x)
    if isinstance(p, ParamRef):  # a per-channel vector spread over blocks of r (a table used as data)
        shape = tuple(an.param_tensor(p.target).shape)
        r = _channel_repeats(an, node, repeats)
        if len(shape) != 1 or dim not in (None, 0, -1) or isinstance(r, str):
            return opaque(an, node, f"{describe(node)} repeats parameter {p.target!r} of shape {shape}: only a "
                                    "1-D parameter with a literal int count is a table of its own channels")
        units = param_channels(an, p.target, 0, describe(node))
        return ChannelInfo(0, tuple(u for u in units for _ in range(r)))
    if v is None or not is_tensor_shape(in_shape) or not is_tensor_shape(out_shape):
        return opaque(an, node)
    nd = ndim(an, x)
    if dim is None and nd == 1:
        dim = 0  # flattening a 1-D input changes nothing
    if dim is None:
        return opaque(an, node, f"{describe(node)} has no dim: it flattens the input first, mixing the "
                                f"channel dim {v.dim} with the others")
    if not isinstance(dim, int):
        return opaque(an, node, f"{describe(node)}: its dim {dim!r} is not a literal int")
    d = norm_dim(dim, nd)
    if d != v.dim:
        if len(out_shape) != nd or out_shape[v.dim] != len(v.units):
            return opaque(an, node)
        return ChannelInfo(v.dim, v.units)
    r = _channel_repeats(an, node, repeats)
    if isinstance(r, str):
        return opaque(an, node, f"{describe(node)} repeats along the channel dim {d}, but {r}")
    if len(out_shape) != nd or out_shape[d] != r * len(v.units):
        return opaque(an, node)
    units = tuple(u for u in v.units for _ in range(r))
    if arg(node, _OUTPUT_SIZE_POS, "output_size") is not None:
        an.rewrite_literal(node, "count", (_OUTPUT_SIZE_POS, "output_size", units))
    return ChannelInfo(d, units)


# -- a parameter table permuted ------------------------------------------------------------
_LOOKAHEAD = 4


def _reads_dim_one(an: Analysis, node: fx.Node, depth: int = _LOOKAHEAD) -> bool:
    """Whether a resize (``F.interpolate``: it keeps dims 0 and 1 and resamples the rest) reads
    ``node``'s output, directly or through elementwise ops (``.to``, ``.float()``)."""
    for user in node.users:
        rule = lookup.rule_for(an, user)
        rule = getattr(rule, "func", rule)
        if rule is TB.resize and user.args and user.args[0] is node:
            return True
        if depth and lookup.is_elementwise(rule) and _reads_dim_one(an, user, depth - 1):
            return True
    return False


def permute(an: Analysis, node: fx.Node) -> Any:
    """``permute``: a tensor's channel dim moves with the permutation (``layout_rules.permute``).
    A parameter permuted is a table used as data: its channel dim is the output dim that the
    ops after it read as their channel dim (a resize's dim 1, a conv's dim 1, a linear's last
    dim), a passenger of the channels it is later added to; where no later op shows one, it
    blocks with the reason.

    Example:
        >>> import torch, fxprune
        >>> class Pos(torch.nn.Module):   # timm NaFlexViT's factorized position table, resampled
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = torch.nn.Linear(3, 6), torch.nn.Linear(6, 2)
        ...         self.pos = torch.nn.Parameter(torch.randn(1, 4, 6))
        ...     def forward(self, x):
        ...         t = torch.nn.functional.interpolate(self.pos.permute(0, 2, 1), size=8, mode="linear")
        ...         return self.b(self.a(x) + t.permute(0, 2, 1))
        >>> pruned = fxprune.transform(Pos(), fxprune.Policy(ratio=0.5), (torch.randn(1, 8, 3),))
        >>> tuple(pruned.pos.shape), fxprune.verify(pruned).ok
        ((1, 4, 3), True)
    """
    x = arg(node, 0, "input")
    p = an.value(x)
    if not isinstance(p, ParamRef):
        return L.permute(an, node)
    shape = tuple(an.param_tensor(p.target).shape)
    dims = permute_dims(node)
    if not dims or not all(isinstance(d, int) for d in dims) or len(dims) != len(shape):
        return opaque(an, node, f"{describe(node)}: its dims are not literal ints")
    dims = [norm_dim(d, len(shape)) for d in dims]
    want, _ = _consumer_dims(an, node, len(shape))
    if len(shape) >= 3 and _reads_dim_one(an, node):
        want.add(1)
    wide = [d for d in want if shape[dims[d]] > 1]
    if len(wide) != 1:
        return opaque(an, node, f"{describe(node)} permutes parameter {p.target!r} of shape {shape}: "
                                "no later op shows which of its dims carries channels")
    d = wide[0]
    return ChannelInfo(d, param_channels(an, p.target, dims[d], describe(node)))
