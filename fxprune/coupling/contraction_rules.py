"""Channel semantics of labelled contractions: ``einsum``, ``matmul``/``bmm``, and the
operand labelling ``sdpa_rules`` uses for scaled dot-product attention.

Contractions are described by index labels, one per dim, as in ``einsum``. The channel dim of
every tracked operand must carry the same label. A label kept in the output is a batch-like dim
(per-channel: the channels pass through); a label summed over is a contraction, exact when
every operand that has it carries the same channels (zeroed terms drop out of the sum). A second
channel dim kept in a result is left to its one user when that is a contraction
(``Analysis.deferred``): linear attention's ``q @ (k.T @ v)`` sums k's channels with q's and keeps
v's.

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

from .rules import arg, describe, ndim, opaque
from .state import Analysis, ChannelInfo, ParamRef
from ..shapes import is_tensor_shape


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
    second = None  # (dim, units) of the deferred index in the result
    if defer is not None:
        values = carried[defer]
        for v in values[1:]:
            an.units.union(values[0].units, v.units, "identity", f"{why} (index {defer!r})")
        second = (out.index(defer), tuple(values[0].units))
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
        if second is not None:  # left to the next contraction, which settles it
            an.deferred[node.name] = (*second, _mixed_reason(why, defer, chan, out)
                                      + " (nor does the one contraction after it settle them)")
        return ChannelInfo(out.index(chan), units)
    if inexact_if_contracted:
        an.units.mark_inexact(units, f"{inexact_if_contracted} ({why})")
    if second is not None:  # the kept second index becomes this node's channel dim
        return ChannelInfo(*second)
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
