"""Channel semantics of generic tensor ops that transformers use: broadcasting views (expand,
unsqueeze, squeeze, movedim), padding and rolling along non-channel dims, parameter tables
gathered by index, and labelled contractions (einsum, matmul, scaled dot-product attention).

Contractions are described by index labels, one per dim, as in ``einsum``. The channel dim of
every tracked operand must carry the same label. A label kept in the output is a batch-like dim
(per-channel: the channels pass through); a label summed over is a contraction, exact when
every operand that has it carries the same channels (zeroed terms drop out of the sum).

Example:
    >>> import torch, fxprune
    >>> class Heads(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.q, self.k, self.out = torch.nn.Linear(3, 4), torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
    ...     def forward(self, x):                       # channels of q and k meet in the sum over d
    ...         a = torch.einsum("bid,bjd->bij", self.q(x), self.k(x)).softmax(-1)
    ...         return self.out(torch.einsum("bij,bjd->bid", a, self.q(x)))
    >>> p = fxprune.plan(Heads(), fxprune.Policy(ratio=0.5), (torch.randn(1, 5, 3),))
    >>> sorted(p.groups[0].params, key=lambda m: m.target)[0].target, p.groups[0].exact
    ('k.bias', True)
"""
from __future__ import annotations

import operator
import string
from typing import Any, Sequence

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


# -- labelled contractions -----------------------------------------------------------------
def _without_broadcasts(an: Analysis, operands: Sequence[tuple[Any, str]]) -> list[tuple[Any, str]]:
    """Operands with their broadcast dims (size 1 where another operand has more) relabelled
    apart: a mask of shape (B, 1, L, S) added over every head shares no channels with them."""
    sizes: dict[str, int] = {}
    for a, labels in operands:
        shape = an.shape(a) if isinstance(a, fx.Node) else None
        if is_tensor_shape(shape) and len(shape) == len(labels):
            for label, size in zip(labels, shape):
                sizes[label] = max(sizes.get(label, 1), size)
    out = []
    for a, labels in operands:
        shape = an.shape(a) if isinstance(a, fx.Node) else None
        if is_tensor_shape(shape) and len(shape) == len(labels):
            labels = "".join(_BROADCAST if size == 1 and sizes.get(label, 1) > 1 else label
                             for label, size in zip(labels, shape))
        out.append((a, labels))
    return out


_BROADCAST = "?"  # a label no contraction uses: the operand's size-1 dim broadcasts


def has_removable(an: Analysis, values: Sequence[ChannelInfo]) -> bool:
    """True unless every unit of every value is already pinned (an opaque result's placeholder,
    a model input): pinned units are never removed, so tracking them gains nothing."""
    pins = an.units.pins
    return any(u not in pins for v in values for u in v.units)


def _tracked_label(an: Analysis, carried: dict[str, list], out: str) -> str:
    """The index whose channels a contraction tracks: one carrying removable channels first (the
    scores ``q @ k.T`` sum over head_dim and carry only a pinned placeholder on the heads dim, so
    ``scores @ v`` tracks v's head_dim, not that placeholder), then one kept in the output, then
    the one most operands carry channels on, then the earliest in the output.

    Example:
        >>> import torch
        >>> an = Analysis(torch.fx.symbolic_trace(torch.nn.Identity()))
        >>> held, free = an.units.new_atom("s", 2, "opaque"), an.units.new_atom("v", 4, "producer")
        >>> an.units.pin(held, "scores")
        >>> _tracked_label(an, {"b": [ChannelInfo(1, held)], "j": [ChannelInfo(3, free)]}, "abij")
        'j'
    """
    return max(carried, key=lambda label: (has_removable(an, carried[label]), label in out,
                                           len(carried[label]), -out.find(label)))


