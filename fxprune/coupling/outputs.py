"""The model outputs: which ones keep their width (``Policy.prune_outputs``).

By default every channel that reaches a model output is pinned, so the output width never
changes. ``Policy(prune_outputs=True)`` pins none of them, and a list of output indices/names
pins all but those. An output is a top-level entry of what the model returns: the tensor itself
(index 0), an element of a returned tuple/list (its position) or of a returned dict or
``ModelOutput`` (its position and its key). Graphs captured with torch.export return a flat list
of leaves rebuilt by pytree code; their entries are read from the graph's output spec.

Example:
    >>> import torch
    >>> class Two(torch.nn.Module):
    ...     def forward(self, x):
    ...         return {"a": x + 1, "b": (x, x * 2)}
    >>> gm = torch.fx.symbolic_trace(Two())
    >>> [(i, name, len(nodes)) for i, name, nodes in output_entries(gm.graph)]
    [(0, 'a', 1), (1, 'b', 2)]
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from ..errors import PolicyError

OUTPUT_REASON = "reaches a model output"


def _nodes(value: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(value, out.append)
    return out


def _spec(graph: fx.Graph) -> Any:
    """The pytree output spec of a graph with pytree code (torch.export captures), else None."""
    info = getattr(getattr(graph, "_codegen", None), "pytree_info", None)
    return getattr(info, "out_spec", None)


def _names(spec: Any) -> list | None:
    context = getattr(spec, "context", None)
    if isinstance(context, (list, tuple)) and len(context) == spec.num_children:
        return [str(k) for k in context]
    return None


def output_entries(graph: fx.Graph) -> list[tuple[int, str | None, list[fx.Node]]]:
    """``(index, name or None, nodes)`` of every top-level model output of ``graph``."""
    out_node = next((n for n in reversed(graph.nodes) if n.op == "output"), None)
    if out_node is None or not out_node.args:
        return []
    value = out_node.args[0]
    spec = _spec(graph)
    if spec is not None and isinstance(value, (list, tuple)):
        if spec.is_leaf() or spec.num_children == 0:
            return [(0, None, _nodes(value))]
        names, start, entries = _names(spec), 0, []
        for i, child in enumerate(spec.children_specs):
            leaves = value[start:start + child.num_leaves]
            start += child.num_leaves
            entries.append((i, names[i] if names else None, _nodes(list(leaves))))
        return entries
    if isinstance(value, dict):
        return [(i, str(k), _nodes(v)) for i, (k, v) in enumerate(value.items())]
    if isinstance(value, (list, tuple)):
        return [(i, None, _nodes(v)) for i, v in enumerate(value)]
    return [(0, None, _nodes(value))]


def label(index: int, name: str | None) -> str:
    """How the report names an output: ``#1`` or ``'logits'``.

    Example:
        >>> label(0, None), label(1, "logits")
        ('#0', "'logits'")
    """
    return f"#{index}" if name is None else repr(name)


def check_selection(graph: fx.Graph, prune_outputs: Any) -> None:
    """Raise :class:`fxprune.PolicyError` when ``prune_outputs`` lists an output the model lacks.

    Example:
        >>> import torch
        >>> gm = torch.fx.symbolic_trace(torch.nn.ReLU())
        >>> check_selection(gm.graph, [2])
        Traceback (most recent call last):
        ...
        fxprune.errors.PolicyError: prune_outputs: 2 is no output of the model (its outputs: 0)
    """
    if isinstance(prune_outputs, bool) or not prune_outputs:
        return
    entries = output_entries(graph)
    known = {i for i, _, _ in entries} | {n for _, n, _ in entries if n is not None}
    missing = [k for k in prune_outputs if k not in known]
    if missing:
        shown = ", ".join(str(i) if n is None else f"{i} {n!r}" for i, n, _ in entries) or "none"
        raise PolicyError(f"prune_outputs: {', '.join(map(repr, missing))} "
                          f"{'is' if len(missing) == 1 else 'are'} no output of the model (its outputs: {shown})")


def narrowed(prune_outputs: Any, index: int, name: str | None) -> bool:
    """True when ``prune_outputs`` (a Policy field value) lets this output lose channels.

    Example:
        >>> narrowed(True, 0, None), narrowed(False, 0, None), narrowed(("aux",), 1, "aux")
        (True, False, True)
    """
    if isinstance(prune_outputs, bool):
        return prune_outputs
    return index in prune_outputs or (name is not None and name in prune_outputs)


def pin_outputs(an, node: fx.Node, prune_outputs: Any) -> None:
    """Pin the channels of every output that ``prune_outputs`` does not narrow."""
    for index, name, nodes in output_entries(node.graph):
        if narrowed(prune_outputs, index, name):
            continue
        reason = f"{OUTPUT_REASON} ({label(index, name)})"
        for arg in nodes:
            an.pin_value(an.value(arg), reason)
