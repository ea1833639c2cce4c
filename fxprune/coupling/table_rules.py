"""Parameter tables used as data: a position embedding resized by ``F.interpolate``, a bias
table gathered with ``table[:, index]``, and indexing that reaches ``slice_rules.list_index``.

A parameter whose dims are all its own (no batch) is a *table*; where an op keeps one of its
dims whole, that dim becomes a passenger of the channels it is later added to (the elementwise
rule couples it), as ``reduce_rules.param_view`` does for a per-channel vector.

Example:
    >>> import operator
    >>> from fxprune.coupling.ops import FUNCTION_RULES
    >>> FUNCTION_RULES[operator.getitem] is getitem
    True
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from . import index_rules, slice_rules
from .rules import arg, describe, elementwise, opaque, passthrough
from .state import Analysis, ChannelInfo, ParamRef
from .contraction_rules import has_removable
from .tensor_rules import param_channels
from ..shapes import is_tensor_shape


def resize(an: Analysis, node: fx.Node) -> Any:
    """``F.interpolate`` / ATen ``upsample_*``: resizes the dims after the first two, so the
    channels (dim 1) pass through; the channel dim among the resized ones blocks. A parameter
    resized this way (Hiera's ``F.interpolate(self.pos_embed, size=...)``, shape ``(1, C, h,
    w)``) is a per-channel table on dim 1: a passenger of what it is added to.

    Example:
        >>> import torch, fxprune
        >>> class Pos(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = torch.nn.Conv2d(3, 6, 1), torch.nn.Conv2d(6, 2, 1)
        ...         self.pos = torch.nn.Parameter(torch.randn(1, 6, 2, 2))
        ...     def forward(self, x):
        ...         y = self.a(x)
        ...         return self.b(y + torch.nn.functional.interpolate(self.pos, size=y.shape[-2:]))
        >>> pruned = fxprune.transform(Pos(), fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 4, 4),))
        >>> tuple(pruned.pos.shape), fxprune.verify(pruned).ok
        ((1, 3, 2, 2), True)
    """
    x = arg(node, 0, "input")
    p, out_shape = an.value(x), an.shape(node)
    if not isinstance(p, ParamRef):
        return passthrough(an, node, spatial=None)
    shape = tuple(an.param_tensor(p.target).shape)
    if not is_tensor_shape(out_shape) or len(shape) < 3 or len(out_shape) != len(shape) \
            or tuple(out_shape[:2]) != shape[:2]:
        return opaque(an, node, f"{describe(node)} resizes a parameter whose leading dims it does not keep")
    if shape[0] != 1:
        return opaque(an, node, f"{describe(node)} resizes a parameter of shape {shape}: a table with a "
                                "batch of its own is not a per-channel table")
    return ChannelInfo(1, param_channels(an, p.target, 1, describe(node)))


def gathered_table(an: Analysis, node: fx.Node) -> Any:
    """``table[:, index]`` with ``table`` a parameter of shape ``(H, L)`` and ``index`` an integer
    tensor (LeViT's ``attention_biases[:, attention_bias_idxs]``, shape ``(H, Nq, Nk)``): the
    dims before the index pass through, so dim 0 is a per-head table (a passenger of the heads it
    is added to). None when the index is not of this form.

    Example:
        >>> import torch, fxprune
        >>> class Bias(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 2, 1)
        ...         self.t = torch.nn.Parameter(torch.randn(4, 5))
        ...         self.register_buffer("idx", torch.randint(0, 5, (3, 3)))
        ...     def forward(self, x):
        ...         return self.b(self.a(x) + self.t[:, self.idx])
        >>> pruned = fxprune.transform(Bias(), fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 3, 3),))
        >>> tuple(pruned.t.shape), fxprune.verify(pruned).ok
        ((2, 5), True)
    """
    src, idx = node.args[0], node.args[1]
    p, out_shape = an.value(src), an.shape(node)
    if not isinstance(p, ParamRef) or not isinstance(idx, tuple) or not is_tensor_shape(out_shape):
        return None
    at = [k for k, e in enumerate(idx) if not isinstance(e, slice)]
    if len(at) != 1 or not isinstance(idx[at[0]], fx.Node) or at[0] == 0 \
            or any(e != slice(None) for e in idx if isinstance(e, slice)):
        return None
    table = tuple(an.param_tensor(p.target).shape)
    lead = at[0]
    wide = [d for d in range(lead) if table[d] != 1]
    if len(wide) != 1 or tuple(out_shape[:lead]) != table[:lead]:
        return None
    return ChannelInfo(wide[0], param_channels(an, p.target, wide[0], describe(node)))


def tile(an: Analysis, node: fx.Node, fallback: Any) -> Any:
    """``param.tile(reps)`` / ``param.repeat(reps)`` / ``torch.tile``: copies of a parameter laid
    end to end along the repeated dims; a dim repeated once keeps its channels. Hiera's
    ``pos_embed_win.tile(mask_spatial_shape)`` (shape ``(1, C, h, w)``) is a per-channel table on
    dim 1. A tensor that is not a parameter goes to ``fallback`` (``tensor_rules.repeat``).

    Example:
        >>> import torch, fxprune
        >>> class Win(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = torch.nn.Conv2d(3, 6, 1), torch.nn.Conv2d(6, 2, 1)
        ...         self.win = torch.nn.Parameter(torch.randn(1, 6, 2, 2))
        ...     def forward(self, x):
        ...         return self.b(self.a(x) + self.win.tile([2, 2]))
        >>> pruned = fxprune.transform(Win(), fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 4, 4),))
        >>> tuple(pruned.win.shape), fxprune.verify(pruned).ok
        ((1, 3, 2, 2), True)
    """
    x = arg(node, 0, "input")
    p, out_shape = an.value(x), an.shape(node)
    if not isinstance(p, ParamRef):
        return fallback(an, node)
    shape = tuple(an.param_tensor(p.target).shape)
    if not is_tensor_shape(out_shape) or len(out_shape) < len(shape) or 0 in shape:
        return opaque(an, node)
    lead = len(out_shape) - len(shape)  # new leading dims; counts computed at run time read off the output
    reps = [out_shape[lead + d] // size for d, size in enumerate(shape)]
    kept = [d for d, size in enumerate(shape) if size > 1 and reps[d] == 1]
    if len(shape) >= 3 and shape[0] == 1 and 1 in kept:
        kept = [1]
    if len(kept) != 1:
        return opaque(an, node, f"{describe(node)} tiles a parameter of shape {shape} to {tuple(out_shape)}: "
                                "no single dim keeps its channels")
    return ChannelInfo(lead + kept[0], param_channels(an, p.target, kept[0], describe(node)))


COPY_METHODS = ("clone", "contiguous", "detach", "float", "double", "half", "bfloat16", "to", "type_as")


def param_copy(an: Analysis, node: fx.Node) -> Any:
    """``clone``/``contiguous``/``detach`` of a parameter or buffer is that tensor again (how
    torch.export hands on a literal index list: a lifted constant, cloned), and so is a cast
    (``w.float()``, ``w.to(x.dtype)``, ``w.type_as(x)``: timm's ``RmsNormFp32`` casts its weight,
    Qwen3-ViT its position table, entry by entry, so the users slice the parameter as if they
    read it directly); of anything else, an elementwise op.

    Example:
        >>> from fxprune.coupling.ops import METHOD_RULES
        >>> METHOD_RULES["clone"] is param_copy
        True
    """
    x = node.args[0] if node.args else None
    v = an.value(x)
    if isinstance(v, ParamRef):
        return v
    if node.target in _CASTS and isinstance(v, ChannelInfo) and an.shape(node) == an.shape(x):
        return v  # the other arguments (a dtype, a device, a tensor giving them) carry no data
    return elementwise(an, node)


_CASTS = frozenset(COPY_METHODS) - {"clone", "contiguous", "detach"}


def param_matmul(an: Analysis, node: fx.Node, fallback: Any) -> Any:
    """``a @ W`` with ``W`` a parameter table of shape ``(..., K, C)`` and ``a`` data that
    carries no prunable channels (an index turned one-hot, a pinned opaque value): column ``c``
    of the result is ``a @ W[..., c]``, so the last dim is a per-channel table on ``W``'s last
    dim, a passenger of the channels it is added to (Gemma 4's position embedding
    ``one_hot(pos) @ table``, then summed over the two axes). Anything else goes to
    ``fallback`` (``contraction_rules.matmul``).

    Example:
        >>> import torch, fxprune
        >>> class Pos(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = torch.nn.Linear(3, 6), torch.nn.Linear(6, 2)
        ...         self.table = torch.nn.Parameter(torch.randn(4, 6))
        ...     def forward(self, x):
        ...         return self.b(self.a(x) + torch.eye(4)[torch.arange(5) % 4] @ self.table)
        >>> pruned = fxprune.transform(Pos(), fxprune.Policy(ratio=0.5), (torch.randn(5, 3),))
        >>> tuple(pruned.table.shape), fxprune.verify(pruned).ok
        ((4, 3), True)
    """
    a, w = (node.args + (None, None))[:2]
    p, out_shape = an.value(w), an.shape(node)
    if not isinstance(p, ParamRef) or (isinstance(an.value(a), ChannelInfo) and has_removable(an, [an.value(a)])) or not is_tensor_shape(out_shape) \
            or len(out_shape) < 2:
        return fallback(an, node)
    shape = tuple(an.param_tensor(p.target).shape)
    if len(shape) < 2 or shape[-1] < 2 or out_shape[-1] != shape[-1]:
        return fallback(an, node)
    return ChannelInfo(len(out_shape) - 1, param_channels(an, p.target, len(shape) - 1, describe(node)))


def getitem(an: Analysis, node: fx.Node) -> Any:
    """``operator.getitem``: a literal list index (``slice_rules.list_index``) and a gathered
    parameter table (``gathered_table``) first, then ``index_rules.getitem``."""
    if len(node.args) == 2:
        out = slice_rules.list_index(an, node)
        if out is not NotImplemented:
            return out
        out = gathered_table(an, node)
        if out is not None:
            return out
    return index_rules.getitem(an, node)
