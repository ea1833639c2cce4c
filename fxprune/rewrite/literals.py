"""Literal arguments that follow the kept width: one rewriter per kind, recorded by the op rules
with ``Analysis.rewrite_literal(node, kind, payload)``.

A rewriter gets the node of the copied graph, the payload and ``kept(units) -> int`` (how many
positions of a units tuple survive) and edits the node in place.

Example:
    >>> import torch, fxprune
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 4, 1)
    ...     def forward(self, x):
    ...         y = self.a(x)
    ...         return self.b(y) * y.mean(1, keepdim=True)
    >>> pruned = fxprune.transform(Net(), fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 2, 2),))
    >>> "mul" in [n.target.__name__ for n in pruned.graph.nodes if n.op == "call_function"]
    True
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch.fx as fx

from ..coupling.rules import arg
from ..coupling.param_expr import shape_entry
from ..coupling.tensor_rules import set_creation_size
from ..shapes import shape
from .window_attention import inline as inline_window_attention
from .attention import decompose as decompose_attention, repeat_kv


def _set_arg(node: fx.Node, pos: int, name: str, value: Any) -> None:
    if len(node.args) > pos:
        node.args = node.args[:pos] + (value,) + node.args[pos + 1:]
    else:
        node.kwargs = {**node.kwargs, name: value}


def sdpa_scale(node: fx.Node, payload: tuple, kept: Callable) -> None:
    """``F.scaled_dot_product_attention`` whose query/key width was cut: ``scale=`` the original
    default ``1/sqrt(E)`` (recorded by ``coupling/sdpa_rules.py``), so the pruned scores are the
    masked original's; a call keeping its whole width stays as it was.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> g = torch.fx.Graph()
        >>> q, k, v = (g.placeholder(n) for n in "qkv")
        >>> node = g.call_function(F.scaled_dot_product_attention, (q, k, v))
        >>> sdpa_scale(node, ((0, 1, 2, 3), 0.5), kept=lambda units: 2)
        >>> node.kwargs
        {'scale': 0.5}
    """
    units, scale = payload
    if kept(units) != len(units):
        _set_arg(node, 6, "scale", scale)  # (query, key, value, attn_mask, dropout_p, is_causal, scale)


def normalized_shape(node: fx.Node, payload: tuple, kept: Callable) -> None:
    """``F.layer_norm`` / ``F.rms_norm``: the channel entry of ``normalized_shape``."""
    units, index = payload
    shape = list(arg(node, 1, "normalized_shape"))
    shape[index] = kept(units)
    _set_arg(node, 1, "normalized_shape", type(arg(node, 1, "normalized_shape"))(shape))


def group_norm(node: fx.Node, payload: tuple, kept: Callable) -> None:
    """``F.group_norm``: ``num_groups`` = kept width / norm-group width (1 stays 1)."""
    units, per = payload
    _set_arg(node, 1, "num_groups", kept(units) // per if per else 1)


def mean_rescale(node: fx.Node, units: tuple, kept: Callable) -> None:
    """A mean over the channel dim becomes ``mean * kept / total``: the mean of the original
    with the removed channels zeroed, i.e. exact."""
    k, total = kept(units), len(units)
    if k == total:
        return
    graph = node.graph
    with graph.inserting_after(node):
        scaled = graph.call_function(operator.mul, (node, k / total))
    node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)


def count(node: fx.Node, payload: tuple, kept: Callable) -> None:
    """An argument that counts kept units (e.g. ``num_heads`` of an attention call)."""
    pos, name, units = payload
    _set_arg(node, pos, name, kept(units))


def view_dims(node: fx.Node, payload: tuple, kept: Callable) -> None:
    """``view``/``reshape`` entries that stay at their traced value: a head width computed at run
    time from another tensor (``C // heads``) would follow that tensor's width, not the heads'.
    An ``unflatten`` (payload ``(units, sizes, channel_dim)``) also gets its channel entry here."""
    units, sizes, *channel = payload
    if channel:
        _unflatten_sizes(node, units, sizes, channel[0], kept)
        return
    if "shape" in node.kwargs:
        dims = list(node.kwargs["shape"])
    else:
        rest = list(node.args[1:])
        packed = len(rest) == 1 and isinstance(rest[0], (list, tuple))
        dims = list(rest[0]) if packed else rest
    if not any(isinstance(dims[d], fx.Node) for d in sizes) and kept(units) == len(units):
        return
    for d, size in sizes.items():
        dims[d] = size
    if "shape" in node.kwargs:
        node.kwargs = {**node.kwargs, "shape": tuple(dims)}
    else:
        node.args = (node.args[0], tuple(dims)) if packed else (node.args[0], *dims)


def _unflatten_sizes(node: fx.Node, units: tuple, sizes: dict, channel: int, kept: Callable) -> None:
    """``x.unflatten(dim, sizes)`` / ``torch.unflatten`` / ``nn.Unflatten(dim, sizes)``: entries of
    ``sizes`` by output dim (``sizes``: kept at their traced value, ``channel``: the kept width, -1
    stays); an ``nn.Unflatten`` call becomes ``x.unflatten(dim, sizes)``."""
    if kept(units) == len(units):
        return
    x = node.args[0]
    if node.op == "call_module":
        m = node.graph.owning_module.get_submodule(node.target)
        dim, split = m.dim, tuple(m.unflattened_size)
    else:
        dim, split = arg(node, 1, "dim"), tuple(arg(node, 2, "sizes"))
    out_ndim = len(shape(node))
    start = dim if dim >= 0 else dim + out_ndim - len(split) + 1
    new = list(split)
    for d, size in sizes.items():
        if start <= d < start + len(new):
            new[d - start] = size
    if start <= channel < start + len(new) and new[channel - start] != -1:
        new[channel - start] = kept(units)
    node.op, node.target = "call_method", "unflatten"
    node.args, node.kwargs = (x, dim, tuple(new)), {}


def _entry_after(spec: tuple, kept: Callable) -> Any:
    """The channel entry of an index in the kept input (see ``coupling.slice_rules``)."""
    kind = spec[0]
    if kind == "int":
        return kept(spec[1])
    if kind == "slice":
        _, head, upto, to_end = spec
        start = kept(head)
        return slice(start or None, None if to_end else kept(upto))
    units, picked = spec[1], spec[2]
    before = [kept(units[:p]) for p in picked]
    return [b for b, p in zip(before, picked) if kept(units[:p + 1]) > b]


def channel_index(node: fx.Node, payload: tuple, kept: Callable) -> None:
    """``x[..., a:b]`` / ``x[:, i]`` / ``x[:, a:b:s]`` on the channel dim: the entry at position
    ``pos`` of the index (None: the whole index) becomes its kept counterpart. A stepped slice
    becomes a list of the kept picked positions, or stays as it is when nothing moved."""
    pos, spec = payload
    entry = _entry_after(spec, kept)
    idx = node.args[1]
    if spec[0] == "pick":
        if entry == list(spec[2]):
            return
        if len(entry) > 1 and len({b - a for a, b in zip(entry, entry[1:])}) == 1 and entry[1] > entry[0]:
            entry = slice(entry[0], entry[-1] + 1, entry[1] - entry[0])
    if pos is None:
        node.args = (node.args[0], entry, *node.args[2:])
    else:
        node.args = (node.args[0], idx[:pos] + (entry,) + idx[pos + 1:], *node.args[2:])


def narrow(node: fx.Node, payload: tuple, kept: Callable) -> None:
    """``narrow(x, dim, start, length)`` on the channel dim: start and length of the kept channels."""
    head, upto = payload
    start = kept(head)
    _set_arg(node, 2, "start", start)
    _set_arg(node, 3, "length", kept(upto) - start)


def creation_size(node: fx.Node, payload: tuple, kept: Callable) -> None:
    """A creation op's size entry at the dim that carries channels (``torch.zeros((1, heads, q, k))``)."""
    units, dim = payload
    if kept(units) != len(units):
        set_creation_size(node, dim, kept(units))


def scatter_bounds(node: fx.Node, payload: tuple, kept: Callable) -> None:
    """``slice_scatter(x, src, dim, start, end)`` on the channel dim: the kept start and end."""
    head, upto, to_end = payload
    _set_arg(node, 3, "start", kept(head))
    _set_arg(node, 4, "end", None if to_end else kept(upto))


REWRITERS: dict[str, Callable[[fx.Node, Any, Callable], None]] = {
    "attention": decompose_attention,
    "repeat_kv": repeat_kv,
    "view_dims": view_dims,
    "count": count,
    "normalized_shape": normalized_shape,
    "group_norm": group_norm,
    "mean_rescale": mean_rescale,
    "channel_index": channel_index,
    "narrow": narrow,
    "creation_size": creation_size,
    "window_attention": inline_window_attention,
    "shape_entry": shape_entry,  # a computed weight's literal row count (coupling/param_expr.py)
    "scatter_bounds": scatter_bounds,  # slice_scatter on the channel dim (coupling/slice_rules.py)
    "sdpa_scale": sdpa_scale,  # the original softmax scale of a cut query width (coupling/sdpa_rules.py)
}


def rewrite(node: fx.Node, kind: str, payload: Any, kept: Callable) -> None:
    REWRITERS[kind](node, payload, kept)
