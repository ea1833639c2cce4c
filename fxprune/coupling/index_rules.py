"""Indexing rules that need both the layout rules and parameter channels: ``table[index]``.

Example:
    >>> import operator
    >>> from fxprune.coupling.ops import FUNCTION_RULES
    >>> from fxprune.coupling import table_rules
    >>> FUNCTION_RULES[operator.getitem] is table_rules.getitem  # tries parameter tables, then this getitem
    True
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from .layout_rules import getitem as layout_getitem
from .rules import describe
from .slice_rules import expand_ellipsis
from .state import Analysis, ChannelInfo, ParamRef
from .tensor_rules import param_channels
from ..shapes import is_tensor_shape


def getitem(an: Analysis, node: fx.Node) -> Any:
    """``table[index]`` on a parameter (e.g. a relative position bias table gathered by an
    index buffer) gives a per-channel table along the parameter's last dim; everything else
    is ordinary indexing."""
    src, idx = node.args[0], node.args[1]
    v = an.value(src)
    out_shape = an.shape(node)
    if isinstance(v, ParamRef) and is_tensor_shape(out_shape):
        p = an.param_tensor(v.target)
        first = idx[0] if isinstance(idx, tuple) and len(idx) == 1 else idx
        if isinstance(first, fx.Node) and p.dim() >= 2 and out_shape[-1] == p.shape[-1]:
            units = param_channels(an, v.target, p.dim() - 1, describe(node))
            return ChannelInfo(len(out_shape) - 1, units)
        kept = sliced_table_dim(tuple(p.shape), idx)
        if kept is not None:
            return ChannelInfo(kept[1], param_channels(an, v.target, kept[0], describe(node)))
    return layout_getitem(an, node)


def sliced_table_dim(shape: tuple, idx: Any) -> tuple[int, int] | None:
    """``(parameter dim, output dim)`` of the one dim wider than 1 that basic indexing of a
    parameter table keeps whole (a ViT's ``pos_embed[:, 1:]`` on ``(1, N, C)`` keeps ``C``): a
    per-channel table along it, whose users couple it. None where the index is not basic
    (integers, slices, None, one Ellipsis) or no single wide dim is kept whole.

    Example:
        >>> sliced_table_dim((1, 101, 64), (slice(None), slice(1, None)))
        (2, 2)
        >>> sliced_table_dim((1, 101, 64), (0,)) is None  # N and C both kept: which is the table's?
        True
    """
    entries = list(idx) if isinstance(idx, tuple) else [idx]
    if any(not (e is None or e is Ellipsis or isinstance(e, slice) or (isinstance(e, int) and not isinstance(e, bool)))
           for e in entries) or entries.count(Ellipsis) > 1 \
            or any(isinstance(e, slice) and not all(b is None or isinstance(b, int) for b in (e.start, e.stop, e.step))
                   for e in entries):
        return None
    entries = expand_ellipsis(entries, len(shape))
    used = len(entries) - entries.count(None)
    if used > len(shape):
        return None
    entries += [slice(None)] * (len(shape) - used)
    whole, in_dim, out_dim = [], 0, 0
    for e in entries:
        if e is None:
            out_dim += 1
            continue
        if e == slice(None) and shape[in_dim] > 1:
            whole.append((in_dim, out_dim))
        out_dim += 0 if isinstance(e, int) else 1
        in_dim += 1
    return whole[0] if len(whole) == 1 else None
