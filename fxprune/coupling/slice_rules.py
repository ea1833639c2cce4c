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

import torch
import torch.fx as fx

from .rules import arg, describe, elementwise, ndim, norm_dim, opaque
from .state import Analysis, ChannelInfo


_RUN_TIME = object()  # a bound known only at run time


def _bound(value: Any, n: int) -> int | None:
    """A literal slice bound clipped into ``0..n`` as Python slicing does (None: not literal)."""
    if value is None or not isinstance(value, int) or isinstance(value, bool):
        return None
    return min(max(value + n if value < 0 else value, 0), n)


def expand_ellipsis(entries: list, nd: int, fill: Any = slice(None), key: Any = None) -> list:
    """``entries`` of an index into ``nd`` dims with its ``...`` replaced by as many ``fill`` as it
    stands for (``None`` entries add dims and count for none); ``key`` reads an entry's index
    value when entries carry more (e.g. ``(position, entry)`` pairs).

    Example:
        >>> expand_ellipsis([Ellipsis, slice(0, 2)], 4)
        [slice(None, None, None), slice(None, None, None), slice(None, None, None), slice(0, 2, None)]
    """
    plain = entries if key is None else [key(e) for e in entries]
    if Ellipsis not in plain:
        return entries
    i = plain.index(Ellipsis)
    return entries[:i] + [fill] * (nd - (len(plain) - 1 - plain.count(None))) + entries[i + 1:]


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


# -- writes into a slice, padding and list indices of the channel dim ------------------------
def copy_into(an: Analysis, node: fx.Node) -> Any:
    """``dst.copy_(src)``: how ``x[:, :c] = f(x[:, :c])`` (FasterNet's partial conv) reaches fxprune
    through torch.export: ``dst`` is the slice ``x[:, :c]``, a view whose channels are the units
    ``units[:c]`` of ``x`` (the slice rule's offset map), and ``src`` is coupled to them as an
    elementwise op couples its operands; the other channels of ``x`` pass through. The slice's
    bound follows the kept count (the ``channel_index`` rewriter), so the pruned write covers the
    kept channels of the original one.

    Example:
        >>> import torch, fxprune
        >>> class PConv(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.p, self.b = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(2, 2, 3, padding=1), torch.nn.Conv2d(8, 4, 1)
        ...     def forward(self, x):
        ...         y = self.a(x).clone()
        ...         y[:, :2] = self.p(y[:, :2])
        ...         return self.b(y)
        >>> plan = fxprune.plan(PConv(), fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 8, 8),), capture="export")
        >>> fxprune.verify(fxprune.apply(plan)).ok
        True
    """
    dst = arg(node, 0, "self")
    if an.tensor_info(dst) is None:
        return opaque(an, node, f"{describe(node)} writes into a tensor whose channels fxprune does not track")
    return elementwise(an, node)


def slice_scatter(an: Analysis, node: fx.Node) -> Any:
    """``torch.slice_scatter(x, src, dim, start, end)`` (the functional form of ``x[:, a:b] = src``):
    on the channel dim ``src`` takes the units ``units[a:b]`` of ``x`` (offset map, bounds
    recomputed from the kept channels); on another dim ``src`` carries all of ``x``'s channels.

    Example:
        >>> import torch, fxprune
        >>> class Write(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.p, self.b = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(8, 2, 1)
        ...     def forward(self, x):
        ...         return self.b(torch.slice_scatter(self.a(x), self.p(x), 1, 2, 6))
        >>> pruned = fxprune.transform(Write(), fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 4, 4),))
        >>> fxprune.verify(pruned).ok
        True
    """
    x, src = arg(node, 0, "input"), arg(node, 1, "src")
    v, s, nd = an.tensor_info(x), an.tensor_info(src), ndim(an, x)
    d, start, end, step = arg(node, 2, "dim", 0), arg(node, 3, "start"), arg(node, 4, "end"), arg(node, 5, "step", 1)
    if v is None or nd is None or not isinstance(d, int) or ndim(an, src) != nd:
        return opaque(an, node)
    why = f"{describe(node)} writes its source into the channels"
    if norm_dim(d, nd) != v.dim:
        if s is None or s.dim != v.dim or len(s.units) != len(v.units):
            return opaque(an, node, f"{describe(node)}: the source carries no channels on the input's channel dim")
        an.units.union(v.units, s.units, "identity", why)
        return ChannelInfo(v.dim, v.units)
    n = len(v.units)
    end = None if isinstance(end, int) and end >= 2 ** 62 else end  # ATen spells "to the end" 2**63 - 1
    width = an.shape(src)[v.dim]
    bounds = slice_bounds(start, end, n, width) if step in (None, 1) else None
    if s is None or s.dim != v.dim or bounds is None:
        return opaque(an, node, f"{describe(node)} scatters into the channel dim with a step, bounds computed "
                                "at run time or a source without tracked channels")
    lo, hi = bounds
    an.units.union(v.units[lo:hi], s.units, "offset", why)
    an.rewrite_literal(node, "scatter_bounds", (v.units[:lo], v.units[:hi], hi == n))
    return ChannelInfo(v.dim, v.units)


