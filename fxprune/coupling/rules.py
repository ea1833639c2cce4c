"""Channel semantics of generic op kinds. The tables in ``ops.py`` map concrete ops to these.

A rule takes the analysis state and a node, declares couplings and parameter slices, and
returns the node's channel value (``ChannelInfo``, a tuple/dict of them, or None).
"""
from __future__ import annotations

import weakref
from typing import Any

import torch.fx as fx

from . import lookup
from .state import Analysis, ChannelInfo, ParamExpr, ParamRef
from ..shapes import is_tensor_shape


def arg(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a node."""
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def ndim(an: Analysis, value: Any) -> int | None:
    s = an.shape(value) if isinstance(value, fx.Node) else None
    return len(s) if is_tensor_shape(s) else None


def norm_dim(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


def permute_dims(node: fx.Node) -> list:
    """The dims of a ``permute`` node as written (``x.permute(0, 2, 1)``, ``x.permute((0, 2, 1))``,
    ``torch.permute(x, dims)``, ``dims=`` by keyword); entries may be negative or not ints.

    Example:
        >>> gm = fx.symbolic_trace(lambda x: x.permute(0, -1, 1))
        >>> permute_dims(next(n for n in gm.graph.nodes if n.op == "call_method"))
        [0, -1, 1]
    """
    dims = node.args[1:] if node.op == "call_method" else (arg(node, 1, "dims"),)
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    if not dims and "dims" in node.kwargs:
        dims = node.kwargs["dims"]
    return list(dims)


_MODULE_TYPES: "weakref.WeakKeyDictionary[fx.Graph, dict[str, str]]" = weakref.WeakKeyDictionary()


def _module_type(node: fx.Node) -> str | None:
    """Class name of a call_module node's module (one table per graph: describe runs per node)."""
    table = _MODULE_TYPES.get(node.graph)
    if table is None:
        owner = node.graph.owning_module
        table = {} if owner is None else {name: type(m).__name__ for name, m in owner.named_modules()}
        _MODULE_TYPES[node.graph] = table
    return table.get(node.target)


def describe(node: fx.Node) -> str:
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", repr(t))
    if node.op == "call_module":
        kind = _module_type(node)
        if kind is not None:
            name = f"{name} ({kind})"
    return f"{node.op} {name!s} at node {node.name!r}"


def opaque(an: Analysis, node: fx.Node, why: str | None = None) -> Any:
    """Unknown semantics: every channel it touches is blocked, with the reason."""
    reason = why or f"{describe(node)} is not in fxprune's op table"
    reason = reason if node.name in reason else f"{reason} (node {node.name!r})"
    an.blocked_ops.append((node.name, reason))
    an.pin_args(node, reason)
    return an.fresh(node, an.shape(node), "opaque", reason)


# -- sources and sinks -------------------------------------------------------------------
def placeholder(an: Analysis, node: fx.Node) -> Any:
    return an.fresh(node, an.shape(node), "input", f"model input {node.name!r}")


def get_attr(an: Analysis, node: fx.Node) -> Any:
    import torch
    try:
        value = an.param_tensor(node.target)
    except AttributeError:
        return None
    return ParamRef(node.target) if isinstance(value, torch.Tensor) else None


def output(an: Analysis, node: fx.Node) -> Any:
    """Channels that reach a model output keep it whole, unless ``Policy.prune_outputs`` narrows
    that output (``fxprune.coupling.outputs``); tied tensors are settled once every use is seen."""
    from .outputs import pin_outputs
    pin_outputs(an, node, an.prune_outputs)
    an.tie_aliases()
    return None


# -- elementwise and per-channel ops -----------------------------------------------------
def _operands(node: fx.Node) -> list:
    out: list = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n))
    return out


def _fixed_channels(an: Analysis, v: Any) -> bool:
    """Channels that can never go (model inputs, opaque results): tracked last in elementwise ops."""
    return not isinstance(v, ChannelInfo) or not v.units or an.units.atom_of(v.units[0]).kind in ("input", "opaque")


