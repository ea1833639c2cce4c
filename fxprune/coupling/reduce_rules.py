"""Channel semantics of norms, sliding-window unfolds and ``*_as`` views.

- **Norms** (``Tensor.norm``, ``torch.norm``, ``torch.linalg.vector_norm`` / ``norm`` /
  ``matrix_norm``) reduce over some dims. Over other dims the channels pass through, as in a sum.
  Over the channel dim the output loses it, and the mask oracle zeroes a removed channel: where a
  zero entry changes nothing, removal is exact (see ``vector_norm_exact`` and ``MATRIX_EXACT``),
  otherwise the channels are marked inexact with the reason.
- **im2col** (``F.unfold``, ``nn.Unfold``): output dim 1 is ``C * kh * kw``, channel-major, so
  channel ``c`` owns entries ``[c * k, (c + 1) * k)`` (a stride map, as in a flatten).
  ``Tensor.unfold(dim, size, step)`` on another dim passes the channels through (a trailing
  window dim is appended); on the channel dim it mixes neighbouring channels and blocks.
- **col2im** (``F.fold``, ``nn.Fold``): the inverse, ``C * k`` entries of dim 1 summed into ``C``
  channels; each block of ``k`` entries goes whole.
- ``reshape_as`` / ``view_as`` / ``expand_as`` are reshape/view/expand to the other tensor's
  traced shape. The other tensor is pruned in the rewritten model too, so its channels are
  coupled with the result's (same dim, same width); no literal is rewritten.

Example:
    >>> import torch, fxprune
    >>> class GRN(torch.nn.Module):                 # ConvNeXt-V2 global response norm
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 2, 1)
    ...     def forward(self, x):
    ...         y = self.a(x)
    ...         g = y.norm(p=2, dim=(2, 3), keepdim=True)
    ...         return self.b(y * (g / (g.mean(dim=1, keepdim=True) + 1e-6)))
    >>> pruned = fxprune.transform(GRN(), fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 4, 4),))
    >>> pruned.a.out_channels, fxprune.verify(pruned).ok
    (2, True)
"""
from __future__ import annotations

import math
from typing import Any

import torch.fx as fx

from . import layout_rules as L
from . import tensor_rules as T
from .rules import arg, describe, ndim, norm_dim, opaque
from .state import Analysis, ChannelInfo, ParamRef
from ..shapes import is_tensor_shape

INF = math.inf

# Matrix norm order -> exact when one of its two dims is the channel dim. A zero row or column
# leaves the nonzero singular values ("fro", "nuc", 2: largest) and every positive row/column
# abs-sum (1, inf: largest of them) unchanged; the smallest singular value (-2) or abs-sum
# (-1, -inf) can be the zeroed channel's, so those are inexact.
MATRIX_EXACT: dict[Any, bool] = {"fro": True, "nuc": True, 2: True, 1: True, INF: True,
                                 -2: False, -1: False, -INF: False}


def vector_norm_exact(p: float) -> bool:
    """Whether a vector p-norm over the channel dim ignores a zeroed channel.

    ``p > 0``: ``|0|**p`` adds nothing to the sum; ``p = 0`` counts nonzero entries, and a zero
    is not counted; ``inf`` is the largest ``|x|``, never a zero's unless all are zero.
    ``-inf`` (the smallest ``|x|``) and ``p < 0`` (``|0|**p`` is infinite) take the zero's value.

    Example:
        >>> [vector_norm_exact(p) for p in (2, 1, 0, float("inf"), float("-inf"), -1)]
        [True, True, True, True, False, False]
    """
    return float(p) >= 0


def _dims(dims: Any, nd: int) -> list[int] | None:
    if dims is None:
        return list(range(nd))
    dims = [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, (list, tuple)) else None
    if dims is None or not all(isinstance(d, int) for d in dims):
        return None
    return sorted({norm_dim(d, nd) for d in dims})


def reduce_over(an: Analysis, node: fx.Node, dims: Any, keepdim: Any, inexact: str | None) -> Any:
    """A reduction of input 0 over ``dims`` (None: all): channels pass through when the channel
    dim is kept; over it, the output carries no channels (fresh, pinned) and the input's
    channels are marked inexact when ``inexact`` gives a reason (None: removal is exact).

    Example (the smallest |x| over the channels takes a removed channel's zero: inexact):
        >>> import torch, fxprune
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 2, 1)
        ...     def forward(self, x):
        ...         y = self.a(x)
        ...         return self.b(y) * y.norm(p=float("-inf"), dim=1, keepdim=True)
        >>> p = fxprune.plan(Net(), fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 2, 2),))
        >>> [g.exact for g in p.groups if g.size == 8]
        [False]
    """
    x = arg(node, 0, "input")
    v, nd = an.tensor_info(x), ndim(an, x)
    if v is None or nd is None:
        return opaque(an, node)
    dims = _dims(dims, nd)
    if dims is None or not isinstance(keepdim, (bool, int)):
        return opaque(an, node, f"{describe(node)}: its dims or keepdim are not literals")
    if v.dim in dims:
        if inexact is not None:
            an.units.mark_inexact(v.units, f"{describe(node)} over the channel dim: {inexact}")
        return an.fresh(node, an.shape(node), "opaque", f"{describe(node)} reduces over the channel dim")
    od = v.dim if keepdim else v.dim - sum(1 for d in dims if d < v.dim)
    return ChannelInfo(od, v.units)