def _mixed_reason(why: str, label: str, chan: str, out: str) -> str:
    """Why channels on index ``label`` are pinned where a contraction tracks index ``chan``.

    Example:
        >>> _mixed_reason("matmul at node 'mm'", "j", "i", "aij").split(": ", 1)[1]
        "its channels (index 'j', kept in the output) meet channels on index 'i' (kept in the output); its result would carry channels on two dims, a contraction tracks the channels of one index only"
    """
    role = lambda l: "kept in the output" if l in out else "summed over"  # noqa: E731
    two = "its result would carry channels on two dims, " if label in out and chan in out else ""
    return (f"{why}: its channels (index {label!r}, {role(label)}) meet channels on index {chan!r} "
            f"({role(chan)}); {two}a contraction tracks the channels of one index only")


_CONTRACTIONS = frozenset((torch.matmul, operator.matmul, torch.bmm, torch.einsum, "matmul", "__matmul__", "bmm"))


def _next_contraction(node: fx.Node) -> bool:
    """True when ``node``'s one user is a contraction that reads it (matmul, bmm, einsum): the
    place where a second channel dim of ``node`` can be settled (summed over with the same
    channels on the other side, or kept as that contraction's channel dim)."""
    users = list(node.users)
    if len(users) != 1 or users[0].op not in ("call_function", "call_method"):
        return False  # a submodule named "matmul" is not one
    try:
        return users[0].target in _CONTRACTIONS and node in users[0].all_input_nodes
    except TypeError:  # an unhashable target
        return False


def _channel_infos(an: Analysis, a: Any, taken: list) -> list[ChannelInfo]:
    """The channel dims an operand carries: its own, and a second one an earlier contraction
    left to this one (``Analysis.deferred``; appended to ``taken``, which the caller settles;
    recorded in ``Analysis.second_dims``, where the rewrite's shape re-check reads it)."""
    v = an.value(a)
    infos = [v] if isinstance(v, ChannelInfo) else []
    later = an.deferred.pop(a.name, None) if isinstance(a, fx.Node) else None
    if later is not None:
        taken.append(later)
        infos.append(ChannelInfo(later[0], later[1]))
        an.second_dims[a.name] = later[:2]
    return infos


def contract_labels(an: Analysis, node: fx.Node, operands: Sequence[tuple[Any, str]], out: str,
                    inexact_if_contracted: str | None = None) -> Any:
    """Channel semantics of a contraction given the index labels of every operand and the output.

    One index is tracked (``_tracked_label``). Another index summed over whose every operand
    carries channels on it couples them (a removed channel's terms drop out of the sum, on every
    side at once); another index kept in the output is left to this node's one user when that is
    a contraction (linear attention: ``k.T @ v`` keeps k's and v's channels, ``q @ (k.T @ v)``
    sums k's with q's and keeps v's); any other is pinned, with the reason.
    """
    why = describe(node)
    operands = _without_broadcasts(an, operands)
    taken: list = []  # deferred entries read here: settled below, or pinned if this node gives up

    def give_up(reason: str) -> Any:
        for _dim, units, _why in taken:
            an.units.pin(units, reason)
        return opaque(an, node, reason)

    infos: list[list[ChannelInfo]] = []
    carried: dict[str, list] = {}
    for a, labels in operands:
        infos.append(_channel_infos(an, a, taken))
        for v in infos[-1]:
            label = labels[v.dim] if v.dim < len(labels) else None
            if label == _BROADCAST:
                continue  # one channel read by every position of the others: nothing to couple
            if label is None:
                return give_up(f"{why}: an operand's channel dim has no index")
            carried.setdefault(label, []).append(v)
    if not carried:
        return give_up(f"{why}: no operand carries channels")
    chan = _tracked_label(an, carried, out)

    def on(label: str, labels: str, values: list[ChannelInfo]) -> ChannelInfo | None:
        return next((v for v in values if labels[v.dim] == label), None)

    def fully_carried(label: str) -> bool:  # every operand with this index carries channels on it
        return all(on(label, labels, values) is not None or not _sized(an, a, labels.index(label))
                   for (a, labels), values in zip(operands, infos) if label in labels)

    later = [label for label in carried if label != chan and label in out]
    defer = later[0] if len(later) == 1 and _next_contraction(node) else None
    for label, values in carried.items():
        if label == chan or label == defer:
            continue
        widths = {len(v.units) for v in values}
        if label not in out and len(widths) == 1 and fully_carried(label):
            for v in values[1:]:  # summed over with the same channels on every side: exact
                an.units.union(values[0].units, v.units, "identity", f"{why} (index {label!r}, summed)")
            continue
        for v in values:
            an.units.pin(v.units, _mixed_reason(why, label, chan, out))
    if defer is not None:
        values = carried[defer]
        for v in values[1:]:
            an.units.union(values[0].units, v.units, "identity", f"{why} (index {defer!r})")
        an.deferred[node.name] = (out.index(defer), tuple(values[0].units), _mixed_reason(why, defer, chan, out)
                                  + " (nor does the one contraction after it settle them)")
    units = carried[chan][0].units
    widths = {len(v.units) for v in carried[chan]}
    if len(widths) > 1:
        return give_up(f"{why}: index {chan!r} has {' and '.join(map(str, sorted(widths)))} "
                       "channels in different operands (grouped heads are not tracked)")
    role = "passenger" if chan in out else "consumer"
    for (a, labels), values in zip(operands, infos):
        if chan not in labels:
            continue
        v, d = on(chan, labels, values), labels.index(chan)
        raw = an.value(a)
        if v is not None:
            an.units.union(units, v.units, "identity", f"{why} (index {chan!r})")
        elif isinstance(raw, ParamRef) and an.param_tensor(raw.target).shape[d] == len(units):
            an.slice_param(raw.target, d, role, units, raw.target, why)
        elif _sized(an, a, d):
            return give_up(f"{why}: an operand without tracked channels meets them on index {chan!r}")
    if chan in out:
        return ChannelInfo(out.index(chan), units)
    if inexact_if_contracted:
        an.units.mark_inexact(units, f"{inexact_if_contracted} ({why})")
    if defer is not None:  # the kept second index becomes this node's channel dim
        dim, kept, _ = an.deferred.pop(node.name)
        return ChannelInfo(dim, kept)
    return an.fresh(node, an.shape(node), "opaque", f"{why} sums over the channels; its result carries none")


