"""Convolutions with ``groups > 1``: the group structure is part of the coupling.

A grouped convolution with ``g`` groups sees its ``C`` input channels as ``g`` blocks of
``C // g``; every block is convolved with the same weight columns (``weight[:, j]`` serves
channel ``j`` of every block). Channel ``j`` of block ``i`` is therefore coupled with channel ``j``
of every other block (a *group-structure* edge), and likewise for the output blocks. Removing a
channel removes the same position in every block, so each block keeps the same width, the widths
stay divisible by ``g`` and ``groups`` itself never changes. Depthwise convolutions
(``groups == in_channels``) keep the per-channel rule of ``rules.contract``: there each group is
one channel, and whole groups go.

Example:
    >>> import torch, fxprune
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 8, 3, groups=2),
    ...                         torch.nn.Conv2d(8, 2, 1))
    >>> p = fxprune.plan(m, fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 6, 6),))
    >>> p.groups[0].size, p.groups[1].size   # 8 channels = 2 blocks x 4 positions
    (4, 4)
    >>> getattr(fxprune.apply(p), "1")
    Conv2d(4, 4, kernel_size=(3, 3), stride=(1, 1), groups=2)
"""
from __future__ import annotations

import operator
from typing import Any, Sequence

import torch.fx as fx

from . import param_use as PU
from .param_expr import ParamExpr
from . import rules as R
from .state import Analysis, ChannelInfo, ParamRef


def couple_blocks(an: Analysis, units: Sequence[int], groups: int, why: str) -> tuple[int, ...]:
    """Couple position ``j`` of every one of ``groups`` equal blocks; return block 0's units.

    Example:
        >>> import torch
        >>> an = Analysis(torch.fx.symbolic_trace(torch.nn.Identity()))
        >>> u = an.units.new_atom("x", 6, "input")
        >>> couple_blocks(an, u, 3, "demo")
        (0, 1)
        >>> an.units.find(4) == an.units.find(0)
        True
    """
    size = len(units) // groups
    first = tuple(units[:size])
    for i in range(1, groups):
        an.units.union(first, units[i * size:(i + 1) * size], "group-structure", why)
    return first


def grouped(an: Analysis, node: fx.Node, x: Any, weight: str, bias: str | None, owner: str,
            groups: int, transposed: bool, in_channels: int, out_channels: int) -> Any:
    """Channel semantics of a convolution with ``1 < groups`` that is not depthwise."""
    why = f"{R.describe(node)} with groups={groups}"
    v = an.tensor_info(x)
    # weight: (out, in/g, ...) for a convolution, (in, out/g, ...) for a transposed one
    full_dim, block_dim = 0, 1
    if v is not None and v.dim == 1 and len(v.units) == in_channels:
        block0 = couple_blocks(an, v.units, groups, why)
        if transposed:
            an.slice_param(weight, full_dim, "consumer", v.units, owner, why)
        else:
            an.slice_param(weight, block_dim, "consumer", block0, owner, why)
    else:
        an.pin_value(an.value(x), f"{why}: input channels are not on dim 1")
    out = an.units.new_atom(("out", node.name, 1), out_channels, "producer")
    out_block0 = couple_blocks(an, out, groups, why)
    if transposed:
        an.slice_param(weight, block_dim, "producer", out_block0, owner, why)
    else:
        an.slice_param(weight, full_dim, "producer", out, owner, why)
    if bias is not None:
        an.slice_param(bias, 0, "passenger", out, owner, why)
    return ChannelInfo(1, out)


def conv_module(an: Analysis, node: fx.Node) -> Any:
    """``nn.Conv*d`` / ``nn.ConvTranspose*d`` of any ``groups``."""
    m = an.modules[node.target]
    transposed = bool(getattr(m, "transposed", False))
    depthwise = m.groups == m.in_channels and (not transposed or m.out_channels == m.in_channels)
    x = R.arg(node, 0, "input")
    if m.groups == 1 or depthwise or R.ndim(an, x) != len(m.kernel_size) + 2:
        return R.conv_module(an, node)
    bias = f"{node.target}.bias" if m.bias is not None else None
    return grouped(an, node, x, f"{node.target}.weight", bias, node.target, m.groups, transposed,
                   m.in_channels, m.out_channels)


