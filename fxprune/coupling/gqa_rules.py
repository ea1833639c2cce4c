"""Grouped-query attention pruned by query heads: the same number of query heads in every kv group.

By default a key/value head and the query heads that share it are one unit (group kind
``kv-group``): ``repeat_kv`` (``k[:, :, None].expand(B, KV, n_rep, N, D).reshape(B, KV * n_rep, N, D)``)
lays each kv head's units ``n_rep`` times side by side, and the attention contraction couples
query head ``i`` with kv head ``i // n_rep``.

Naming the kind ``query-heads`` in ``Policy(structures=...)`` switches that off
(``analysis.analyse_model`` records ``gm.meta["fxprune_coupling"]["gqa"] = "query-heads"``): the
reshape that merges the ``(KV, n_rep)`` dims gets one fresh unit per query head instead of the
repeated kv units, so every query head is a channel of its own group (kind ``query-heads``) and
the key/value heads stay (their units are pinned, with the reason). Removing the same number
``r`` of query heads in every kv group keeps the layout ``repeat_kv`` makes: the rewrite turns
the ``expand`` entry ``n_rep`` into ``n_rep - r`` (literal ``repeat_kv``) and the reshape entry
``KV * n_rep`` into ``KV * (n_rep - r)``; the kept query heads of kv group ``g`` are then rows
``g * (n_rep - r) ...`` of the pruned q, next to their kv head's copies. ``fxprune.select`` keeps the
count even (the group's ``blocks``).

Exactness: the oracle zeroes a removed query head in q and in the repeated k and v (they are
node outputs of this group), so its logits are 0 and its output ``softmax(.) @ 0 = 0``; its rows
of ``q_proj`` and columns of ``o_proj`` carry nothing else.

Example:
    >>> import torch
    >>> from fxprune.shapes import propagate
    >>> from fxprune.coupling.build import analyse
    >>> class Repeat(torch.nn.Module):
    ...     def forward(self, k, q):
    ...         r = k[:, :, None].expand(1, 2, 3, 5, 4).reshape(1, 6, 5, 4)
    ...         return q @ r.transpose(-2, -1)
    >>> gm = torch.fx.symbolic_trace(Repeat())
    >>> _ = propagate(gm, (torch.randn(1, 2, 5, 4), torch.randn(1, 6, 5, 4)))
    >>> gm.meta["fxprune_coupling"] = {"gqa": "query-heads"}
    >>> an = analyse(gm)
    >>> kind, (units, kv, dim, reshape) = an.literals["expand"]
    >>> kind, len(units), kv, dim, reshape
    ('repeat_kv', 6, 2, 2, 'reshape')
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .attention_rules import _feeds_contraction
from .rules import describe
from .state import Analysis, ChannelInfo
from ..shapes import is_tensor_shape

_BROADCASTS = {"expand", "broadcast_to"}


def query_heads_mode(an: Analysis) -> bool:
    """True when the policy names the ``query-heads`` kind (recorded on the traced module).

    Example:
        >>> query_heads_mode(Analysis(torch.fx.symbolic_trace(torch.nn.Identity())))
        False
    """
    return (an.gm.meta.get("fxprune_coupling") or {}).get("gqa") == "query-heads"


def _broadcast_source(an: Analysis, x: Any, d: int) -> fx.Node | None:
    """``x`` when it is an ``expand``/``broadcast_to`` whose only user is the reshape and which
    broadcasts a size-1 dim ``d``; else None."""
    if not isinstance(x, fx.Node) or len(x.users) != 1 or not x.args:
        return None
    name = x.target if isinstance(x.target, str) else getattr(x.target, "__name__", "")
    if name not in _BROADCASTS or not isinstance(x.args[0], fx.Node):
        return None
    before, after = an.shape(x.args[0]), an.shape(x)
    if not is_tensor_shape(before) or not is_tensor_shape(after) or len(before) != len(after):
        return None
    return x if before[d] == 1 and after[d] > 1 else None


def repeat_kv(an: Analysis, node: fx.Node, v: ChannelInfo, in_shape: tuple, merged: tuple) -> Any:
    """In query-heads mode, a reshape merging a kv-head dim with the ``n_rep`` dim that an
    ``expand`` broadcast (``repeat_kv``), feeding attention: one fresh unit per query head; the
    kv heads are pinned. None (the ordinary flatten rule applies) in every other case."""
    start, end = merged
    cd = v.dim
    if not query_heads_mode(an) or (start, end) != (cd, cd + 1):
        return None
    src = _broadcast_source(an, node.args[0] if node.args else None, cd + 1)
    if src is None or not _feeds_contraction(node):
        return None
    kv, rep = in_shape[cd], in_shape[cd + 1]
    why = (f"key/value heads stay under structures 'query-heads' (query heads go within each kv group): "
           f"{describe(node)} repeats {kv} key/value heads for {kv * rep} query heads (repeat_kv)")
    an.units.pin(v.units, why)
    fresh = an.units.new_atom(("out", node.name, cd), kv * rep, "repeat")
    an.rewrite_literal(src, "repeat_kv", (fresh, kv, cd + 1, node.name))
    return ChannelInfo(cd, fresh)


__all__ = ["query_heads_mode", "repeat_kv"]