def pad(an: Analysis, node: fx.Node, fallback: Any) -> Any:
    """``F.pad(x, (..., before, after), mode="constant")`` on the channel dim: the output's
    channels are ``before`` new constant channels, the input's, then ``after`` more (an offset
    map); the new ones are pinned (no weight makes them) and the pad amounts stay as they are.
    EfficientViT's linear attention pads ``v`` with a column of ones this way and slices it off
    again with ``out[..., :-1]`` / ``out[..., -1:]``. Other modes copy channels into the padding
    (they block); padding off the channel dim goes to ``fallback``.

    Example:
        >>> import torch, fxprune
        >>> class Ones(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = torch.nn.Linear(3, 6), torch.nn.Linear(6, 2)
        ...     def forward(self, x):
        ...         y = torch.nn.functional.pad(self.a(x), (0, 1), value=1.0)
        ...         return self.b(y[..., :-1] / y[..., -1:])
        >>> pruned = fxprune.transform(Ones(), fxprune.Policy(ratio=0.5), (torch.randn(2, 3),))
        >>> pruned.a.out_features, fxprune.verify(pruned).ok
        (3, True)
    """
    x, amounts = arg(node, 0, "input"), arg(node, 1, "pad")
    v, nd = an.tensor_info(x), ndim(an, x)
    if v is None or nd is None or not isinstance(amounts, (list, tuple)) or not nd - 1 - v.dim < len(amounts) // 2:
        return fallback(an, node)
    i = nd - 1 - v.dim
    before, after = amounts[2 * i], amounts[2 * i + 1]
    if not all(isinstance(a, int) and not isinstance(a, bool) for a in (before, after)) or (before, after) == (0, 0):
        return fallback(an, node)
    mode = arg(node, 2, "mode", "constant")
    if mode != "constant" or before < 0 or after < 0:
        return opaque(an, node, f"{describe(node)} pads the channel dim with mode {mode!r} and amounts "
                                f"{(before, after)}: only constant padding adds channels of its own")
    rest = amounts[:2 * i] + amounts[2 * i + 2:]
    if any(not isinstance(a, int) for a in rest):
        return fallback(an, node)
    new = an.units.new_atom(("pad", node.name, v.dim), before + after, "opaque")
    an.units.pin(new, f"{describe(node)} adds {before + after} constant channel(s) on the channel dim")
    return ChannelInfo(v.dim, new[:before] + v.units + new[before:])


def _index_values(an: Analysis, entry: Any) -> tuple[int, ...] | None:
    """The integer positions of a list index, or of a 1-D integer buffer used as one (how a
    literal list reaches an exported graph); None for anything else (bool masks included)."""
    if isinstance(entry, (list, tuple)) and entry and all(isinstance(e, int) and not isinstance(e, bool) for e in entry):
        return tuple(entry)
    while isinstance(entry, fx.Node) and entry.op == "call_method" and entry.target in ("clone", "contiguous"):
        entry = entry.args[0]  # torch.export lifts a literal list to a constant and clones it
    if isinstance(entry, fx.Node) and entry.op == "get_attr":
        try:
            t = an.param_tensor(entry.target)
        except AttributeError:
            return None
        if t.dim() == 1 and len(t) and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool:
            return tuple(int(i) for i in t.tolist())
    return None


