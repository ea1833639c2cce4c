"""Channel semantics of ops that move, join or split dims: cat, flatten, reshape, permute, split."""
from __future__ import annotations

import math
from typing import Any

import torch.fx as fx

from .rules import arg, describe, ndim, norm_dim, opaque, permute_dims
from . import slice_rules
from .attention_rules import split_heads
from .gqa_rules import repeat_kv
from .regrid import regrid, unsplittable
from .shuffle import split_channel_dim
from .state import Analysis, ChannelInfo, ParamRef
from ..shapes import is_tensor_shape


def cat(an: Analysis, node: fx.Node) -> Any:
    """Concatenation: on the channel dim the units are laid end to end (offset map);
    on any other dim all inputs carry the same channels (identity)."""
    tensors = arg(node, 0, "tensors")
    out_shape = an.shape(node)
    if not isinstance(tensors, (list, tuple)) or not is_tensor_shape(out_shape):
        return opaque(an, node)
    nd = len(out_shape)
    d = norm_dim(arg(node, 1, "dim", 0), nd)
    infos = [an.value(t) for t in tensors]
    tracked = [v for v in infos if isinstance(v, ChannelInfo)]
    if not tracked or any(v.dim != tracked[0].dim for v in tracked):
        return opaque(an, node, f"{describe(node)}: inputs carry channels on different dims")
    cd = tracked[0].dim
    why = describe(node)
    if d == cd:
        units: list[int] = []
        for t, v in zip(tensors, infos):
            if isinstance(v, ChannelInfo):
                units.extend(v.units)
            elif isinstance(v, ParamRef):
                size = an.param_tensor(v.target).shape[cd]
                fresh = an.units.new_atom(("param", v.target, cd), size, "param")
                an.slice_param(v.target, cd, "passenger", fresh, v.target, why)
                units.extend(fresh)
            else:
                return opaque(an, node)
        return ChannelInfo(cd, tuple(units))
    first = tracked[0]
    for v in infos:
        if isinstance(v, ChannelInfo):
            an.units.union(first.units, v.units, "identity", f"{why} along dim {d}")
        elif isinstance(v, ParamRef):
            an.slice_param(v.target, cd, "passenger", first.units, v.target, why)
        else:
            return opaque(an, node)
    return ChannelInfo(cd, first.units)


def stack(an: Analysis, node: fx.Node) -> Any:
    tensors = arg(node, 0, "tensors")
    out_shape = an.shape(node)
    infos = [an.value(t) for t in tensors] if isinstance(tensors, (list, tuple)) else []
    if not infos or not all(isinstance(v, ChannelInfo) for v in infos) or not is_tensor_shape(out_shape):
        return opaque(an, node)
    if any(v.dim != infos[0].dim for v in infos):
        return opaque(an, node, f"{describe(node)}: inputs carry channels on different dims")
    d = norm_dim(arg(node, 1, "dim", 0), len(out_shape))
    for v in infos[1:]:
        an.units.union(infos[0].units, v.units, "identity", describe(node))
    cd = infos[0].dim
    return ChannelInfo(cd + 1 if d <= cd else cd, infos[0].units)


def _flatten_units(units: tuple, in_shape: tuple, start: int, end: int, cd: int) -> tuple[int, tuple]:
    """Units along the flattened dim ``start..end`` that contains channel dim ``cd`` (stride map)."""
    inner = math.prod(in_shape[cd + 1:end + 1])
    outer = math.prod(in_shape[start:cd])
    block = tuple(u for u in units for _ in range(inner))
    return start, block * outer


def _moved_by_flatten(v: ChannelInfo, in_shape: tuple, start: int, end: int) -> ChannelInfo:
    if start <= v.dim <= end:
        d, units = _flatten_units(v.units, in_shape, start, end, v.dim)
        return ChannelInfo(d, units)
    if v.dim > end:
        return ChannelInfo(v.dim - (end - start), v.units)
    return v


def flatten(an: Analysis, node: fx.Node, default_start: int = 0) -> Any:
    x = arg(node, 0, "input")
    v = an.tensor_info(x)
    in_shape = an.shape(x)
    if v is None or not is_tensor_shape(in_shape):
        return opaque(an, node)
    if node.op == "call_module":
        m = an.modules[node.target]
        start, end = m.start_dim, m.end_dim
    else:
        start, end = arg(node, 1, "start_dim", default_start), arg(node, 2, "end_dim", -1)
    nd = len(in_shape)
    if nd == 0:
        return opaque(an, node)
    return _moved_by_flatten(v, in_shape, norm_dim(start, nd), norm_dim(end, nd))


def _as_flatten(in_shape: tuple, out_shape: tuple) -> tuple[int, int] | None:
    """(start, end) when ``out_shape`` is ``in_shape`` with dims start..end merged."""
    for start in range(len(in_shape)):
        if in_shape[:start] != out_shape[:start]:
            break
        for end in range(start, len(in_shape)):
            merged = in_shape[:start] + (math.prod(in_shape[start:end + 1]),) + in_shape[end + 1:]
            if merged == out_shape:
                return start, end
    return None