def _vector(an: Analysis, node: fx.Node, p: Any, dims: Any, keepdim: Any) -> Any:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        return opaque(an, node, f"{describe(node)}: the norm order {p!r} is not a literal number")
    why = None if vector_norm_exact(p) else (
        f"a {p}-norm takes the zeroed channel's value (the smallest |x|, or |0|**p = inf)")
    return reduce_over(an, node, dims, keepdim, why)


def _matrix(an: Analysis, node: fx.Node, p: Any, dims: Any, keepdim: Any) -> Any:
    nd = ndim(an, arg(node, 0, "input"))
    if nd is None or not isinstance(dims, (list, tuple)) or len(dims) != 2:
        return opaque(an, node, f"{describe(node)}: a matrix norm needs two literal dims")
    if isinstance(p, bool) or not isinstance(p, (str, int, float)) or p not in MATRIX_EXACT:
        return opaque(an, node, f"{describe(node)}: matrix norm order {p!r} is not in fxprune's table")
    why = None if MATRIX_EXACT[p] else f"the {p} matrix norm can take the zeroed channel's value"
    return reduce_over(an, node, dims, keepdim, why)


def torch_norm(an: Analysis, node: fx.Node) -> Any:
    """``torch.norm`` / ``Tensor.norm(p="fro", dim=None, keepdim=False)``: "fro" over at most two
    dims and every number is a vector norm (None: 2); other strings ("nuc") a matrix norm.

    Example:
        >>> from fxprune.coupling.ops import FUNCTION_RULES, METHOD_RULES
        >>> import torch
        >>> FUNCTION_RULES[torch.norm] is METHOD_RULES["norm"] is torch_norm
        True
    """
    p, dims, keep = arg(node, 1, "p", "fro"), arg(node, 2, "dim", None), arg(node, 3, "keepdim", False)
    if isinstance(p, str):
        if p == "fro" and (dims is None or isinstance(dims, int) or len(dims) <= 2):
            return _vector(an, node, 2, dims, keep)
        nd = ndim(an, arg(node, 0, "input"))
        return _matrix(an, node, p, list(range(nd or 0)) if dims is None else dims, keep)
    return _vector(an, node, 2 if p is None else p, dims, keep)


def linalg_vector_norm(an: Analysis, node: fx.Node) -> Any:
    """``torch.linalg.vector_norm(x, ord=2, dim=None, keepdim=False)``.

    Example:
        >>> import torch
        >>> from fxprune.coupling.ops import FUNCTION_RULES
        >>> FUNCTION_RULES[torch.linalg.vector_norm] is linalg_vector_norm
        True
    """
    return _vector(an, node, arg(node, 1, "ord", 2), arg(node, 2, "dim", None), arg(node, 3, "keepdim", False))


def linalg_matrix_norm(an: Analysis, node: fx.Node) -> Any:
    """``torch.linalg.matrix_norm(A, ord="fro", dim=(-2, -1), keepdim=False)``.

    Example:
        >>> import torch
        >>> from fxprune.coupling.ops import FUNCTION_RULES
        >>> FUNCTION_RULES[torch.linalg.matrix_norm] is linalg_matrix_norm
        True
    """
    return _matrix(an, node, arg(node, 1, "ord", "fro"), arg(node, 2, "dim", (-2, -1)), arg(node, 3, "keepdim", False))


def linalg_norm(an: Analysis, node: fx.Node) -> Any:
    """``torch.linalg.norm(A, ord=None, dim=None, keepdim=False)``: one dim (or none and no ord,
    the flattened tensor) is a vector norm (ord None: 2); two dims a matrix norm (None: "fro");
    ``ord`` without ``dim`` takes a 1-D input as a vector, a 2-D one as a matrix.

    Example:
        >>> import torch
        >>> from fxprune.coupling.ops import FUNCTION_RULES
        >>> FUNCTION_RULES[torch.linalg.norm] is linalg_norm
        True
    """
    p, dims, keep = arg(node, 1, "ord", None), arg(node, 2, "dim", None), arg(node, 3, "keepdim", False)
    if isinstance(dims, (list, tuple)) and len(dims) == 1:
        dims = dims[0]
    if dims is None and p is not None:
        nd = ndim(an, arg(node, 0, "input"))
        dims = 0 if nd == 1 else [0, 1] if nd == 2 else None
        if dims is None:
            return opaque(an, node, f"{describe(node)}: ord without dim needs a 1-D or 2-D input")
    if dims is None or isinstance(dims, int):
        return _vector(an, node, 2 if p is None else p, dims, keep)
    return _matrix(an, node, "fro" if p is None else p, dims, keep)


