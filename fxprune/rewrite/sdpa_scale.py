"""The softmax scale of a ``scaled_dot_product_attention`` call whose query/key width was cut:
the call gets ``scale=`` the original default ``1/sqrt(E)`` (recorded by
``fxprune.coupling.sdpa_rules``), so the pruned scores are the masked original's.

Example:
    >>> import math, torch, torch.nn.functional as F
    >>> g = torch.fx.Graph()
    >>> q, k, v = (g.placeholder(n) for n in "qkv")
    >>> node = g.call_function(F.scaled_dot_product_attention, (q, k, v))
    >>> keep_scale(node, ((0, 1, 2, 3), 0.5), kept=lambda units: 2)
    >>> node.kwargs
    {'scale': 0.5}
"""
from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx

_SCALE_POS = 6  # F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale)


def keep_scale(node: fx.Node, payload: tuple[tuple[int, ...], float], kept: Callable[[Any], int]) -> None:
    """Write the original scale into ``node`` when some of the query/key units are gone; a call
    that keeps its whole width stays as it was."""
    units, scale = payload
    if kept(units) == len(units):
        return
    if len(node.args) > _SCALE_POS:
        node.args = node.args[:_SCALE_POS] + (scale,) + node.args[_SCALE_POS + 1:]
    else:
        node.kwargs = {**node.kwargs, "scale": scale}
