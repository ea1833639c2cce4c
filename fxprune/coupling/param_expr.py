"""Weights computed from parameters row by row (weight standardisation, scaled weights).

timm's ``StdConv2d`` / ``ScaledStdConv2d`` (NFNets, BiT) compute their weight at every call::

    w = F.batch_norm(self.weight.reshape(1, out, -1), None, None, weight=(gain * scale).view(-1),
                     training=True, momentum=0.).reshape_as(self.weight)
    return F.conv2d(x, w, self.bias, ..., self.groups)

Every op of that chain keeps the weight's output rows apart: row ``o`` of ``w`` depends only on row
``o`` of ``self.weight`` and entry ``o`` of ``gain``. Such a chain is a :class:`ParamExpr`: the
convolution slices the parameter's rows as its output channels (exact), ``gain`` as a passenger,
and the literal row count of the reshape follows the kept width. The standardisation mixes the
entries of a row, i.e. the input channels (and kernel taps): removing an input channel changes
the kept weights, so a group whose channels the convolution consumes through such a weight is
approximate, with the reason; a depthwise convolution has one input channel per row and stays
exact.

A bias (or a per-row table) may also be laid end to end from several sources along its rows: BEiT's,
EVA's and Swin v2's attention compute ``torch.cat((self.q_bias, self.k_bias, self.v_bias))`` (``k_bias``
a zero buffer; older versions ``torch.zeros_like(self.v_bias)``) and hand it to ``F.linear``. Each
source then covers a segment of the rows (``start`` in :attr:`ParamExpr.sources`), a constant made by
``torch.zeros(n)`` / ``x.new_zeros(n)`` covers its segment with its size literal, which the rewrite
sets to the kept count (:attr:`ParamExpr.literals`).

A chain is adopted only when every node of it is in :data:`CHAIN_OPS` (or makes a constant,
:data:`CREATION_OPS`), reads only parameters and other chain nodes, and feeds only chain nodes or a
linear/convolution that takes it as its weight or bias (:data:`CONSUMERS`), or an elementwise op
scaling or shifting a tensor by it, one value per row (Swin v2's ``logit_scale.clamp(max=...).exp()``
per head; :func:`chains`, computed once per graph before the rules run); anything else keeps the ordinary rules, which block it, and
:func:`not_rowwise` names the node where the rows stop being apart. The consumer side (what a layer
declares for such a weight or bias) is in :mod:`fxprune.coupling.param_use`.

Example:
    >>> import torch, fxprune, torch.nn.functional as F
    >>> class Std(torch.nn.Conv2d):
    ...     def forward(self, x):
    ...         w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
    ...                          training=True, momentum=0.).reshape_as(self.weight)
    ...         return F.conv2d(x, w, self.bias, groups=self.groups)
    >>> m = torch.nn.Sequential(Std(3, 8, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
    >>> p = fxprune.plan(m, fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 4, 4),))
    >>> [(g.size, g.kept, g.exact) for g in p.groups if g.removed]
    [(8, 4, True)]
"""
from __future__ import annotations

import dataclasses
import math
import operator
import weakref
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import rules as R
from .state import Analysis, ParamExpr
from .param_consumers import consumes
from .tensor_rules import CREATION_SIZE, creation_size
from ..shapes import is_tensor_shape


# ParamExpr lives in state.py beside ParamRef (rules test for it without importing this module)


def _leaf(an: Analysis, target: str) -> ParamExpr | None:
    t = an.param_tensor(target)
    shape = tuple(t.shape)
    if t.numel() == 1:
        return ParamExpr(shape, None)
    if not shape or shape[0] == 1:
        return None
    return ParamExpr(shape, 0, ((target, 0, 0),))


