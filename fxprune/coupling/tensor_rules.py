"""Channel semantics of generic tensor ops that transformers use: broadcasting views (expand,
unsqueeze, squeeze, movedim), padding and rolling along non-channel dims, parameter tables
gathered by index, and constant tensors whose size meets channels (``creation``). Contractions
(einsum, matmul) are in ``contraction_rules``.

Example:
    >>> import torch, fxprune
    >>> class Spread(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
    ...     def forward(self, x):                       # the channels pass through the broadcast
    ...         return self.b(self.a(x).unsqueeze(1).expand(-1, 5, -1).mean(1))
    >>> p = fxprune.plan(Spread(), fxprune.Policy(ratio=0.5), (torch.randn(2, 3),))
    >>> [(g.size, g.kept) for g in p.groups if g.removed]
    [(4, 2)]
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import lookup
from .rules import arg, describe, ndim, norm_dim, opaque
from .state import Analysis, ChannelInfo, ParamRef
from ..shapes import is_tensor_shape


def param_channels(an: Analysis, target: str, dim: int, why: str) -> tuple[int, ...]:
    """Units for dim ``dim`` of a parameter used as data (a per-channel table): a passenger atom.

    Example:
        >>> import torch
        >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 3))
        >>> an = Analysis(gm)
        >>> param_channels(an, "weight", 0, "example")
        (0, 1, 2)
    """
    key = (target, dim)
    if key in an.params:
        return an.params[key].units
    size = an.param_tensor(target).shape[dim]
    units = an.units.new_atom(("param", target, dim), size, "param")
    an.slice_param(target, dim, "passenger", units, target, why)
    return units


# -- views that add, drop or broadcast dims ------------------------------------------------
def expand(an: Analysis, node: fx.Node) -> Any:
    """``expand``/``expand_as``/``broadcast_to``: the channel dim keeps its size; a parameter
    expanded without new dims stays a parameter (its users decide its channel dim)."""
    x = arg(node, 0, "input")
    v, out_shape, nd = an.value(x), an.shape(node), ndim(an, x)
    if not is_tensor_shape(out_shape) or nd is None:
        return opaque(an, node)
    if isinstance(v, ParamRef):
        return v if nd == len(out_shape) else opaque(an, node, f"{describe(node)} adds dims to a parameter")
    if not isinstance(v, ChannelInfo):
        return opaque(an, node)
    od = v.dim + len(out_shape) - nd
    if out_shape[od] != len(v.units):
        return opaque(an, node, f"{describe(node)} broadcasts the channel dim")
    return ChannelInfo(od, v.units)


def repeat(an: Analysis, node: fx.Node) -> Any:
    """``repeat``: tiling along the channel dim lays copies of the units end to end."""
    x = arg(node, 0, "input")
    v, out_shape, nd = an.tensor_info(x), an.shape(node), ndim(an, x)
    if v is None or not is_tensor_shape(out_shape) or nd is None:
        return opaque(an, node)
    od = v.dim + len(out_shape) - nd
    times, rest = divmod(out_shape[od], len(v.units))
    if rest:
        return opaque(an, node)
    return ChannelInfo(od, v.units * times)


def unsqueeze(an: Analysis, node: fx.Node) -> Any:
    """``unsqueeze``: a new size-1 dim before or after the channel dim."""
    x = arg(node, 0, "input")
    v, nd = an.tensor_info(x), ndim(an, x)
    d = arg(node, 1, "dim")
    if v is None or nd is None or not isinstance(d, int):
        return opaque(an, node)
    d = norm_dim(d, nd + 1)
    return ChannelInfo(v.dim + 1 if d <= v.dim else v.dim, v.units)


def squeeze(an: Analysis, node: fx.Node) -> Any:
    """``squeeze``: size-1 dims go; a channel dim of size 1 that goes is blocked."""
    x = arg(node, 0, "input")
    v, in_shape = an.tensor_info(x), an.shape(x)
    if v is None or not is_tensor_shape(in_shape):
        return opaque(an, node)
    d = arg(node, 1, "dim")
    dims = range(len(in_shape)) if d is None else ([d] if isinstance(d, int) else list(d))
    gone = {norm_dim(i, len(in_shape)) for i in dims if in_shape[norm_dim(i, len(in_shape))] == 1}
    if v.dim in gone:
        return opaque(an, node, f"{describe(node)} drops the channel dim")
    return ChannelInfo(v.dim - sum(1 for i in gone if i < v.dim), v.units)


def movedim(an: Analysis, node: fx.Node) -> Any:
    """``movedim``/``moveaxis``: the channel dim moves with the permutation."""
    x = arg(node, 0, "input")
    v, nd = an.tensor_info(x), ndim(an, x)
    src, dst = arg(node, 1, "source"), arg(node, 2, "destination")
    if v is None or nd is None:
        return opaque(an, node)
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    src, dst = [norm_dim(s, nd) for s in src], [norm_dim(s, nd) for s in dst]
    order = [None] * nd
    for s, t in zip(src, dst):
        order[t] = s
    rest = iter(d for d in range(nd) if d not in src)
    order = [o if o is not None else next(rest) for o in order]
    return ChannelInfo(order.index(v.dim), v.units)


def unbind(an: Analysis, node: fx.Node) -> Any:
    """``unbind`` along another dim: every piece carries the channels."""
    x = arg(node, 0, "input")
    v, nd, out_shape = an.tensor_info(x), ndim(an, x), an.shape(node)
    d = arg(node, 1, "dim", 0)
    if v is None or nd is None or not isinstance(d, int) or not isinstance(out_shape, tuple):
        return opaque(an, node)
    d = norm_dim(d, nd)
    if d == v.dim:
        return opaque(an, node, f"{describe(node)} unbinds the channel dim")
    return tuple(ChannelInfo(v.dim - (1 if d < v.dim else 0), v.units) for _ in out_shape)


def pad(an: Analysis, node: fx.Node) -> Any:
    """``F.pad``: pads the last ``len(pad) // 2`` dims; the channel dim must get no padding."""
    x = arg(node, 0, "input")
    v, nd = an.tensor_info(x), ndim(an, x)
    amounts = arg(node, 1, "pad")
    if v is None or nd is None or not isinstance(amounts, (list, tuple)):
        return opaque(an, node)
    for i in range(len(amounts) // 2):
        if nd - 1 - i == v.dim and (amounts[2 * i] != 0 or amounts[2 * i + 1] != 0):
            return opaque(an, node, f"{describe(node)} pads the channel dim")
    return ChannelInfo(v.dim, v.units)


def roll(an: Analysis, node: fx.Node) -> Any:
    """``torch.roll`` along other dims moves whole channel vectors: per-channel."""
    x = arg(node, 0, "input")
    v, nd = an.tensor_info(x), ndim(an, x)
    dims = arg(node, 2, "dims")
    if v is None or nd is None or dims is None:
        return opaque(an, node, f"{describe(node)} rolls the flattened tensor")
    dims = [dims] if isinstance(dims, int) else list(dims)
    if v.dim in [norm_dim(d, nd) for d in dims]:
        return opaque(an, node, f"{describe(node)} rolls along the channel dim")
    return ChannelInfo(v.dim, v.units)


def no_channels(an: Analysis, node: fx.Node) -> Any:
    """Ops that read no channel values (``torch._assert``, shape arithmetic)."""
    return None


# -- creation ops: a constant tensor whose size meets channels downstream -------------------
# Where each creation op takes its size: (position of the size, or of its first int when the
# size is given as separate ints; the keyword). ``torch.full(size, fill)`` and
# ``x.new_full(size, fill)`` take it packed only.
CREATION_SIZE: dict[Any, tuple[int, str]] = {
    **{f: (0, "size") for f in (torch.zeros, torch.ones, torch.empty, torch.full)},
    **{m: (1, "size") for m in ("new_zeros", "new_ones", "new_empty", "new_full")},
}


def creation_size(node: fx.Node) -> tuple[list, Any] | None:
    """``(size entries, where)`` of a creation op's size argument, ``where`` being ``("kw",)``,
    ``("packed", pos)`` or ``("ints", pos, count)``; None when the op takes no size here.

    Example:
        >>> g = torch.fx.Graph()
        >>> n = g.call_function(torch.zeros, ((1, 4, 5),))
        >>> creation_size(n)
        ([1, 4, 5], ('packed', 0))
    """
    entry = CREATION_SIZE.get(node.target)
    if entry is None:
        return None
    pos, name = entry
    if name in node.kwargs:
        return list(node.kwargs[name]), ("kw",)
    if len(node.args) <= pos:
        return None
    first = node.args[pos]
    if isinstance(first, (list, tuple, torch.Size)):
        return list(first), ("packed", pos)
    packed = node.target in (torch.full, "new_full")
    count = 1 if packed else len(node.args) - pos
    return list(node.args[pos:pos + count]), ("ints", pos, count)


def set_creation_size(node: fx.Node, dim: int, value: int) -> None:
    """Write ``value`` into entry ``dim`` of a creation op's size (see ``creation_size``).

    Example:
        >>> g = torch.fx.Graph()
        >>> n = g.call_function(torch.zeros, (1, 4, 5))
        >>> set_creation_size(n, 1, 2); n.args
        (1, 2, 5)
    """
    sizes, where = creation_size(node)
    sizes[dim] = value
    if where[0] == "kw":
        node.kwargs = {**node.kwargs, "size": type(node.kwargs["size"])(sizes)}
    elif where[0] == "packed":
        pos = where[1]
        node.args = node.args[:pos] + (type(node.args[pos])(sizes),) + node.args[pos + 1:]
    else:
        pos, count = where[1], where[2]
        node.args = node.args[:pos] + tuple(sizes) + node.args[pos + count:]


def _is_elementwise(an: Analysis, node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and lookup.is_elementwise(lookup.rule_for(an, node))


def _met_channels(an: Analysis, cur: fx.Node, user: fx.Node) -> list[tuple[ChannelInfo, int]]:
    """(tracked channels, ndim of the shape they are aligned in) that ``cur`` meets at ``user``:
    the other operands of an elementwise op; a query's batch dims (heads) for the attention
    mask of ``scaled_dot_product_attention``, which broadcasts against the scores."""
    out = []
    if user.op == "call_function" and user.target is F.scaled_dot_product_attention \
            and arg(user, 3, "attn_mask") is cur:
        q = arg(user, 0, "query")
        v, nd = an.tensor_info(q), ndim(an, q)
        if v is not None and nd is not None and v.dim < nd - 2:
            out.append((v, nd))
    elif _is_elementwise(an, user):
        nd = len(an.shape(user)) if is_tensor_shape(an.shape(user)) else None
        for o in user.all_input_nodes:
            v, ond = an.tensor_info(o), ndim(an, o)
            if o is not cur and v is not None and ond is not None and nd is not None:
                out.append((ChannelInfo(v.dim + nd - ond, v.units), nd))
    return out


def _creation_dim(an: Analysis, node: fx.Node, size: tuple, depth: int = 4) -> int | None:
    """The dim of a created tensor that meets tracked channels of the same count downstream,
    through elementwise ops (dims right-aligned, as broadcasting aligns them); None if none."""
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for cur in frontier:
            for user in cur.users:
                for v, nd in _met_channels(an, cur, user):
                    d = v.dim - (nd - len(size))
                    if 0 <= d < len(size) and size[d] == len(v.units) > 1:
                        return d
                if _is_elementwise(an, user):
                    nxt.append(user)
        frontier = nxt
    return None


def creation(an: Analysis, node: fx.Node) -> Any:
    """``torch.zeros/ones/full/empty(size)`` and ``x.new_zeros/new_ones/new_full/new_empty(size)``:
    the same value at every position, so any dim can lose positions if its size literal follows.
    The dim that meets tracked channels of its size downstream (an elementwise op, or the
    attention mask broadcast against the scores' heads) carries new units and its size literal
    is rewritten (T5's cross-attention ``position_bias = torch.zeros((1, n_heads, q, k))``);
    a size without such a dim, or with a run-time value there, keeps the tensor whole.

    Example:
        >>> import torch, fxprune
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
        ...     def forward(self, x):
        ...         return self.b(self.a(x) + torch.ones(1, 4))
        >>> p = fxprune.plan(Net(), fxprune.Policy(ratio=0.5), (torch.randn(2, 3),))
        >>> [(g.size, g.kept) for g in p.groups]   # the constant's 4 go with a's
        [(4, 2), (2, 2)]
    """
    found = creation_size(node)
    out_shape = an.shape(node)
    if found is None or not is_tensor_shape(out_shape) or len(found[0]) != len(out_shape):
        return opaque(an, node, f"{describe(node)}: its size argument is not a plain list of dims")
    d = _creation_dim(an, node, out_shape)
    if d is None or not isinstance(found[0][d], int):
        return opaque(an, node, f"{describe(node)}: no consumer shows which of its dims carries channels"
                      if d is None else f"{describe(node)}: its size at dim {d} is computed at run time")
    units = an.units.new_atom(("out", node.name, d), out_shape[d], "param")
    an.rewrite_literal(node, "creation_size", (units, d))
    return ChannelInfo(d, units)
