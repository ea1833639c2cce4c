"""Slicing of the channel dim: ``x[:, a:b]``, ``x[..., :c]``, ``x[:, ::2]``, ``x[:, 3]``, ``narrow``.

A slice of the channel dim is an offset map, like ``split``: the output's channels are the
units ``units[a:b]`` of the input's. The rewrite recomputes the bounds from the kept channels
(new start = kept input channels before ``a``, new stop = kept before ``b``), so the pruned
slice picks exactly the kept channels of the original slice. A stepped slice picks the kept
positions of ``units[a:b:s]`` by a list index. An integer index reads one channel alone: that
channel is pinned (the rest of its group stays prunable) and the index follows it.

Example:
    >>> import torch, fxprune
    >>> class Dual(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(3, 3, 1)
    ...     def forward(self, x):
    ...         y = self.a(x)
    ...         return y[:, :3] + self.b(x), y[:, 3:]
    >>> pruned = fxprune.transform(Dual(), fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 4, 4),))
    >>> fxprune.verify(pruned).ok
    True
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from .rules import arg, describe, ndim, norm_dim, opaque
from .state import Analysis, ChannelInfo


_RUN_TIME = object()  # a bound known only at run time


def _bound(value: Any, n: int) -> int | None:
    """A literal slice bound clipped into ``0..n`` as Python slicing does (None: not literal)."""
    if value is None or not isinstance(value, int) or isinstance(value, bool):
        return None
    return min(max(value + n if value < 0 else value, 0), n)


def slice_bounds(start: Any, stop: Any, n: int, out_size: int) -> tuple[int, int] | None:
    """Effective ``(start, stop)`` of a step-1 slice of a dim of size ``n`` whose result has
    ``out_size`` positions; a bound computed at run time (an ``fx.Node``) is read off the
    recorded output size when the other bound is known. None: not determined.

    Example:
        >>> slice_bounds(None, -2, 10, 8), slice_bounds(3, object(), 10, 4)
        ((0, 8), (3, 7))
    """
    lo = 0 if start is None else _bound(start, n)
    hi = n if stop is None else _bound(stop, n)
    if lo is not None and hi is not None:
        hi = max(hi, lo)
        return (lo, hi) if hi - lo == out_size else None
    if lo is not None:
        hi = lo + out_size
    elif hi is not None:
        lo = hi - out_size
    elif out_size == n:
        lo, hi = 0, n
    else:
        return None
    return (lo, hi) if 0 <= lo <= hi <= n else None


def channel_entry(an: Analysis, node: fx.Node, v: ChannelInfo, entry: Any, out_dim: int, pos: int | None) -> Any:
    """The value of ``getitem`` whose index ``entry`` (at position ``pos`` of the index tuple,
    None: the whole index) falls on the channel dim of ``v``; ``out_dim``: where that dim lands."""
    n = len(v.units)
    out_shape = an.shape(node)
    if isinstance(entry, int) and not isinstance(entry, bool):
        return select_channel(an, node, v, entry, pos)
    if not isinstance(entry, slice) or not isinstance(out_shape, tuple) or out_dim >= len(out_shape):
        return opaque(an, node, f"{describe(node)} indexes the channel dim with {entry!r}")
    step = 1 if entry.step is None else entry.step
    if not isinstance(step, int) or step < 1:
        return opaque(an, node, f"{describe(node)} slices the channel dim with step {step!r}, "
                                "which is not a literal positive int")
    if step != 1:
        if not all(b is None or (isinstance(b, int) and not isinstance(b, bool)) for b in (entry.start, entry.stop)):
            return opaque(an, node, f"{describe(node)} slices the channel dim with step {step} and bounds "
                                    "computed at run time")
        index = node.args[1] if isinstance(node.args[1], tuple) else ()
        if any(isinstance(e, int) and not isinstance(e, bool) for e in index):
            return opaque(an, node, f"{describe(node)} slices the channel dim with step {step} beside an integer "
                                    "index: the kept positions need a list index, which would move the dim")
        picked = tuple(range(*slice(entry.start, entry.stop, step).indices(n)))
        an.rewrite_literal(node, "channel_index", (pos, ("pick", v.units, picked)))
        return ChannelInfo(out_dim, tuple(v.units[p] for p in picked))
    bounds = slice_bounds(entry.start, entry.stop, n, out_shape[out_dim])
    if bounds is None:
        return opaque(an, node, f"{describe(node)} slices the channel dim with bounds computed at run "
                                f"time ({entry.start!r}:{entry.stop!r}) that its output size does not determine")
    lo, hi = bounds
    if (lo, hi) == (0, n) and all(b is None or isinstance(b, int) for b in (entry.start, entry.stop)):
        return ChannelInfo(out_dim, v.units)  # literal bounds that cover the dim cover its kept part
    an.rewrite_literal(node, "channel_index", (pos, ("slice", v.units[:lo], v.units[:hi], hi == n)))
    return ChannelInfo(out_dim, v.units[lo:hi])


def select_channel(an: Analysis, node: fx.Node, v: ChannelInfo, index: int, pos: int | None) -> Any:
    """``x[:, i]`` reads channel ``i`` alone (the channel dim disappears): that channel is pinned,
    the others of its group stay prunable, and the rewrite moves ``i`` to its kept position.

    Example:
        >>> import torch, fxprune
        >>> class Gate(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = torch.nn.Conv2d(3, 6, 1), torch.nn.Conv2d(6, 2, 1)
        ...     def forward(self, x):
        ...         y = self.a(x)
        ...         return self.b(y) * y[:, 4:5] + y[:, 3].unsqueeze(1)
        >>> plan = fxprune.plan(Gate(), fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 4, 4),))
        >>> sorted(plan.groups[0].pinned)
        [3]
    """
    n = len(v.units)
    i = index + n if index < 0 else index
    if not 0 <= i < n:
        return opaque(an, node, f"{describe(node)} indexes channel {index} of {n}")
    reason = f"{describe(node)} reads channel {i} alone (an integer index on the channel dim)"
    an.units.pin(v.units[i:i + 1], reason)
    an.rewrite_literal(node, "channel_index", (pos, ("int", v.units[:i])))
    return an.fresh(node, an.shape(node), "opaque", f"{describe(node)}: the output of an integer index "
                                                    "on the channel dim has no channel dim")


def narrow(an: Analysis, node: fx.Node) -> Any:
    """``torch.narrow(x, dim, start, length)`` / ``x.narrow(...)``: a slice of one dim; on the
    channel dim an offset map whose ``start`` and ``length`` the rewrite recomputes.

    Example:
        >>> import torch, fxprune
        >>> class Cut(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(4, 2, 1)
        ...     def forward(self, x):
        ...         return self.b(self.a(x).narrow(1, 4, 4))
        >>> pruned = fxprune.transform(Cut(), fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 4, 4),))
        >>> (start, length), = [n.args[2:] for n in pruned.graph.nodes if n.target == "narrow"]
        >>> length == pruned.b.in_channels and start + length == pruned.a.out_channels
        True
    """
    x = arg(node, 0, "input")
    v, nd = an.tensor_info(x), ndim(an, x)
    d, start, length = arg(node, 1, "dim"), arg(node, 2, "start"), arg(node, 3, "length")
    out_shape = an.shape(node)
    if v is None or nd is None or not isinstance(d, int) or not isinstance(out_shape, tuple):
        return opaque(an, node)
    if norm_dim(d, nd) != v.dim:
        return ChannelInfo(v.dim, v.units)
    n = len(v.units)
    if isinstance(start, int) and start < 0:
        start += n
    stop = start + length if isinstance(start, int) and isinstance(length, int) else _RUN_TIME
    bounds = slice_bounds(start, stop, n, out_shape[v.dim]) if isinstance(start, int) else None
    if bounds is None:
        return opaque(an, node, f"{describe(node)} narrows the channel dim from a start computed at run time")
    lo, hi = bounds
    an.rewrite_literal(node, "narrow", (v.units[:lo], v.units[:hi]))
    return ChannelInfo(v.dim, v.units[lo:hi])