def _merge(shape: tuple, row_dim: int | None, parts: list, mixes: str | None = None, literals: tuple = (),
           offsets: list | None = None) -> ParamExpr:
    """One expression from ``parts``; ``offsets`` (one per part) move each part's rows (a concatenation)."""
    offsets = offsets or [0] * len(parts)
    sources = tuple(dict.fromkeys((t, d, s + o) for p, o in zip(parts, offsets) for t, d, s in p.sources))
    lits = tuple(dict.fromkeys((n, k, j, s + o, c) for p, o in zip(parts, offsets)
                               for n, k, j, s, c in p.literals)) + literals
    mix = next((p.mixes for p in parts if p.mixes), None) or mixes
    return ParamExpr(tuple(shape), row_dim, sources, lits, mix)


# -- one function per op kind: (an, node, expr of each node input) -> ParamExpr | None -------
def _elementwise(an: Analysis, node: fx.Node, ex: Callable) -> ParamExpr | None:
    out = an.shape(node)
    parts, row_dim = [], None
    for a in node.all_input_nodes:
        e = ex(a)
        parts.append(e)
        if e.row_dim is None:
            continue
        od = e.row_dim + len(out) - len(e.shape)
        if row_dim not in (None, od) or out[od] != e.rows:
            return None
        row_dim = od
    return _merge(out, row_dim, parts)