def elementwise(an: Analysis, node: fx.Node) -> Any:
    """Broadcasting elementwise op: aligned channel dims of all operands are coupled."""
    out_shape = an.shape(node)
    if not is_tensor_shape(out_shape) or not out_shape:
        return None
    nd = len(out_shape)
    operands = [a for a in _operands(node) if isinstance(an.value(a), (ChannelInfo, ParamRef, ParamExpr))]
    chosen = None
    for a in sorted(operands, key=lambda a: _fixed_channels(an, an.value(a))):  # prunable ones first
        v = an.value(a)
        if isinstance(v, ChannelInfo):
            od = v.dim + nd - ndim(an, a)
            if out_shape[od] == len(v.units):
                chosen = ChannelInfo(od, v.units)
                break
    if chosen is None:
        for a in operands:
            if isinstance(an.value(a), ParamExpr):  # a per-channel vector computed from parameters
                lookup.param_use().freeze(an, an.value(a), f"{describe(node)}: no operand carries the output's channels")
        return opaque(an, node, f"{describe(node)}: no operand carries the output's channels")
    od, size = chosen.dim, len(chosen.units)
    why = f"elementwise {describe(node)}"
    for a in operands:
        v = an.value(a)
        if isinstance(v, ParamExpr):
            if not lookup.param_use().elementwise_table(an, node, v, od, nd, chosen.units):
                return opaque(an, node)
            continue
        if isinstance(v, ParamRef):
            pshape = tuple(an.param_tensor(v.target).shape)
            pd = od - (nd - len(pshape))
            if pd >= 0 and pshape[pd] == size and size > 1:
                an.slice_param(v.target, pd, "passenger", chosen.units, v.target, why)
            elif pd >= 0 and pshape[pd] not in (1, size):
                return opaque(an, node)
            continue
        a_nd = ndim(an, a)
        off = nd - a_nd
        a_shape = an.shape(a)
        at_od = a_shape[od - off] if od - off >= 0 else 1
        if v.dim + off == od and len(v.units) == size:
            an.units.union(chosen.units, v.units, "identity", why)
        elif at_od == 1:  # broadcast along the tracked dim: its own channels (another dim) stay
            if len(v.units) > 1:
                an.units.pin(v.units, f"{why}: its channels lie on another dim than the output's tracked ones")
        else:
            reason = f"{why}: operands carry channels on different dims"
            an.units.pin(v.units, reason)
            an.units.pin(chosen.units, reason)
    return chosen


def passthrough(an: Analysis, node: fx.Node, spatial: int | None = 0, x_pos: int = 0) -> Any:
    """Per-channel op (activation, pooling, dropout, resize): channels pass through unchanged.

    ``spatial`` trailing dims are mixed by the op (None: all dims after dim 1); the channel
    dim must not be one of them.
    """
    x = arg(node, x_pos, "input")
    v = an.tensor_info(x)
    out_shape = an.shape(node)
    if v is None or not is_tensor_shape(out_shape):
        return opaque(an, node)
    nd = ndim(an, x)
    mixed = (nd - 2) if spatial is None else spatial
    if len(out_shape) != nd or out_shape[v.dim] != len(v.units) or v.dim >= nd - mixed:
        return opaque(an, node, f"{describe(node)} mixes or resizes the channel dim {v.dim}")
    return ChannelInfo(v.dim, v.units)


def along_dim(an: Analysis, node: fx.Node, dim_pos: int, dim_name: str = "dim", default: int = -1,
              exact_if_channel: bool = False) -> Any:
    """Op acting along one dim (softmax): per-channel unless that dim is the channel dim, where
    it mixes channels (inexact, with the reason) unless ``exact_if_channel`` (e.g. ``F.normalize``:
    a zeroed channel adds nothing to a p-norm, so removing it is exact)."""
    v = an.tensor_info(arg(node, 0, "input"))
    nd = ndim(an, arg(node, 0, "input"))
    if v is None or nd is None:
        return opaque(an, node)
    d = arg(node, dim_pos, dim_name, default)
    if not isinstance(d, int):
        return opaque(an, node, f"{describe(node)}: the dim it works along is not a literal int")
    if norm_dim(d, nd) == v.dim and not exact_if_channel:
        an.units.mark_inexact(v.units, f"{describe(node)} works along the channel dim: removing a "
                                       "channel changes the others' values")
    return passthrough(an, node, spatial=0)


def reduction(an: Analysis, node: fx.Node, exact_over_channels: bool = False, rescale: bool = False) -> Any:
    """mean/sum/amax over some dims. Over the channel dim: a sum is exact (a zeroed channel adds
    nothing); a mean is exact once rescaled by kept/total (the rewrite inserts the factor);
    anything else (amax, amin) mixes channels and marks them inexact, with the reason."""
    x = arg(node, 0, "input")
    v = an.tensor_info(x)
    nd = ndim(an, x)
    out_shape = an.shape(node)
    if v is None or nd is None:
        return opaque(an, node)
    dims = arg(node, 1, "dim", None)
    keep = bool(arg(node, 2, "keepdim", False))
    dims = list(range(nd)) if dims is None else ([dims] if isinstance(dims, int) else list(dims))
    if not all(isinstance(d, int) for d in dims):
        return opaque(an, node)
    dims = sorted(norm_dim(d, nd) for d in dims)
    if v.dim in dims:
        if rescale:
            an.rewrite_literal(node, "mean_rescale", v.units)
        elif not exact_over_channels:
            an.units.mark_inexact(v.units, f"{describe(node)} reduces over the channel dim: removing a "
                                           "channel changes the result")
        return an.fresh(node, out_shape, "opaque", f"{describe(node)} reduces over the channel dim")
    od = v.dim if keep else v.dim - sum(1 for d in dims if d < v.dim)
    return ChannelInfo(od, v.units)


