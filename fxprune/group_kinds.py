"""Group kinds: which structure of the model a group's channels are, read from the coupling analysis.

Every group gets one kind, so a policy can prune each structure by its own ratio
(``Policy(structures={"heads": 0.25, "mlp": 0.5})``):

============  ===========================================================================
kind          what one channel of the group is
============  ===========================================================================
``channel``   a conv channel, or any other width that is none of the kinds below
``head``      one attention head (its q/k/v rows and its columns of the output projection)
``kv-group``  one key/value head together with the query heads that share it (grouped-query
              attention: Llama, Mistral, Qwen2)
``hidden``    one channel of the residual stream / embedding width of a transformer
``mlp``       one channel of the intermediate width of a transformer MLP (``fc1 -> fc2``, and
              gated SwiGLU: ``gate`` and ``up`` rows with the ``down`` column)
``query-      one query head of grouped-query attention, the key/value heads left whole; only
heads``       when ``structures`` names this kind (it switches the coupling from ``kv-group``,
              :mod:`fxprune.coupling.gqa_rules`), and every kv group loses as many query heads
              as the others (the group's ``blocks``)
============  ===========================================================================

The rules (:data:`RULES`) are tried in table order, each over all groups not yet classified,
so a later rule may read the kinds that earlier rules gave (``mlp`` reads ``hidden``):

0. **query-heads**: the group holds the query-head units of a ``repeat_kv`` (only in query-heads
   mode); its ``blocks`` are the query heads of each kv group.
1. **kv-group**: a head split (below) in the group shows more heads than the group has
   channels: several query heads land on one channel, because the key/value heads they share
   are repeated for them (``repeat_kv``: ``expand`` + ``reshape``).
2. **head**: the group holds units that a head split made. A head split is a view
   ``(..., C) -> (..., heads, C // heads)`` feeding attention, found by
   :func:`fxprune.coupling.attention_rules.split_heads` (it records a ``view_dims`` literal
   with one unit per head, fewer than the channels it reads), or the head space that
   ``nn.MultiheadAttention`` gets when it is rewritten into its functional form (its
   ``attention`` literal; with ``multihead_attention_dims`` one unit per head dim, also ``head``).
3. **hidden**: an ``Embedding``, ``LayerNorm`` or ``RMSNorm`` acts on the group's channels: it
   owns a per-channel parameter of the group, or a member node is its call or runs inside it
   (``node.meta["nn_module_stack"]``, which torch.export keeps for decomposed norms such as
   Llama's RMSNorm). Subclasses and look-alikes count by class name (``LayerNorm2d``,
   ``LlamaRMSNorm``, ``T5LayerNorm``). A stream written by a conv (ViT's patch embedding,
   ConvNeXt) is ``hidden`` too when such a norm acts on it.
4. **hidden**: the group's producers are the output projections of ``head`` or ``kv-group``
   groups (attention writes the residual stream), for streams no norm shows.
5. **mlp**: every producer and consumer of the group is a 2-D weight (``Linear``, HF
   ``Conv1D``, ...), and every consumer writes a ``hidden`` group narrower or wider than this one
   (an MLP inside a transformer block; a classifier's ``Linear -> Linear`` stays ``channel``).
6. **channel**: everything else (conv channels with BatchNorm, classifier features).

Example:
    >>> import torch, fxprune
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.norm, self.fc1, self.fc2 = torch.nn.LayerNorm(8), torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)
    ...     def forward(self, x):
    ...         return x + self.fc2(torch.relu(self.fc1(self.norm(x))))
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), Block())
    >>> p = fxprune.plan(net, fxprune.Policy(ratio=0.5), (torch.randn(2, 4),))
    >>> [(g.size, g.kind) for g in p.groups]
    [(8, 'hidden'), (32, 'mlp')]
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

KINDS = ("channel", "head", "kv-group", "hidden", "mlp", "query-heads")

# Kinds whose channels are whole attention heads (``round_to`` counts their channel width).
HEAD_KINDS = ("head", "kv-group", "query-heads")

# Accepted spellings of each kind in ``Policy(structures=...)``: singular or plural, ``-`` or ``_``.
SPELLINGS = {
    "channel": "channel", "channels": "channel",
    "head": "head", "heads": "head",
    "kv-group": "kv-group", "kv-groups": "kv-group", "kv_group": "kv-group", "kv_groups": "kv-group",
    "hidden": "hidden",
    "mlp": "mlp", "mlps": "mlp",
    "query-heads": "query-heads", "query-head": "query-heads", "query_heads": "query-heads",
    "query_head": "query-heads",
}

# Class names (any class in a module's MRO, or the last part of an ``nn_module_stack`` type
# string) whose modules act on the residual stream's channels.
_STREAM_CLASS_ENDINGS = ("LayerNorm", "LayerNorm2d", "RMSNorm", "Embedding", "EmbeddingBag")


def canonical_kind(key: Any) -> str | None:
    """The kind a ``structures`` key names (``"heads"`` -> ``"head"``), or None.

    Example:
        >>> canonical_kind("heads"), canonical_kind("KV-Groups"), canonical_kind("attn")
        ('head', 'kv-group', None)
    """
    return SPELLINGS.get(key.strip().lower()) if isinstance(key, str) else None


class Facts(NamedTuple):
    """What the rules read, computed once per analysis."""

    head_groups: set          # groups holding units of a head split
    shared_groups: set        # groups where a head split shows several heads per channel
    stream_groups: set        # groups that an Embedding/LayerNorm/RMSNorm acts on
    producer_group: dict      # parameter target -> groups it produces channels of
    by_id: dict               # group id -> group
    two_d: Callable[[str], bool]  # is this parameter a 2-D weight?
    query_groups: dict        # group id -> blocks of query-head channels (repeat_kv, query-heads mode)


class Rule(NamedTuple):
    """One row of the table: ``kind`` when ``test(group, facts, kinds so far)``; ``why`` says when."""

    kind: str
    test: Callable[[Any, Facts, dict], bool]
    why: str


def _is_query_heads(g, facts: Facts, kinds: dict) -> bool:
    return g.id in facts.query_groups


def _is_kv_group(g, facts: Facts, kinds: dict) -> bool:
    return g.id in facts.shared_groups


def _is_head(g, facts: Facts, kinds: dict) -> bool:
    return g.id in facts.head_groups


def _is_stream(g, facts: Facts, kinds: dict) -> bool:
    return g.id in facts.stream_groups


def _written_by_attention(g, facts: Facts, kinds: dict) -> bool:
    attention = {p.target for gid, kind in kinds.items() if kind in HEAD_KINDS
                 for p in facts.by_id[gid].consumers}
    return any(p.target in attention for p in g.producers)


def _is_mlp(g, facts: Facts, kinds: dict) -> bool:
    weights = [p for p in g.params if p.role in ("producer", "consumer")]
    if not g.consumers or not weights or not all(facts.two_d(p.target) for p in weights):
        return False
    for c in g.consumers:
        written = [o for o in facts.producer_group.get(c.target, ()) if o is not g]
        if not written or any(kinds.get(o.id) != "hidden" or o.size == g.size for o in written):
            return False
    return True


def _always(g, facts: Facts, kinds: dict) -> bool:
    return True


RULES: tuple[Rule, ...] = (
    Rule("query-heads", _is_query_heads, "query heads of a repeat_kv, pruned within each kv group (query-heads mode)"),
    Rule("kv-group", _is_kv_group, "a head split shows several query heads per channel (grouped-query attention)"),
    Rule("head", _is_head, "units made by a head split (a view into heads feeding attention, MultiheadAttention)"),
    Rule("hidden", _is_stream, "an Embedding, LayerNorm or RMSNorm acts on the channels (the residual stream)"),
    Rule("hidden", _written_by_attention, "written by the output projection of attention heads"),
    Rule("mlp", _is_mlp, "Linear producers and consumers; the consumers write a hidden stream of another width"),
    Rule("channel", _always, "everything else: conv channels, other features"),
)


def _class_names(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj.rsplit(".", 1)[-1]]
    cls = obj if isinstance(obj, type) else type(obj)
    return [c.__name__ for c in getattr(cls, "__mro__", (cls,))]


def _acts_on_stream(obj: Any) -> bool:
    if obj is None:
        return False
    return _stream_class(obj if isinstance(obj, (str, type)) else type(obj))


@functools.lru_cache(maxsize=4096)  # read per member of every group: once per class instead
def _stream_class(cls_or_name: Any) -> bool:
    return any(name.endswith(_STREAM_CLASS_ENDINGS) for name in _class_names(cls_or_name))


def _innermost_module(node) -> Any:
    """The class of the innermost module a node ran in (a type or its dotted name), or None."""
    stack = node.meta.get("nn_module_stack") if node is not None else None
    if not stack:
        return None
    entry = list(stack.values())[-1]
    return entry[1] if isinstance(entry, tuple) and len(entry) > 1 else entry


def _head_splits(an, group_of_unit: Callable[[int], int | None]) -> tuple[set, set]:
    """(groups holding head units, groups where one split shows several heads per channel)."""
    nodes = {n.name: n for n in an.gm.graph.nodes}
    heads, shared = set(), set()
    find = an.units.find
    for name, (kind, payload) in an.literals.items():
        if kind == "view_dims":
            reps = payload[0]
            node = nodes.get(name)
            source = an.tensor_info(node.args[0]) if node is not None and node.args else None
            if not reps or source is None or len(reps) >= len(source.units):
                continue  # a reshuffle of the channels (channel shuffle), not a head split
        elif kind in ("attention", "window_attention"):  # rewrite/window_attention.py: same payload
            reps = payload[0][0]
        else:
            continue
        found = {group_of_unit(u) for u in reps} - {None}
        heads |= found
        if kind == "view_dims" and len({find(u) for u in reps}) < len(reps):
            shared |= found
    return heads, shared


def _query_blocks(an, groups: list, group_of_unit: Callable[[int], int | None]) -> dict[int, tuple]:
    """``{group id: blocks}`` for groups holding the query-head units of a ``repeat_kv`` literal
    (``fxprune.coupling.gqa_rules``): each block is the channels of one kv group's query heads,
    read off the reshape that lays them out."""
    out: dict[int, tuple] = {}
    by_id = {g.id: g for g in groups}
    for kind, payload in an.literals.values():
        if kind != "repeat_kv":
            continue
        units, kv, _dim, reshape = payload
        gid = group_of_unit(units[0])
        g = by_id.get(gid)
        member = next((m for m in g.members if m.node == reshape), None) if g is not None else None
        if member is None or gid in out or len(member.channels) != len(units):
            continue
        rep = len(units) // kv
        out[gid] = tuple(tuple(member.channels[b * rep:(b + 1) * rep]) for b in range(kv))
    return out


def _stream_groups(an, groups: list) -> set:
    nodes = {n.name: n for n in an.gm.graph.nodes}
    out = set()
    for g in groups:
        owners = {p.owner for p in g.params}
        if any(_acts_on_stream(an.modules.get(o)) for o in owners):
            out.add(g.id)
            continue
        for m in g.members:
            node = nodes.get(m.node)
            called = an.modules.get(node.target) if node is not None and node.op == "call_module" else None
            if _acts_on_stream(called) or _acts_on_stream(_innermost_module(node)):
                out.add(g.id)
                break
    return out


def classify(an, groups: list, group_of_unit: Callable[[int], int | None]) -> dict[int, str]:
    """``{group id: kind}`` for ``groups`` of the analysis ``an`` by the table :data:`RULES`;
    ``group_of_unit(u)`` is the group index of channel unit ``u`` (None: in no group). Sets the
    ``blocks`` of ``query-heads`` groups.

    Example:
        >>> import torch
        >>> from fxprune.shapes import propagate
        >>> from fxprune.coupling.build import analyse
        >>> from fxprune.coupling.groups import build_groups
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 2, 1)))
        >>> _ = propagate(gm, (torch.randn(1, 3, 4, 4),))
        >>> [g.kind for g in build_groups(analyse(gm), lambda owner: False)[0]]
        ['channel', 'channel']
    """
    heads, shared = _head_splits(an, group_of_unit)
    producer_group: dict[str, list] = {}
    for g in groups:
        for p in g.producers:
            producer_group.setdefault(p.target, []).append(g)
    dims: dict[str, bool] = {}

    def two_d(target: str) -> bool:
        if target not in dims:
            dims[target] = an.param_tensor(target).dim() == 2
        return dims[target]

    query = _query_blocks(an, groups, group_of_unit)
    facts = Facts(heads, shared, _stream_groups(an, groups), producer_group, {g.id: g for g in groups}, two_d,
                  query)
    kinds: dict[int, str] = {}
    for rule in RULES:
        for g in groups:
            if g.id not in kinds and rule.test(g, facts, kinds):
                kinds[g.id] = rule.kind
    for g in groups:
        g.blocks = query.get(g.id, ())
    return kinds


__all__ = ["HEAD_KINDS", "KINDS", "RULES", "SPELLINGS", "Rule", "canonical_kind", "classify"]