def _shape_entries(node: fx.Node) -> tuple[list, bool] | None:
    """The shape of a ``reshape``/``view`` call and whether it is packed in one list."""
    if "shape" in node.kwargs:
        return list(node.kwargs["shape"]), True
    rest = list(node.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        return list(rest[0]), True
    return rest, False


def _reshape(an: Analysis, node: fx.Node, ex: Callable) -> ParamExpr | None:
    """Rows stay outermost (only size-1 dims before them); the entries after them are -1, 1 or
    read at run time, so the columns may shrink; a literal row count is rewritten."""
    e, out = ex(node.args[0]), an.shape(node)
    if e.row_dim is None:
        return _merge(out, None, [e])
    if math.prod(e.shape[:e.row_dim]) != 1:
        return None
    j = next((i for i, s in enumerate(out) if s != 1), None)
    if j is None or out[j] != e.rows:
        return None
    literals: tuple = ()
    if node.target in ("reshape_as", "view_as"):  # the shape follows the other tensor's
        return _merge(out, j, [e, ex(node.args[1])])
    entries, _ = _shape_entries(node)
    if len(entries) != len(out):
        return None
    for i, s in enumerate(entries[j + 1:], j + 1):
        if isinstance(s, int) and s not in (-1, 1):
            return None  # a literal column count would not follow pruned input channels
    if isinstance(entries[j], int) and entries[j] != -1:
        literals = ((node.name, "shape_entry", j, 0, out[j]),)
    return _merge(out, j, [e], literals=literals)


def _reduction(an: Analysis, node: fx.Node, ex: Callable) -> ParamExpr | None:
    """mean/var/std/sum over dims other than the rows: each row's entries are mixed."""
    e, out = ex(node.args[0]), an.shape(node)
    dims = R.arg(node, 1, "dim", None)
    if e.row_dim is None:
        return _merge(out, None, [e])
    dims = [dims] if isinstance(dims, int) else dims
    if not dims or not all(isinstance(d, int) for d in dims):
        return None
    nd = len(e.shape)
    dims = {R.norm_dim(d, nd) for d in dims}
    if e.row_dim in dims:
        return None
    keep = len(out) == nd
    od = e.row_dim if keep else e.row_dim - sum(1 for d in dims if d < e.row_dim)
    why = f"{R.describe(node)} reduces each weight row over its input channels"
    return _merge(out, od, [e], mixes=why if any(e.shape[d] > 1 for d in dims) else None)


def _batch_norm(an: Analysis, node: fx.Node, ex: Callable) -> ParamExpr | None:
    """``F.batch_norm`` with batch statistics over a weight laid out (1, rows, entries)."""
    e, out = ex(node.args[0]), an.shape(node)
    if e.row_dim != 1 or R.arg(node, 1, "running_mean") is not None or R.arg(node, 2, "running_var") is not None:
        return None
    parts = [e]
    for pos, name in ((3, "weight"), (4, "bias")):
        a = R.arg(node, pos, name)
        if a is not None:
            p = ex(a)
            if p.row_dim is not None and (len(p.shape) != 1 or p.rows != e.rows):
                return None
            parts.append(p)
    mixed = any(s > 1 for d, s in enumerate(e.shape) if d != 1)
    why = f"{R.describe(node)} standardises each weight row over its input channels"
    return _merge(out, 1, parts, mixes=why if mixed else None)


def _weight_norm(an: Analysis, node: fx.Node, ex: Callable) -> ParamExpr | None:
    """``torch._weight_norm(v, g, dim=0)`` (weight-norm parametrization, as torch.export shows it):
    ``g * v / ||v||`` with the norm over each row: rows apart, entries of a row mixed."""
    v, g = ex(node.args[0]), ex(node.args[1])
    if R.arg(node, 2, "dim", 0) != 0 or v.row_dim != 0 or g.row_dim not in (None, 0):
        return None
    why = f"{R.describe(node)} divides each weight row by its norm over the input channels"
    return _merge(an.shape(node), 0, [v, g], mixes=why if any(s > 1 for s in v.shape[1:]) else None)


def _cat(an: Analysis, node: fx.Node, ex: Callable) -> ParamExpr | None:
    """``torch.cat`` along the rows: the parts' rows laid end to end (each part's sources and
    literals move by the rows before it). Along another dim it would join columns: not followed."""
    tensors, out = R.arg(node, 0, "tensors"), an.shape(node)
    if not isinstance(tensors, (list, tuple)) or not tensors:
        return None
    d = R.norm_dim(R.arg(node, 1, "dim", 0), len(out))
    parts = [ex(t) for t in tensors]
    if any(p.row_dim != d or len(p.shape) != len(out) for p in parts):
        return None
    offsets = [sum(p.rows for p in parts[:i]) for i in range(len(parts))]
    return _merge(out, d, parts, offsets=offsets)


def _creation(an: Analysis, node: fx.Node) -> ParamExpr | None:
    """``torch.zeros/ones/full/empty(size)``, ``x.new_zeros(size)``: the same value in every row.
    Its rows are its first dim of more than one entry; their count must be a literal (the rewrite
    sets it to the kept rows). ``x`` gives only the dtype and device."""
    found, out = creation_size(node), an.shape(node)
    if found is None or len(found[0]) != len(out):
        return None
    j = next((i for i, s in enumerate(out) if s != 1), None)
    if j is None:
        return ParamExpr(tuple(out), None)
    if not isinstance(found[0][j], int):
        return None
    return ParamExpr(tuple(out), j, (), ((node.name, "creation_size", j, 0, out[j]),))


CREATION_OPS = {f: _creation for f in CREATION_SIZE}


_ELEMENTWISE = [operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add, torch.sub,
                torch.mul, torch.div, torch.neg, torch.sqrt, torch.rsqrt, torch.abs, torch.exp, torch.square,
                torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like,  # *_like: rows follow x
                torch.clamp, torch.clip, torch.sigmoid, torch.tanh, torch.log, torch.reciprocal, F.softplus]
CHAIN_OPS: dict[Any, Callable] = {
    **{f: _elementwise for f in _ELEMENTWISE},
    **{m: _elementwise for m in ("add", "sub", "mul", "div", "neg", "sqrt", "rsqrt", "abs", "exp", "square",
                                 "contiguous", "clone", "detach", "__add__", "__mul__", "__sub__", "__truediv__",
                                 "clamp", "clamp_min", "clamp_max", "clip", "sigmoid", "tanh", "log", "reciprocal")},
    **{m: _reshape for m in ("reshape", "view", "reshape_as", "view_as")}, torch.reshape: _reshape,
    **{f: _reduction for f in (torch.mean, torch.var, torch.std, torch.sum, "mean", "var", "std", "sum")},
    F.batch_norm: _batch_norm, torch.cat: _cat, torch.concat: _cat, torch.concatenate: _cat,
    torch._weight_norm: _weight_norm, torch.ops.aten._weight_norm.default: _weight_norm,
    **{getattr(getattr(torch.ops.aten, op), o): _reduction  # ATen reductions the export front end leaves
       for op, o in (("var", "dim"), ("var", "correction"), ("std", "dim"), ("std", "correction"))},
}

_CHAINS: "weakref.WeakKeyDictionary[Analysis, tuple[dict, dict]]" = weakref.WeakKeyDictionary()


def _cached(an: Analysis) -> tuple[dict, dict]:
    """(adopted chains, every row-wise expression) of ``an``'s graph, computed once."""
    found = _CHAINS.get(an)
    if found is None:
        nodes = list(an.gm.graph.nodes)
        exprs = _find(an, nodes)
        found = (_prune(an, nodes, exprs), exprs)
        _CHAINS[an] = found
    return found


def chains(an: Analysis) -> dict[str, ParamExpr]:
    """``{node name: ParamExpr}`` of the nodes computing a layer's weight or bias row by row.

    Example:
        >>> import torch
        >>> from fxprune.shapes import propagate
        >>> class W(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w, self.g = torch.nn.Parameter(torch.randn(4, 3, 1, 1)), torch.nn.Parameter(torch.ones(4, 1, 1, 1))
        ...     def forward(self, x):
        ...         return torch.nn.functional.conv2d(x, self.w * self.g)
        >>> gm = torch.fx.symbolic_trace(W())
        >>> _ = propagate(gm, (torch.randn(1, 3, 2, 2),))
        >>> chains(Analysis(gm))["mul"].sources
        (('w', 0, 0), ('g', 0, 0))
    """
    return _cached(an)[0]


def _find(an: Analysis, nodes: list) -> dict[str, ParamExpr]:
    exprs: dict[str, ParamExpr] = {}
    for node in nodes:
        if node.op == "get_attr":
            try:
                is_tensor = isinstance(an.param_tensor(node.target), torch.Tensor)
            except AttributeError:
                is_tensor = False
            leaf = _leaf(an, node.target) if is_tensor else None
            if leaf is not None:
                exprs[node.name] = leaf
            continue
        if node.op not in ("call_function", "call_method") or not is_tensor_shape(an.shape(node)):
            continue
        e = None
        try:
            if node.target in CREATION_OPS:  # its inputs give only a dtype, a device or a size
                e = CREATION_OPS[node.target](an, node)
            elif node.target in CHAIN_OPS and node.all_input_nodes \
                    and all(a.name in exprs for a in node.all_input_nodes):
                e = CHAIN_OPS[node.target](an, node, lambda a: exprs[a.name])
        except (IndexError, TypeError, ValueError):
            e = None
        if e is not None:
            exprs[node.name] = e
    return exprs


def _prune(an: Analysis, nodes: list, exprs: dict) -> dict[str, ParamExpr]:
    """Keep the chain nodes whose every user is a chain node or a layer consuming it."""
    chain = {n.name for n in nodes if n.name in exprs and n.op != "get_attr"}
    changed = True
    while changed:
        changed = False
        for node in nodes:
            if node.name not in chain:
                continue
            ok = (node.target in CREATION_OPS or all(a.op == "get_attr" or a.name in chain for a in node.all_input_nodes)) \
                and node.users and all(u.name in chain or consumes(an, u, node, exprs[node.name], exprs) for u in node.users)
            if not ok:
                chain.discard(node.name)
                changed = True
    return {n: exprs[n] for n in chain}


def chain_rule(an: Analysis, node: fx.Node) -> ParamExpr:
    """The rule of a chain node: its expression (declares nothing; the consuming layer does)."""
    return chains(an)[node.name]


def shape_entry(node: fx.Node, payload: tuple, kept: Callable) -> None:
    """Rewriter: entry ``j`` of a ``reshape``/``view`` shape (packed or not) is the kept row count."""
    j, units = payload
    entries, packed = _shape_entries(node)
    entries[j] = kept(units)
    if "shape" in node.kwargs:
        node.kwargs = {**node.kwargs, "shape": type(node.kwargs["shape"])(entries)}
    elif packed:
        node.args = (node.args[0], type(node.args[1])(entries))
    else:
        node.args = (node.args[0], *entries)