def reshape(an: Analysis, node: fx.Node) -> Any:
    """view/reshape: supported when the channel dim is untouched, merged as in a flatten, or
    split (see ``shuffle.split_channel_dim``)."""
    x = arg(node, 0, "input")
    v = an.tensor_info(x)
    in_shape, out_shape = an.shape(x), an.shape(node)
    if v is None or not is_tensor_shape(in_shape) or not is_tensor_shape(out_shape):
        return opaque(an, node)
    cd = v.dim
    if in_shape[:cd + 1] == out_shape[:cd + 1] and math.prod(in_shape[cd + 1:]) == math.prod(out_shape[cd + 1:]):
        return ChannelInfo(cd, v.units)
    tail = len(in_shape) - cd
    if len(out_shape) >= tail and in_shape[cd:] == out_shape[len(out_shape) - tail:]:
        return ChannelInfo(len(out_shape) - tail, v.units)
    merged = _as_flatten(in_shape, out_shape)
    if merged is not None:
        return repeat_kv(an, node, v, in_shape, merged) or _moved_by_flatten(v, in_shape, *merged)
    split = split_heads(an, node, v, in_shape, out_shape) or split_channel_dim(an, node, v, in_shape, out_shape) \
        or regrid(an, node, v, in_shape, out_shape)
    if split is not None:
        return split
    return opaque(an, node, f"{describe(node)} reshapes the channel dim {cd} of {in_shape} -> {out_shape}: "
                            f"{unsplittable(in_shape, out_shape, cd)}")


def unflatten(an: Analysis, node: fx.Node) -> Any:
    """``x.unflatten(dim, sizes)`` / ``torch.unflatten`` / ``nn.Unflatten``: a view that splits one
    dim, with the semantics of ``reshape``; when the channel dim is split, the rewrite writes the
    kept width into ``sizes`` (``fxprune.rewrite.literals.view_dims``).

    Example:
        >>> import torch, fxprune
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Unflatten(1, (8, 2, 2)),
        ...                         torch.nn.Conv2d(8, 3, 1))
        >>> pruned = fxprune.transform(m, fxprune.Policy(ratio=0.5), (torch.randn(1, 4),))
        >>> pruned.code.count("unflatten(1, (4, 2, 2))"), getattr(pruned, "0").out_features
        (1, 16)
    """
    out = reshape(an, node)
    in_shape, out_shape = an.shape(arg(node, 0, "input")), an.shape(node)
    if not isinstance(out, ChannelInfo) or not is_tensor_shape(in_shape) or node.name in dict(an.blocked_ops):
        return out
    if node.op == "call_module":
        dim = an.modules[node.target].dim
    else:
        dim = arg(node, 1, "dim")
    start = norm_dim(dim, len(in_shape)) if isinstance(dim, int) else -1
    if start <= out.dim < start + len(out_shape) - len(in_shape) + 1:
        kind, payload = an.literals.get(node.name, (None, None))
        fixed = payload[1] if kind == "view_dims" else {}
        an.rewrite_literal(node, "view_dims", (out.units, fixed, out.dim))
    return out


def permute(an: Analysis, node: fx.Node) -> Any:
    x = arg(node, 0, "input")
    v = an.tensor_info(x)
    nd = ndim(an, x)
    if v is None or nd is None:
        return opaque(an, node)
    dims = [norm_dim(d, nd) for d in permute_dims(node)]
    return ChannelInfo(dims.index(v.dim), v.units)


def transpose(an: Analysis, node: fx.Node) -> Any:
    x = arg(node, 0, "input")
    v = an.tensor_info(x)
    nd = ndim(an, x)
    if v is None or nd is None:
        return opaque(an, node)
    d0, d1 = norm_dim(arg(node, 1, "dim0"), nd), norm_dim(arg(node, 2, "dim1"), nd)
    d = d1 if v.dim == d0 else d0 if v.dim == d1 else v.dim
    return ChannelInfo(d, v.units)


def getitem(an: Analysis, node: fx.Node) -> Any:
    """Indexing a tuple/dict of values, or basic indexing of a tensor: a slice, step or integer
    index on the channel dim is handled by ``slice_rules.channel_entry`` (offset map)."""
    src, idx = node.args[0], node.args[1]
    v = an.value(src)
    if isinstance(v, (tuple, list)) and isinstance(idx, (int, slice)):
        return v[idx]
    if isinstance(v, dict):
        return v.get(idx)
    if not isinstance(v, ChannelInfo):
        return None if not is_tensor_shape(an.shape(node)) else opaque(an, node)
    packed = isinstance(idx, tuple)
    entries = list(enumerate(idx)) if packed else [(None, idx)]
    nd = ndim(an, src)
    if any(isinstance(e, fx.Node) or isinstance(e, (list, tuple)) for _, e in entries):
        return opaque(an, node, f"{describe(node)}: advanced indexing of a channel tensor")
    entries = slice_rules.expand_ellipsis(entries, nd, (None, slice(None)), key=lambda pe: pe[1])
    out_dim, in_dim = 0, 0
    for pos, e in entries:
        if e is None:
            out_dim += 1
            continue
        if in_dim == v.dim:
            if e == slice(None):
                return ChannelInfo(out_dim, v.units)
            return slice_rules.channel_entry(an, node, v, e, out_dim, pos)
        out_dim += 0 if isinstance(e, int) else 1
        in_dim += 1
    return ChannelInfo(out_dim + (v.dim - in_dim), v.units)


def split(an: Analysis, node: fx.Node, chunks: bool = False) -> Any:
    """split/chunk: on the channel dim every piece takes its slice of the units (offset map);
    the rewrite recomputes the piece sizes (chunk becomes an explicit split)."""
    x = arg(node, 0, "input")
    v = an.tensor_info(x)
    out_shape = an.shape(node)
    nd = ndim(an, x)
    if v is None or not isinstance(out_shape, (tuple, list)) or nd is None:
        return opaque(an, node)
    d = norm_dim(arg(node, 2, "dim", 0), nd)
    pieces = [s for s in out_shape]
    if d != v.dim:
        return tuple(ChannelInfo(v.dim, v.units) for _ in pieces)
    out, at = [], 0
    for s in pieces:
        out.append(ChannelInfo(v.dim, v.units[at:at + s[d]]))
        at += s[d]
    an.resized[node.name] = "split"
    return tuple(out)