# -- sliding windows -----------------------------------------------------------------------
def _block_op(an: Analysis, node: fx.Node) -> tuple:
    """(channels, input shape, output shape) of an unfold/fold node; (None, None, None) when
    its input carries no channels or a shape is unknown."""
    x = arg(node, 0, "input")
    v, in_shape, out_shape = an.tensor_info(x), an.shape(x), an.shape(node)
    if v is None or not is_tensor_shape(in_shape) or not is_tensor_shape(out_shape):
        return None, None, None
    return v, in_shape, out_shape


def im2col(an: Analysis, node: fx.Node) -> Any:
    """``F.unfold`` / ``nn.Unfold``: ``(N, C, H, W) -> (N, C * k, L)``, channel ``c`` owning
    entries ``[c * k, (c + 1) * k)`` of dim 1 (unbatched: dim 0); channels on a spatial dim are
    scattered over blocks and positions, which blocks them.

    Example:
        >>> import torch
        >>> from fxprune.coupling.ops import FUNCTION_RULES, MODULE_RULES
        >>> FUNCTION_RULES[torch.nn.functional.unfold] is MODULE_RULES[torch.nn.Unfold] is im2col
        True
    """
    v, in_shape, out_shape = _block_op(an, node)
    if v is None or len(in_shape) < 3:
        return opaque(an, node)
    c = len(in_shape) - 3
    if v.dim < c:
        return ChannelInfo(v.dim, v.units)
    if v.dim > c:
        return opaque(an, node, f"{describe(node)} gathers sliding blocks over the channel dim {v.dim} "
                                "(a spatial dim of the op): its channels mix into blocks and positions")
    k, rest = divmod(out_shape[c], in_shape[c])
    if rest:
        return opaque(an, node)
    return ChannelInfo(c, tuple(u for u in v.units for _ in range(k)))


def col2im(an: Analysis, node: fx.Node) -> Any:
    """``F.fold`` / ``nn.Fold``, the inverse of ``im2col``: ``(N, C * k, L) -> (N, C, H, W)``,
    entries ``[c * k, (c + 1) * k)`` of dim 1 (unbatched: dim 0) summed into output channel
    ``c``. Each such block goes whole: its units are coupled (group-structure edges, none where
    they already are one channel, as after an unfold) and output channel ``c`` carries the
    block's unit. Removing a block zeroes every entry that output channel ``c`` sums, so the
    pruned fold over the kept blocks is exact. Channels on the block-position dim ``L`` are
    summed over overlapping windows, which blocks them.

    Example:
        >>> import torch
        >>> from fxprune.coupling.ops import FUNCTION_RULES, MODULE_RULES
        >>> FUNCTION_RULES[torch.nn.functional.fold] is MODULE_RULES[torch.nn.Fold] is col2im
        True
    """
    v, in_shape, out_shape = _block_op(an, node)
    if v is None or len(in_shape) not in (2, 3) or len(out_shape) != len(in_shape) + 1:
        return opaque(an, node)
    c = len(in_shape) - 2
    if v.dim < c:
        return ChannelInfo(v.dim, v.units)
    if v.dim > c:
        return opaque(an, node, f"{describe(node)} sums sliding blocks whose positions lie on the channel "
                                f"dim {v.dim}: its channels mix into overlapping windows")
    k, rest = divmod(in_shape[c], out_shape[c])
    if rest:
        return opaque(an, node)
    blocks = [v.units[i * k:(i + 1) * k] for i in range(out_shape[c])]
    roots = an.units.root_tensor()
    split = [b for b in blocks if k > 1 and bool((roots[list(b)] != roots[b[0]]).any())]
    if split:
        why = (f"{describe(node)} sums blocks of {k} entries of dim {c} into one output channel: "
               "each block goes whole")
        an.units.union([u for b in split for u in b], [b[0] for b in split for _ in b], "group-structure", why)
    return ChannelInfo(c, tuple(b[0] for b in blocks))


