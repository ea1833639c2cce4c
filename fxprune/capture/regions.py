"""Context-manager regions of an exported graph: inline the ones that do not change values.

``torch.export`` records a ``with torch.autocast(...)`` block or a ``torch.no_grad()`` /
``torch.set_grad_enabled(...)`` block inside ``forward`` as one higher-order op calling a
submodule graph (a ``get_attr`` GraphModule argument), whose outputs are read by ``getitem``:

- ``torch.ops.higher_order.wrap_with_autocast(device_type, dtype, enabled, cache_enabled, body, *args)``
- ``torch.ops.higher_order.wrap_with_set_grad_enabled(enabled, body, *args)``

Such a call would be one opaque op, blocking every channel through it. Where the region cannot
change the forward values it is *inlined*: the body's ops take its place in the outer graph,
so they reach the op table like any other op. Grad mode never changes forward values; an
autocast region with ``enabled=False`` runs its ops in the dtypes they get. Its inlined ops are
bracketed by ``torch.amp._enter_autocast(device, dtype, False, cache)`` and
``torch.amp._exit_autocast`` nodes (the form dynamo's graphs use; torch.fx counts both as side
effects, so no pass drops them): a pruned module run under a caller's enabled autocast keeps
those ops out of it, as the original does. An enabled autocast region changes dtypes, so it
stays as it is and blocks with ``region_reason``'s reason.

Example:
    >>> import torch
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = torch.nn.Conv2d(3, 4, 1)
    ...     def forward(self, x):
    ...         with torch.autocast("cpu", enabled=False):
    ...             return self.conv(x).relu()
    >>> gm = torch.export.export(Net(), (torch.randn(1, 3, 4, 4),), strict=False).module()
    >>> inline_regions(gm)
    1
    >>> any(isinstance(n.target, torch._ops.HigherOrderOperator) for n in gm.graph.nodes)
    False
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .relift import resolve

_HOPS = torch.ops.higher_order
AUTOCAST = getattr(_HOPS, "wrap_with_autocast", None)
SET_GRAD = getattr(_HOPS, "wrap_with_set_grad_enabled", None)

# op -> (position of the submodule argument, position of the `enabled` flag or None)
REGION_OPS: dict[Any, tuple[int, int]] = {op: layout for op, layout in
                                          ((AUTOCAST, (4, 2)), (SET_GRAD, (1, 0))) if op is not None}


def is_region(node: fx.Node) -> bool:
    """Whether ``node`` calls a context-manager region op (autocast or grad mode).

    Example:
        >>> is_region(fx.symbolic_trace(torch.nn.ReLU()).graph.find_nodes(op="output")[0])
        False
    """
    return node.op == "call_function" and node.target in REGION_OPS


def inlinable(node: fx.Node) -> bool:
    """A region whose ops compute the same values outside it: grad mode, or autocast disabled.

    Example:
        >>> g = fx.Graph()
        >>> body = g.get_attr("submod_0")
        >>> inlinable(g.call_function(AUTOCAST, ("cpu", torch.bfloat16, False, False, body)))
        True
        >>> inlinable(g.call_function(AUTOCAST, ("cpu", torch.bfloat16, True, False, body)))
        False
    """
    if not is_region(node):
        return False
    if node.target is SET_GRAD:
        return True
    enabled = node.args[REGION_OPS[node.target][1]] if len(node.args) > 2 else None
    return enabled is False


def region_reason(node: fx.Node) -> str | None:
    """Why a region left in the graph blocks its channels (None: ``node`` is no region).

    Example:
        >>> g = fx.Graph()
        >>> n = g.call_function(AUTOCAST, ("cpu", torch.bfloat16, True, None, g.get_attr("submod_0")))
        >>> print(region_reason(n).replace(": ", ":\\n"))
        autocast region (enabled) changes dtypes:
        torch.autocast('cpu', dtype=torch.bfloat16) around submod_0 at node 'wrap_with_autocast'
    """
    if not is_region(node):
        return None
    body = node.args[REGION_OPS[node.target][0]] if len(node.args) > REGION_OPS[node.target][0] else None
    around = f" around {body.target}" if isinstance(body, fx.Node) and body.op == "get_attr" else ""
    at = f"{around} at node {node.name!r}"
    if node.target is AUTOCAST:
        device, dtype, enabled = (list(node.args[:3]) + [None] * 3)[:3]
        if enabled is True:
            return f"autocast region (enabled) changes dtypes: torch.autocast({device!r}, dtype={dtype}){at}"
        return f"autocast region (enabled={enabled!r}) could not be inlined{at}"
    return f"grad-mode region could not be inlined{at}"


def _adopt(gm: fx.GraphModule, value: Any, hint: str) -> str:
    """Register ``value`` (a body's own attribute) on ``gm`` under a fresh top-level name."""
    base = "region_" + hint.replace(".", "_")
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    if isinstance(value, nn.Module):
        gm.add_module(name, value)
    elif isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        gm.register_buffer(name, value, persistent=False)
    else:
        setattr(gm, name, value)
    return name


def _splice(gm: fx.GraphModule, node: fx.Node, body: fx.GraphModule, operands: tuple) -> list | None:
    """Copy ``body``'s ops before ``node`` with its inputs bound to ``operands``; its outputs, or
    None where the body does not take exactly these inputs."""
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(operands):
        return None
    env: dict[fx.Node, Any] = dict(zip(placeholders, operands))
    outputs: Any = None
    with gm.graph.inserting_before(node):
        context = _enter_disabled_autocast(gm, node)
        for inner in body.graph.nodes:
            if inner.op == "placeholder":
                continue
            if inner.op == "output":
                outputs = fx.node.map_arg(inner.args[0], lambda n: env[n])
            elif inner.op == "get_attr":
                env[inner] = gm.graph.get_attr(_adopt(gm, resolve(body, inner.target), inner.target))
            else:
                env[inner] = gm.graph.node_copy(inner, lambda n: env[n])
        if context is not None:
            gm.graph.call_function(torch.amp._exit_autocast, (context,))
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


def _enter_disabled_autocast(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """For a disabled autocast region, the node entering it again in the outer graph (its ops
    follow, then ``_exit_autocast``); None for a grad-mode region (no forward effect)."""
    if node.target is not AUTOCAST:
        return None
    device, dtype, enabled, cache = node.args[:4]
    return gm.graph.call_function(torch.amp._enter_autocast, (device, dtype, enabled, cache))


def _inline_one(gm: fx.GraphModule, node: fx.Node) -> bool:
    body_pos = REGION_OPS[node.target][0]
    body_node = node.args[body_pos]
    if node.kwargs or not (isinstance(body_node, fx.Node) and body_node.op == "get_attr"):
        return False
    users = list(node.users)
    if not all(u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
               for u in users):
        return False
    body = resolve(gm, body_node.target)
    if not isinstance(body, fx.GraphModule):
        return False
    inline_regions(body)  # nested regions first
    outputs = _splice(gm, node, body, tuple(node.args[body_pos + 1:]))
    if outputs is None:
        return False
    for user in users:
        user.replace_all_uses_with(outputs[user.args[1]])
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    if not body_node.users:
        gm.graph.erase_node(body_node)
        if not any(n.op == "get_attr" and n.target == body_node.target for n in gm.graph.nodes):
            gm.delete_submodule(body_node.target)
    return True


def inline_regions(gm: fx.GraphModule) -> int:
    """Inline, in place, every region of ``gm`` that ``inlinable`` accepts (nested ones too);
    returns how many were inlined at this level. Others stay, to block with ``region_reason``.

    Example:
        >>> gm = fx.symbolic_trace(torch.nn.ReLU())
        >>> inline_regions(gm)
        0
    """
    count = 0
    for node in list(gm.graph.nodes):
        if inlinable(node) and _inline_one(gm, node):
            count += 1
    if count:
        gm.recompile()
    return count


__all__ = ["AUTOCAST", "SET_GRAD", "REGION_OPS", "inlinable", "inline_regions", "is_region", "region_reason"]