def max_min(an: Analysis, node: fx.Node) -> Any:
    """``torch.max``/``min``: of two tensors (elementwise), along a dim (values and indices, a
    reduction: inexact over the channel dim) or of everything (inexact)."""
    other = arg(node, 1, "other", None) if len(node.args) > 1 or "other" in node.kwargs else None
    if isinstance(other, fx.Node):
        return elementwise(an, node)
    out = reduction(an, node)
    shapes = an.shape(node)
    if isinstance(out, ChannelInfo) and isinstance(shapes, tuple) and len(shapes) == 2 \
            and not is_tensor_shape(shapes):
        return (out, out)
    return out


# -- weighted layers ---------------------------------------------------------------------
def contract(an: Analysis, node: fx.Node, x: Any, x_dim: int, weight: str, in_dim: int,
             out_dim: int, out_size: int, bias: str | None, owner: str, out_channel_dim: int,
             depthwise_mult: int = 0) -> Any:
    """Shared logic of conv/linear: consume the input channels, produce new ones."""
    why = describe(node)
    v = an.tensor_info(x)
    if depthwise_mult:
        if v is None or v.dim != x_dim:
            return opaque(an, node, f"{why}: depthwise input channels are not on dim {x_dim}")
        units = v.units if depthwise_mult == 1 else tuple(u for u in v.units for _ in range(depthwise_mult))
        an.slice_param(weight, out_dim, "producer", units, owner, why)
    else:
        if v is not None and v.dim == x_dim:
            an.slice_param(weight, in_dim, "consumer", v.units, owner, why)
        else:
            an.pin_value(an.value(x), f"{why} contracts a dim that fxprune does not track")
        units = an.producer_units(weight, out_dim, out_size, ("out", node.name, out_channel_dim))
        an.slice_param(weight, out_dim, "producer", units, owner, why)
    if bias is not None:
        an.slice_param(bias, 0, "passenger", units, owner, why)
    return ChannelInfo(out_channel_dim, units)


def conv_module(an: Analysis, node: fx.Node) -> Any:
    m = an.modules[node.target]
    x = arg(node, 0, "input")
    nd = ndim(an, x)
    spatial = len(m.kernel_size)
    if nd != spatial + 2:
        return opaque(an, node, f"{describe(node)}: unbatched convolution input is not supported")
    bias = f"{node.target}.bias" if m.bias is not None else None
    weight = f"{node.target}.weight"
    transposed = bool(getattr(m, "transposed", False))
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    if m.groups == 1:
        return contract(an, node, x, 1, weight, in_dim, out_dim, m.out_channels, bias, node.target, 1)
    if m.groups == m.in_channels and (not transposed or m.out_channels == m.in_channels):
        mult = 1 if transposed else m.out_channels // m.in_channels
        return contract(an, node, x, 1, weight, in_dim, 0, m.out_channels, bias, node.target, 1,
                        depthwise_mult=mult)
    return opaque(an, node, f"{describe(node)}: grouped convolution (groups={m.groups}) is not supported yet")


def batch_dim_channels(an: Analysis, node: fx.Node, x: Any, x_dim: int, params: tuple) -> Any:
    """A linear map over ``x_dim`` whose input carries its channels on another dim: for the map
    those channels are a batch dim (each channel's slice is transformed on its own), so they pass
    through unchanged and exactly, and the map's own tensors (``params``, None entries skipped)
    keep their shape: they are frozen, so no other use of them may slice them. Returns None when
    ``x``'s channels are on ``x_dim``, unknown, or fixed (a model input's or an opaque op's,
    which can never go): the caller contracts ``x_dim`` and makes new channels there.

    Example (timm gMLP's spatial gating: ``proj(v.transpose(-1, -2))`` mixes tokens)::

        >>> import torch, fxprune
        >>> class Gate(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc, self.proj, self.out = torch.nn.Linear(4, 6), torch.nn.Linear(5, 5), torch.nn.Linear(6, 4)
        ...     def forward(self, x):
        ...         return self.out(self.proj(self.fc(x).transpose(1, 2)).transpose(1, 2))
        >>> p = fxprune.plan(Gate(), fxprune.Policy(ratio=0.5), (torch.randn(1, 5, 4),))
        >>> [(g.size, g.kept) for g in p.groups if g.removed]
        [(6, 3)]
        >>> fxprune.apply(p).proj
        Linear(in_features=5, out_features=5, bias=True)
    """
    v = an.tensor_info(x)
    nd = ndim(an, x)
    out_shape = an.shape(node)
    if v is None or nd is None or v.dim == x_dim or _fixed_channels(an, v) or not is_tensor_shape(out_shape) \
            or len(out_shape) != nd or out_shape[v.dim] != len(v.units):
        return None
    why = (f"{describe(node)} maps dim {x_dim} while the channels sit on dim {v.dim} (a batch dim "
           "for it): its weight keeps its shape")
    for target in params:
        if target is not None:
            an.frozen_params.setdefault(target, why)
    return ChannelInfo(v.dim, v.units)