def list_index(an: Analysis, node: fx.Node) -> Any:
    """``x[:, :, [0, 1, 8, ...]]``: one list index (or 1-D integer buffer) among basic entries.
    On the channel dim it is a gather map: output channel ``j`` is unit ``units[p_j]``; the
    rewrite writes the kept positions as a list (a slice when they are evenly spaced). On
    another dim the channels pass through. Returns NotImplemented when the index is not of
    this form (several advanced indices, a mask, a tensor computed at run time).

    Example:
        >>> import torch, fxprune
        >>> class Perm(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = torch.nn.Conv2d(3, 6, 1), torch.nn.Conv2d(4, 2, 1)
        ...     def forward(self, x):
        ...         return self.b(self.a(x)[:, [5, 0, 3, 1]])
        >>> pruned = fxprune.transform(Perm(), fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 4, 4),))
        >>> fxprune.verify(pruned).ok
        True
    """
    src, idx = node.args[0], node.args[1]
    v, nd, out_shape = an.tensor_info(src), ndim(an, src), an.shape(node)
    packed = isinstance(idx, tuple)
    entries = list(idx) if packed else [idx]
    if v is None or nd is None or not isinstance(out_shape, tuple):
        return NotImplemented
    if not packed and not isinstance(idx, list) and not isinstance(idx, fx.Node):
        return NotImplemented
    picks = [(p, _index_values(an, e)) for p, e in enumerate(entries)
             if not (e is None or e is Ellipsis or isinstance(e, slice))]
    if len(picks) != 1 or picks[0][1] is None or entries.count(Ellipsis) > 1:
        return NotImplemented
    if any(isinstance(e, slice) and any(isinstance(b, fx.Node) for b in (e.start, e.stop, e.step)) for e in entries):
        return NotImplemented
    pos, values = picks[0]
    entries = expand_ellipsis(entries, nd)
    at = next(k for k, e in enumerate(entries) if not (e is None or isinstance(e, slice)))
    in_dim = sum(1 for e in entries[:at] if e is not None)
    if in_dim >= nd:
        return NotImplemented
    n = an.shape(src)[in_dim]
    if any(not -n <= p < n for p in values):
        return NotImplemented
    if in_dim != v.dim:
        on_channels = _entry_at(entries, v.dim)
        if on_channels not in (None, slice(None)):
            return NotImplemented  # a channel slice beside a list index: the layout rule blocks it
        out_v = _out_dim(entries, v.dim)
        return ChannelInfo(out_v, v.units) if out_v < len(out_shape) and out_shape[out_v] == len(v.units) else NotImplemented
    out_dim = _out_dim(entries, in_dim)
    picked = tuple(p + n if p < 0 else p for p in values)
    if out_dim >= len(out_shape) or out_shape[out_dim] != len(picked):
        return NotImplemented
    an.rewrite_literal(node, "channel_index", (pos if packed else None, ("pick", v.units, picked)))
    return ChannelInfo(out_dim, tuple(v.units[p] for p in picked))


def _entry_at(entries: list, d: int) -> Any:
    """The index entry that falls on input dim ``d`` (None: an implicit ``:`` after the last)."""
    seen = 0
    for e in entries:
        if e is None:
            continue
        if seen == d:
            return e
        seen += 1
    return None


def _out_dim(entries: list, d: int) -> int:
    """Where input dim ``d`` lands: basic entries and one 1-D list index keep their dims in
    place; each ``None`` before ``d`` adds a dim."""
    seen = nones = 0
    for e in entries:
        if e is None:
            nones += 1
            continue
        if seen == d:
            return d + nones
        seen += 1
    return d + nones
