"""Which ops may read a value computed from parameters (``param_expr``), and how its rows line up.

A chain of :mod:`fxprune.coupling.param_expr` is adopted only when each of its readers is a chain
node or one of these: a linear/convolution taking it as its weight or bias (:data:`CONSUMERS`),
or an elementwise op scaling or shifting a tensor by it, one value per row (:func:`consumes`).
A weight's columns come from one parameter shaped like it (:func:`main_source`) or, for
``F.linear``, from parameters laid end to end over its rows (:func:`column_sources`).

Example:
    >>> import torch.nn.functional as F
    >>> CONSUMERS[F.conv2d]   # the rank of the weight it takes
    4
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import lookup
from . import rules as R
from .state import Analysis


CONSUMERS = {  # layers that may take a computed weight or bias; value: the weight's rank
    F.conv1d: 3, F.conv2d: 4, F.conv3d: 5, F.linear: 2,
    F.conv_transpose1d: 3, F.conv_transpose2d: 4, F.conv_transpose3d: 5,  # rows: input channels
}


def consumes(an: Analysis, user: fx.Node, node: fx.Node, e: Any, exprs: dict) -> bool:
    """``user`` is a layer of :data:`CONSUMERS` taking ``node`` as its weight (rows on dim 0 and
    shaped like one parameter, the one its columns come from, every other source holding rows
    only) or as its bias (one value per row), or an elementwise op scaling or shifting a tensor
    that is not computed from parameters by a vector of one value per row (Swin v2's
    ``attn * logit_scale.clamp(max=...).exp()``, ``logit_scale`` of shape (heads, 1, 1)); a
    constant made of no parameter is left there to ``tensor_rules.creation``.

    Example:
        >>> from fxprune.coupling.param_expr import ParamExpr
        >>> g = torch.fx.Graph()
        >>> x, b = g.placeholder("x"), g.placeholder("b")
        >>> user = g.call_function(F.linear, (x, x, b))
        >>> consumes(None, user, b, ParamExpr((4,), 0), {})   # a bias: one value per row
        True
    """
    if elementwise_user(user):
        return bool(e.sources) and e.row_dim is not None and math.prod(e.shape) == e.rows > 1 \
            and any(a.op != "get_attr" and a.name not in exprs for a in user.all_input_nodes)
    if user.op != "call_function" or user.target not in CONSUMERS or user.args[:1] == (node,):
        return False
    weight, bias = R.arg(user, 1, "weight"), R.arg(user, 2, "bias")
    if weight is node and bias is not node:
        stacked = user.target is F.linear and column_sources(an, e) is not None  # cat((wq, wk, wv))
        return (main_source(an, e) is not None or stacked) and e.row_dim == 0 and len(e.shape) == CONSUMERS[user.target]
    return bias is node and weight is not node and e.row_dim == 0 and len(e.shape) == 1


def elementwise_user(user: fx.Node) -> bool:
    """``user``'s rule is the broadcasting elementwise rule (``rules.elementwise``) and it adds,
    subtracts, multiplies or divides.

    Example:
        >>> import fxprune.coupling.ops
        >>> g = torch.fx.Graph()
        >>> x = g.placeholder("x")
        >>> elementwise_user(g.call_function(operator.mul, (x, x))), elementwise_user(g.call_function(torch.exp, (x,)))
        (True, False)
    """
    if user.target not in _SCALINGS:
        return False
    rule = lookup.function_rule(user.target) if user.op == "call_function" else \
        lookup.method_rule(user.target) if user.op == "call_method" else None
    return lookup.is_elementwise(rule)


_SCALINGS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div,
             operator.iadd, operator.isub, operator.imul, operator.itruediv,  # timm's qkv += qkv_bias
             "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "__add__", "__mul__", "__sub__", "__truediv__"}


def main_source(an: Analysis, e: Any) -> str | None:
    """The source whose columns the value carries (shaped like it, rows on dim 0); None unless
    exactly one, with every other source a per-row vector (one entry per row it covers).

    Example:
        >>> from fxprune.coupling.param_expr import ParamExpr
        >>> gm = torch.fx.symbolic_trace(torch.nn.Identity())
        >>> gm.w, gm.g = torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(4, 1))
        >>> main_source(Analysis(gm), ParamExpr((4, 3), 0, (("w", 0, 0), ("g", 0, 0))))
        'w'
    """
    mains = [t for t, d, s in e.sources if d == 0 and s == 0 and tuple(an.param_tensor(t).shape) == e.shape]
    rows_only = all(an.param_tensor(t).numel() == an.param_tensor(t).shape[d]
                    for t, d, _ in e.sources if t not in mains)
    return mains[0] if len(mains) == 1 and rows_only else None


def column_sources(an: Analysis, e: Any) -> tuple | None:
    """``((target, start), ...)``: the sources that carry the value's columns (shaped like it but
    for their rows, on dim 0), laid end to end over all its rows; every other source a per-row
    vector. None when they do not tile the rows (``F.linear(x, torch.cat((wq, wk, wv)))``).

    Example:
        >>> from fxprune.coupling.param_expr import ParamExpr
        >>> gm = torch.fx.symbolic_trace(torch.nn.Identity())
        >>> gm.a, gm.b = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(1, 3))
        >>> column_sources(Analysis(gm), ParamExpr((3, 3), 0, (("a", 0, 0), ("b", 0, 2))))
        (('a', 0), ('b', 2))
    """
    if e.row_dim != 0:
        return None
    cols, at = [], 0
    for t, d, s in sorted(e.sources, key=lambda src: src[2]):
        shape = tuple(an.param_tensor(t).shape)
        if d == 0 and len(shape) == len(e.shape) and shape[1:] == e.shape[1:] and s == at:
            cols.append((t, s))
            at += shape[0]
        elif an.param_tensor(t).numel() != shape[d]:
            return None
    return tuple(cols) if cols and at == e.rows else None