def conv_functional(an: Analysis, node: fx.Node, spatial: int, transposed: bool = False) -> Any:
    """``F.conv*d`` / ``F.conv_transpose*d`` on ``get_attr`` weights (parameters or buffers, e.g. a
    blur pool's fixed per-channel filter), any ``groups``. A depthwise ``groups`` written as a
    literal is rewritten to the kept channel count; ``groups=x.shape[1]`` follows by itself.
    A weight computed from a parameter row by row (timm's ``StdConv2d``/``ScaledStdConv2d``,
    see ``param_expr``) slices that parameter like a plain weight."""
    groups = R.arg(node, 6, "groups", 1)
    weight, expr = PU.weight_of(an, node)
    b_node = R.arg(node, 2, "bias")
    b = an.value(b_node) if b_node is not None else None
    bias = b.target if isinstance(b, ParamRef) else None
    bexpr = b if isinstance(b, ParamExpr) else None  # a bias computed from parameters (param_use)
    x = R.arg(node, 0, "input")
    follows = _reads_channels(groups, x)  # groups=x.shape[1]: depthwise at any width
    if follows:
        groups = an.shape(x)[1]
    if weight is None or (b_node is not None and bias is None and bexpr is None) or not isinstance(groups, int) \
            or R.ndim(an, x) != spatial + 2:
        detail = PU.operand_reason(an, node)
        return R.opaque(an, node, f"{R.describe(node)}: weights must be get_attr parameters (or computed from "
                                  "one row by row), groups an int or the input's channel count"
                                  + (f"; {detail}" if detail else ""))
    w = an.param_tensor(weight).shape
    cin, cout = (w[0], w[1] * groups) if transposed else (w[1] * groups, w[0])
    v = an.tensor_info(x)
    if groups == 1:
        in_dim, out_dim = (0, 1) if transposed else (1, 0)
        out = R.contract(an, node, x, 1, weight, in_dim, out_dim, cout, bias, weight, 1)
        columns = v.units if v is not None and v.dim == 1 else None
    elif groups == cin and (not transposed or cout == cin):
        mult = 1 if transposed else cout // cin
        out = R.contract(an, node, x, 1, weight, 1, 0, cout, bias, weight, 1, depthwise_mult=mult)
        if isinstance(out, ChannelInfo) and v is not None and not follows:
            an.rewrite_literal(node, "count", (6, "groups", v.units))  # a literal groups=C shrinks
        columns = None  # one input channel per weight row: nothing in a row is removed
    elif follows:
        return R.opaque(an, node, f"{R.describe(node)}: groups read from the input is not depthwise")
    else:
        out = grouped(an, node, x, weight, bias, weight, groups, transposed, cin, cout)
        columns = v.units if v is not None and v.dim == 1 and len(v.units) == cin else None
    if isinstance(out, ChannelInfo):
        _declare_computed(an, node, expr, bexpr, weight, out, columns, transposed, v, cin, groups)
    return out


def _declare_computed(an: Analysis, node: fx.Node, expr: Any, bexpr: Any, weight: str, out: ChannelInfo,
                      columns: Any, transposed: bool, v: Any, cin: int, groups: int) -> None:
    """A computed weight's rows are the output channels, a transposed convolution's the input
    channels (its row entries are then output channels); a computed bias follows the outputs."""
    if expr is not None and transposed:
        rows = v.units if v is not None and v.dim == 1 and len(v.units) == cin else None
        PU.declare(an, node, expr, weight, rows, None if groups == cin else out.units)
    elif expr is not None:
        PU.declare(an, node, expr, weight, out.units, columns)
    if bexpr is not None:
        PU.declare(an, node, bexpr, None, out.units, None)


def _reads_channels(size: Any, x: Any) -> bool:
    """True when ``size`` is ``x.shape[1]`` or ``x.size(1)`` (a run-time channel count of ``x``)."""
    if not isinstance(size, fx.Node) or not isinstance(x, fx.Node):
        return False
    if size.op == "call_method" and size.target == "size":
        return size.args[:1] == (x,) and R.arg(size, 1, "dim") == 1
    src = size.args[0] if size.op == "call_function" and size.target is operator.getitem else None
    return (isinstance(src, fx.Node) and src.op == "call_function" and src.target is getattr
            and src.args == (x, "shape") and size.args[1] == 1)