def linear_module(an: Analysis, node: fx.Node) -> Any:
    """``nn.Linear``: contracts the last dim; channels on another dim pass through (a batch dim)."""
    m = an.modules[node.target]
    x = arg(node, 0, "input")
    nd = ndim(an, x)
    bias = f"{node.target}.bias" if m.bias is not None else None
    weight = f"{node.target}.weight"
    if nd is not None:
        through = batch_dim_channels(an, node, x, nd - 1, (weight, bias))
        if through is not None:
            return through
    return contract(an, node, x, nd - 1, weight, 1, 0, m.out_features, bias, node.target, nd - 1)


def _functional_params(an: Analysis, node: fx.Node, bias_pos: int) -> tuple:
    w = an.value(arg(node, 1, "weight"))
    b_node = arg(node, bias_pos, "bias")
    b = an.value(b_node) if b_node is not None else None
    if not isinstance(w, ParamRef) or (b_node is not None and not isinstance(b, ParamRef)):
        return None, None
    return w.target, (b.target if b is not None else None)


def conv_functional(an: Analysis, node: fx.Node, spatial: int) -> Any:
    weight, bias = _functional_params(an, node, 2)
    groups = arg(node, 6, "groups", 1)
    x = arg(node, 0, "input")
    if weight is None or groups != 1 or ndim(an, x) != spatial + 2:
        return opaque(an, node, f"{describe(node)}: only groups=1 on get_attr weights is supported")
    out = an.param_tensor(weight).shape[0]
    return contract(an, node, x, 1, weight, 1, 0, out, bias, weight, 1)


def linear_functional(an: Analysis, node: fx.Node) -> Any:
    weight, bias = _functional_params(an, node, 2)
    x = arg(node, 0, "input")
    if weight is None:  # a weight or bias computed from parameters, or blocked with where it mixes rows
        return lookup.param_use().linear(an, node)
    nd = ndim(an, x)
    through = batch_dim_channels(an, node, x, nd - 1, (weight, bias)) if nd is not None else None
    if through is not None:
        return through
    out = an.param_tensor(weight).shape[0]
    return contract(an, node, x, nd - 1, weight, 1, 0, out, bias, weight, nd - 1)


def embedding_module(an: Analysis, node: fx.Node) -> Any:
    """``nn.Embedding``: a lookup whose rows are the vocabulary and whose columns produce the
    channels of the last dim (the hidden size of a transformer's stream). Indices carry no
    channels; a tied output projection (``lm_head``) shares the column slice."""
    m = an.modules[node.target]
    out = an.shape(node)
    if m.max_norm is not None or not is_tensor_shape(out) or not out:
        return opaque(an, node, f"{describe(node)}: max_norm renormalises rows over every channel")
    weight = f"{node.target}.weight"
    units = an.producer_units(weight, 1, m.embedding_dim, ("out", node.name, len(out) - 1))
    an.slice_param(weight, 1, "producer", units, node.target, describe(node))
    return ChannelInfo(len(out) - 1, units)


def addmm_functional(an: Analysis, node: fx.Node) -> Any:
    """``torch.addmm(bias, x, weight)``: a linear layer with its weight stored (in, out), as
    Hugging Face's ``Conv1D`` (GPT-2) keeps it."""
    w, b = an.value(arg(node, 2, "mat2")), an.value(arg(node, 0, "input"))
    x = arg(node, 1, "mat1")
    if not isinstance(w, ParamRef) or not isinstance(b, ParamRef) or ndim(an, x) != 2 \
            or an.param_tensor(b.target).dim() != 1:
        return opaque(an, node, f"{describe(node)}: only bias + x @ weight on get_attr parameters is supported")
    through = batch_dim_channels(an, node, x, 1, (w.target, b.target))
    if through is not None:
        return through
    out = an.param_tensor(w.target).shape[1]
    return contract(an, node, x, 1, w.target, 0, 1, out, b.target, w.target, 1)


def batch_norm_module(an: Analysis, node: fx.Node) -> Any:
    m = an.modules[node.target]
    v = an.tensor_info(arg(node, 0, "input"))
    if v is None or v.dim != 1:
        return opaque(an, node, f"{describe(node)}: channels are not on dim 1")
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(m, name, None) is not None:
            an.slice_param(f"{node.target}.{name}", 0, "passenger", v.units, node.target, describe(node))
    return ChannelInfo(v.dim, v.units)
