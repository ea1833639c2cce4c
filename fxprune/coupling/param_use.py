"""Layers whose weight or bias is computed from parameters: what they declare (see ``param_expr``).

``F.linear`` / ``F.conv*`` / ``F.conv_transpose*`` may read a weight or bias that a chain of
:mod:`fxprune.coupling.param_expr` computes row by row. The layer slices the chain's sources
instead of one parameter: each source ``(target, dim, start)`` follows the rows ``start ..`` of the
layer's row units (output channels; input channels for a transposed convolution's weight), each
literal row count (a reshape's entry, ``torch.zeros(n)``'s size) is rewritten to the kept count,
and a chain mixing the entries of a row makes the channels of those entries approximate. A
weight or bias that is no chain blocks the layer with :func:`not_rowwise`'s reason.

Example (BEiT's attention: a zero key bias between two learned ones)::

    >>> import torch, fxprune, torch.nn.functional as F
    >>> class QKV(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.qkv = torch.nn.Linear(4, 6, bias=False)
    ...         self.q_bias, self.v_bias = torch.nn.Parameter(torch.randn(2)), torch.nn.Parameter(torch.randn(2))
    ...     def forward(self, x):
    ...         b = torch.cat((self.q_bias, torch.zeros(2), self.v_bias))
    ...         return F.linear(x, self.qkv.weight, b).relu() @ torch.ones(6, 3)
    >>> p = fxprune.plan(QKV(), fxprune.Policy(ratio=0.5), (torch.randn(2, 4),))
    >>> [(g.size, g.kept) for g in p.groups if g.removed]
    [(6, 3)]
    >>> sorted(t for t, _ in p.analysis.params if "bias" in t)
    ['q_bias', 'v_bias']
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from . import param_consumers as PC
from . import param_expr as PE
from . import rules as R
from .param_expr import ParamExpr
from .state import Analysis, ChannelInfo, ParamRef


def not_rowwise(an: Analysis, value: fx.Node) -> str:
    """Why the value of node ``value`` (a layer's weight or bias) is no chain: the first node on
    its way from the parameters where the rows stop being apart, a model input it reads, or the
    other readers of an expression that is row-wise.

    Example:
        >>> import torch
        >>> from fxprune.shapes import propagate
        >>> class Gram(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = torch.nn.Parameter(torch.randn(4, 4))
        ...     def forward(self, x):
        ...         return torch.nn.functional.linear(x, torch.matmul(self.w, self.w))
        >>> gm = torch.fx.symbolic_trace(Gram())
        >>> _ = propagate(gm, (torch.randn(2, 4),))
        >>> not_rowwise(Analysis(gm), list(gm.graph.nodes)[-2].args[1])
        "is computed at node 'matmul' (call_function matmul), which is not in param_expr's row-wise op table"
    """
    adopted, exprs = PE._cached(an)
    if value.name in exprs:
        e = exprs[value.name]
        others = [R.describe(u) for u in value.users if u.name not in adopted and not PC.consumes(an, u, value, e, exprs)]
        if others:
            return f"is computed row by row at node {value.name!r} but also read by {', '.join(others)}"
        return (f"is computed row by row at node {value.name!r}, but its rows (shape {e.shape}, rows on dim "
                f"{e.row_dim}) are not one parameter's rows on dim 0 with per-row factors")
    todo, seen = [value], set()
    while todo:  # depth first towards the parameters: the earliest node that is not row-wise
        n = todo.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        if n.op == "placeholder":
            return f"is computed from model input {n.name!r}"
        later = [a for a in n.all_input_nodes if a.name not in exprs] if n.target not in PE.CREATION_OPS else []
        if later:
            todo.extend(later)
            continue
        known = n.target in PE.CHAIN_OPS or n.target in PE.CREATION_OPS
        how = "does not keep the rows (output channels) of its parameters apart" if known \
            else "is not in param_expr's row-wise op table"
        return f"is computed at node {n.name!r} ({R.describe(n).split(' at node ')[0]}), which {how}"
    return "is not a get_attr parameter"


def operand_reason(an: Analysis, node: fx.Node) -> str:
    """Why a layer's weight or bias (arguments 1 and 2) is neither a parameter nor a chain ("" if both are).

    Example:
        >>> import torch
        >>> gm = torch.fx.symbolic_trace(torch.nn.Identity())
        >>> operand_reason(Analysis(gm), list(gm.graph.nodes)[0])
        ''
    """
    for pos, what in ((1, "weight"), (2, "bias")):
        a = R.arg(node, pos, what)
        if isinstance(a, fx.Node) and not isinstance(an.value(a), (ParamRef, ParamExpr)):
            return f"its {what} {not_rowwise(an, a)}"
    return ""


def weight_of(an: Analysis, node: fx.Node) -> tuple[str | None, ParamExpr | None]:
    """(parameter target, expression) of a layer's weight argument: a plain parameter
    (expression None), a chain's main source, or (None, None).

    Example:
        >>> import torch
        >>> gm = torch.fx.symbolic_trace(torch.nn.Identity())
        >>> weight_of(Analysis(gm), list(gm.graph.nodes)[0])
        (None, None)
    """
    v = an.value(R.arg(node, 1, "weight"))
    if isinstance(v, ParamRef):
        return v.target, None
    if isinstance(v, ParamExpr):
        return PC.main_source(an, v), v
    return None, None


def declare(an: Analysis, node: fx.Node, e: ParamExpr, weight: str | None, rows: tuple | None,
            columns: tuple | None, producers: tuple = ()) -> None:
    """What a layer consuming ``e`` (its weight, main source ``weight``, or its bias: ``weight``
    None) adds to the plan: every other source follows its segment of ``rows`` (the units of
    the value's rows; None: they never shrink), the literal row counts follow them, and
    ``columns`` (the channels of a row's entries the layer slices, if any) are inexact when the
    chain mixes the entries of a row. ``producers``: sources the layer slices itself (a weight
    concatenated from several parameters).

    Example:
        >>> import torch
        >>> gm = torch.fx.symbolic_trace(torch.nn.Identity())
        >>> declare(Analysis(gm), list(gm.graph.nodes)[0], ParamExpr((2,), None), None, None, None)
    """
    what = f"weight computed from {weight}" if weight else "bias computed from parameters"
    why = f"{R.describe(node)}: {what}"
    if rows is not None:
        owner = weight or next((t for t, _, _ in e.sources), node.name)
        for target, dim, start in e.sources:
            if target != weight and target not in producers:
                n = an.param_tensor(target).shape[dim]
                an.slice_param(target, dim, "passenger", rows[start:start + n], owner, why)
        for lit, kind, j, start, count in e.literals:
            _literal(an, lit, kind, j, tuple(rows[start:start + count]), why)
    if e.mixes and columns:
        an.units.mark_inexact(columns, f"{e.mixes}: removing a channel that {R.describe(node)} slices in each "
                                       "weight row changes the kept weights")


def _literal(an: Analysis, lit: str, kind: str, j: int, units: tuple, why: str) -> None:
    """Ask for node ``lit``'s literal entry ``j`` to become the kept count of ``units``; a literal
    read for a second layer couples the two unit ranges (one size for both)."""
    prior = an.literals.get(lit)
    if prior is not None and prior[0] == kind:
        old = prior[1][1] if kind == "shape_entry" else prior[1][0]
        an.units.union(old, units, "shared", f"size literal of node {lit!r} read for several layers ({why})")
        return
    an.rewrite_literal(lit, kind, (j, units) if kind == "shape_entry" else (units, j))


def linear(an: Analysis, node: fx.Node) -> Any:
    """``F.linear`` whose weight or bias is computed (a chain of ``param_expr``): as a linear on
    parameters, the chain's sources following the output channels; otherwise blocked, naming
    where the rows stop being apart."""
    why = operand_reason(an, node)
    x, w_node, b_node = R.arg(node, 0, "input"), R.arg(node, 1, "weight"), R.arg(node, 2, "bias")
    nd = R.ndim(an, x)
    if why or nd is None:
        _freeze_all(an, node, (an.value(w_node), an.value(b_node)))
        return R.opaque(an, node, f"{R.describe(node)}: {why or 'its input has no known shape'}")
    weight, wexpr = weight_of(an, node)
    b = an.value(b_node) if b_node is not None else None
    bias, bexpr = (b.target, None) if isinstance(b, ParamRef) else (None, b)
    cols = ((weight, 0),) if weight is not None else PC.column_sources(an, wexpr) if wexpr is not None else None
    if cols is None:
        _freeze_all(an, node, (wexpr, bexpr))
        return R.opaque(an, node, f"{R.describe(node)}: its weight {not_rowwise(an, w_node)}")
    params = (*(t for t, _ in cols), bias, *(t for e in (wexpr, bexpr) if e is not None for t, _, _ in e.sources))
    through = R.batch_dim_channels(an, node, x, nd - 1, params)
    if through is not None:
        return through
    if weight is not None:
        out = R.contract(an, node, x, nd - 1, weight, 1, 0, an.param_tensor(weight).shape[0], bias, weight, nd - 1)
    else:
        out = _stacked(an, node, x, nd - 1, wexpr.rows, cols, bias)
    if isinstance(out, ChannelInfo):
        v = an.tensor_info(x)
        if wexpr is not None:
            declare(an, node, wexpr, weight, out.units, v.units if v is not None and v.dim == nd - 1 else None,
                    producers=tuple(t for t, _ in cols))
        if bexpr is not None:
            declare(an, node, bexpr, None, out.units, None)
    return out


def _freeze_all(an: Analysis, node: fx.Node, values: tuple) -> None:
    """``freeze`` each computed parameter among ``values`` (a blocked ``node`` reads them whole)."""
    for e in values:
        if isinstance(e, ParamExpr):
            freeze(an, e, f"{R.describe(node)} is blocked")


def _stacked(an: Analysis, node: fx.Node, x: Any, x_dim: int, rows: int, cols: tuple, bias: str | None) -> ChannelInfo:
    """A linear whose weight is several parameters laid end to end over its rows (``cols``: target
    and first row): each consumes the input channels and produces its segment of the outputs."""
    why = f"{R.describe(node)}: weight concatenated from {', '.join(t for t, _ in cols)}"
    v = an.tensor_info(x)
    if v is not None and v.dim == x_dim:
        for target, _ in cols:
            an.slice_param(target, 1, "consumer", v.units, target, why)
    else:
        an.pin_value(an.value(x), f"{R.describe(node)} contracts a dim that fxprune does not track")
    units = an.units.new_atom(("out", node.name, x_dim), rows, "producer")
    for target, start in cols:
        an.slice_param(target, 0, "producer", units[start:start + an.param_tensor(target).shape[0]], target, why)
    if bias is not None:
        an.slice_param(bias, 0, "passenger", units, cols[0][0], why)
    return ChannelInfo(x_dim, units)


def freeze(an: Analysis, e: ParamExpr, why: str) -> None:
    """An op that cannot slice ``e`` reads all of it: its sources keep their shape.

    Example:
        >>> import torch
        >>> an = Analysis(torch.fx.symbolic_trace(torch.nn.Identity()))
        >>> freeze(an, ParamExpr((2,), 0, (("w", 0, 0),)), "demo"); an.frozen_params
        {'w': 'demo'}
    """
    for target, _, _ in e.sources:
        an.frozen_params.setdefault(target, why)


def elementwise_table(an: Analysis, node: fx.Node, e: ParamExpr, od: int, nd: int, units: tuple) -> bool:
    """An operand ``e`` of the elementwise op ``node`` whose output (``nd`` dims) carries ``units``
    on dim ``od``: its rows on ``od`` follow them, rows elsewhere (or none) keep their shape;
    False (the op blocks) when ``e`` has more than one entry on ``od`` that are not its rows.

    Example:
        >>> import torch
        >>> gm = torch.fx.symbolic_trace(torch.nn.Identity())
        >>> gm.s = torch.nn.Parameter(torch.ones(3, 1))
        >>> an = Analysis(gm)
        >>> elementwise_table(an, list(an.gm.graph.nodes)[0], ParamExpr((3, 1), 0, (("s", 0, 0),)), 1, 3, (0, 1, 2))
        True
        >>> an.params[("s", 0)].units
        (0, 1, 2)
    """
    pd = od - (nd - len(e.shape))
    if pd >= 0 and pd == e.row_dim and e.rows == len(units) > 1:
        declare(an, node, e, None, units, None)
        return True
    why = f"elementwise {R.describe(node)}: a computed operand's rows are not its channels"
    freeze(an, e, why)
    return pd < 0 or e.shape[pd] == 1