def _sized(an: Analysis, a: Any, d: int) -> bool:
    """True unless operand ``a`` is a node whose dim ``d`` has size 1 (it broadcasts)."""
    return not (isinstance(a, fx.Node) and an.shape(a)[d] == 1)


def einsum(an: Analysis, node: fx.Node) -> Any:
    """``torch.einsum`` with an explicit output (``"bhid,bhjd->bhij"``), see ``contract_labels``."""
    equation = node.args[0]
    tensors = list(node.args[1:])
    if len(tensors) == 1 and isinstance(tensors[0], (list, tuple)):
        tensors = list(tensors[0])
    if not isinstance(equation, str) or "->" not in equation or "." in equation:
        return opaque(an, node, f"{describe(node)}: only explicit einsum equations without '...' are supported")
    lhs, out = equation.replace(" ", "").split("->")
    specs = lhs.split(",")
    if len(specs) != len(tensors):
        return opaque(an, node)
    return contract_labels(an, node, list(zip(tensors, specs)), out)


def _matmul_labels(na: int, nb: int) -> tuple[str, str, str] | None:
    if na < 1 or nb < 1:
        return None
    batch = string.ascii_lowercase[: max(na, nb) - 2] if max(na, nb) > 2 else ""
    a = batch[len(batch) - (na - 2):] + "ik" if na >= 2 else "k"
    b = batch[len(batch) - (nb - 2):] + "kj" if nb >= 2 else "k"
    out = batch + ("i" if na >= 2 else "") + ("j" if nb >= 2 else "")
    return a, b, out


def matmul(an: Analysis, node: fx.Node) -> Any:
    """``a @ b`` (matmul/bmm): broadcast batch dims, rows of ``a``, columns of ``b``."""
    a, b = arg(node, 0, "input"), arg(node, 1, "other")
    labels = _matmul_labels(ndim(an, a) or 0, ndim(an, b) or 0)
    if labels is None:
        return opaque(an, node)
    return contract_labels(an, node, [(a, labels[0]), (b, labels[1])], labels[2])


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