def tensor_unfold(an: Analysis, node: fx.Node) -> Any:
    """``Tensor.unfold(dimension, size, step)``: windows along another dim leave the channels in
    place (a trailing window dim is appended); windows along the channel dim mix neighbours.

    Example:
        >>> from fxprune.coupling.ops import METHOD_RULES
        >>> METHOD_RULES["unfold"] is tensor_unfold
        True
    """
    x = arg(node, 0, "input")
    v, nd = an.tensor_info(x), ndim(an, x)
    d = arg(node, 1, "dimension")
    if v is None or nd is None or not isinstance(d, int):
        return opaque(an, node)
    if norm_dim(d, max(nd, 1)) == v.dim:
        return opaque(an, node, f"{describe(node)} slides windows along the channel dim {v.dim}: "
                                "each window mixes neighbouring channels")
    return ChannelInfo(v.dim, v.units)


# -- views shaped like another tensor ------------------------------------------------------
def _like_other(an: Analysis, node: fx.Node, out: Any) -> Any:
    """Couple the result of ``x.<op>_as(other)`` with ``other``: both have one shape, in the
    pruned model too, so the result's channels are other's (same dim and width) or neither
    side's tracked dim may shrink (pinned, parameters frozen)."""
    other = arg(node, 1, "other")
    ov = an.value(other)
    why = f"{describe(node)} takes the shape of {getattr(other, 'name', other)!r}"
    if isinstance(out, ParamRef):
        return _param_like_other(an, node, out, ov, why)
    if not isinstance(out, ChannelInfo):
        return out
    if isinstance(ov, ChannelInfo) and ov.dim == out.dim and len(ov.units) == len(out.units):
        an.units.union(out.units, ov.units, "identity", why)
        return out
    reason = f"{why}, whose channels are not the result's (dim {out.dim})"
    an.units.pin(out.units, reason)
    an.pin_value(ov, reason)
    return out


def _param_like_other(an: Analysis, node: fx.Node, p: ParamRef, ov: Any, why: str) -> Any:
    """A parameter expanded to another tensor's shape: a per-channel table of other's channels
    (sliced along them), or, where other carries no channels, a fixed tensor."""
    shape = tuple(an.param_tensor(p.target).shape)
    if not isinstance(ov, ChannelInfo) or len(shape) != len(an.shape(node)):
        an.pin_value(p, f"{why}, which keeps its shape")
        return an.fresh(node, an.shape(node), "opaque", f"{why}, which keeps its shape")
    if any(s != 1 for i, s in enumerate(shape) if i != ov.dim):
        reason = f"{why}: the parameter has dims of its own besides the channel dim"
        an.pin_value(p, reason)
        if shape[ov.dim] != 1:
            an.units.pin(ov.units, reason)
    elif shape[ov.dim] == len(ov.units) > 1:
        an.slice_param(p.target, ov.dim, "passenger", ov.units, p.target, why)
    return ChannelInfo(ov.dim, ov.units)


def reshape_as(an: Analysis, node: fx.Node) -> Any:
    """``x.reshape_as(other)`` / ``x.view_as(other)``: the reshape rule on the traced shapes,
    coupled with ``other``; the target shape is other's, so no literal is rewritten.

    Example:
        >>> from fxprune.coupling.ops import METHOD_RULES
        >>> METHOD_RULES["reshape_as"] is METHOD_RULES["view_as"] is reshape_as
        True
    """
    out = L.reshape(an, node)
    an.literals.pop(node.name, None)
    return _like_other(an, node, out)


def expand_as(an: Analysis, node: fx.Node) -> Any:
    """``x.expand_as(other)``: the expand rule, coupled with ``other``.

    Example:
        >>> from fxprune.coupling.ops import METHOD_RULES
        >>> METHOD_RULES["expand_as"] is expand_as
        True
    """
    return _like_other(an, node, T.expand(an, node))


def param_view(an: Analysis, node: fx.Node) -> Any:
    """``param.view(1, 1, 1, -1)``: a per-channel parameter (one dim over 1) reshaped to broadcast
    is a table of its own channels on the output's one dim over 1 (sliced as a passenger; its
    users couple it); a view to the same shape stays the parameter; any other view of a
    parameter goes to the reshape rule (which blocks it).

    Example:
        >>> from fxprune.coupling.ops import METHOD_RULES
        >>> METHOD_RULES["view"] is METHOD_RULES["reshape"] is param_view
        True
    """
    p, out_shape = an.value(arg(node, 0, "input")), an.shape(node)
    if isinstance(p, ParamRef) and is_tensor_shape(out_shape):
        shape = tuple(an.param_tensor(p.target).shape)
        if shape == tuple(out_shape):
            return p
        wide, wide_out = [i for i, s in enumerate(shape) if s != 1], [i for i, s in enumerate(out_shape) if s != 1]
        if len(wide) == 1 and len(wide_out) == 1 and shape[wide[0]] == out_shape[wide_out[0]]:
            return ChannelInfo(wide_out[0], T.param_channels(an, p.target, wide[0], describe(node)))
    return L.reshape(an, node)
