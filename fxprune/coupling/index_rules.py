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
    return layout_getitem(an, node)
