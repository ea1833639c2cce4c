"""Shape rules: the output shape of common modules and ops on meta tensors, worked out from the
input's shape after the checks their kernels would make, without running those kernels (their
meta references, decompositions for norms above all, cost 1-3.5 ms a call). ``fxprune.shapes``
runs them in its meta pass; a rule returns None where the meta kernel must decide (an unusual
dtype, a width that does not fit, anything it does not know).

Example:
    >>> import torch
    >>> conv_shape(torch.nn.Conv2d(3, 8, 3, stride=2), torch.empty(1, 3, 9, 9, device="meta")).shape
    torch.Size([1, 8, 4, 4])
"""
from __future__ import annotations

import operator
import types
from typing import Any

import torch

def _empty(like: torch.Tensor, shape: Any) -> torch.Tensor:
    """An empty tensor of ``like``'s dtype and device (``new_empty`` is a Python reference on meta)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _same(x: torch.Tensor) -> torch.Tensor:
    return _empty(x, x.shape)  # empty_like's meta kernel would also work out a memory format


def _fits(value: Any, like: torch.Tensor, shape: tuple) -> bool:
    """``value`` is None or a tensor of ``like``'s dtype with exactly ``shape``."""
    return value is None or (isinstance(value, torch.Tensor) and value.dtype == like.dtype and tuple(value.shape) == shape)


def _params_fit(m: torch.nn.Module, x: torch.Tensor, shape: tuple, names: tuple = ("weight", "bias")) -> bool:
    return all(_fits(getattr(m, name, None), x, shape) for name in names)


def batch_norm_shape(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Eval-mode batch norm: the input's shape when the channel count fits everything.

    Example:
        >>> batch_norm_shape(torch.nn.BatchNorm2d(4).eval(), torch.empty(2, 4, 3, 3, device="meta")).shape
        torch.Size([2, 4, 3, 3])
    """
    c = (m.num_features,)
    if x.dim() >= 2 and x.shape[1] == m.num_features and not m.training \
            and _params_fit(m, x, c, ("weight", "bias", "running_mean", "running_var")):
        return _same(x)
    return None


def _layer_norm(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    shape = tuple(m.normalized_shape)
    if tuple(x.shape[x.dim() - len(shape):]) == shape and _params_fit(m, x, shape):
        return _same(x)
    return None


def _group_norm(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    if x.dim() >= 2 and x.shape[1] == m.num_channels and m.num_channels % m.num_groups == 0 \
            and _params_fit(m, x, (m.num_channels,)):
        return _same(x)
    return None


def _linear(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    w = m.weight
    if x.dim() >= 1 and w.dim() == 2 and x.shape[-1] == w.shape[1] == m.in_features \
            and w.shape[0] == m.out_features and w.dtype == x.dtype and _params_fit(m, x, (m.out_features,), ("bias",)):
        return _empty(x, (*x.shape[:-1], m.out_features))
    return None


def conv_shape(m: torch.nn.Module, x: torch.Tensor, same: bool = False) -> torch.Tensor | None:
    """Conv1d/2d/3d output shape, after the kernel's checks (channels, groups, weight and bias
    shapes, dtype); None (the meta kernel decides) for anything unusual, e.g. unbatched input.
    ``same``: the input is first padded as timm's ``pad_same`` does (TensorFlow's "SAME").

    Example:
        >>> conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        >>> x = torch.empty(1, 3, 9, 9, device="meta")
        >>> conv_shape(conv, x).shape, conv_shape(conv, x, same=True).shape
        (torch.Size([1, 8, 4, 4]), torch.Size([1, 8, 5, 5]))
    """
    n, w = len(m.kernel_size), m.weight
    if w is None or x.dim() != n + 2 or x.shape[1] != m.in_channels or m.in_channels % m.groups \
            or m.out_channels % m.groups or w.dtype != x.dtype \
            or tuple(w.shape) != (m.out_channels, m.in_channels // m.groups, *m.kernel_size):
        return None
    if not _params_fit(m, x, (m.out_channels,), ("bias",)):  # the meta kernel does not check the bias
        raise ValueError(f"conv bias of shape {tuple(m.bias.shape)} for {m.out_channels} output channels")
    spatial = []
    for i, size in enumerate(x.shape[2:]):
        k, s, d = m.kernel_size[i], m.stride[i], m.dilation[i]
        if same:  # timm's get_same_padding: both sides together
            size += max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        if m.padding == "same":
            out = size
        else:
            pad = 0 if m.padding == "valid" else m.padding[i]
            out = (size + 2 * pad - d * (k - 1) - 1) // s + 1
        if out <= 0:
            return None
        spatial.append(out)
    return _empty(x, (x.shape[0], m.out_channels, *spatial))


def _adaptive_pool(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """AdaptiveAvg/MaxPool (returning values only) on a batched input."""
    spatial = x.dim() - 2
    size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size,) * spatial
    if spatial < 1 or len(size) != spatial or getattr(m, "return_indices", False) or 0 in x.shape[1:]:
        return None
    return _empty(x, (*x.shape[:2], *(x.shape[2 + i] if s is None else s for i, s in enumerate(size))))


def _pool_extent(size: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    """One spatial size out of a max or average pool, as ATen's ``pooling_output_shape``."""
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil else 0)) // s + 1
    if ceil and (out - 1) * s >= size + p:  # the last window would start in the padding
        out -= 1
    return out


def _as_tuple(value: Any, n: int) -> tuple | None:
    value = (value,) * n if isinstance(value, int) else tuple(value)
    return value if len(value) == n and all(isinstance(v, int) for v in value) else None


def _pool(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """MaxPool/AvgPool 1d/2d/3d (values only) on a batched floating input, after the kernel's
    checks (positive kernel, stride and dilation, padding at most half the kernel, a non-empty
    output); None defers to the meta kernel, also for an input smaller than the window.

    Example:
        >>> _pool(torch.nn.MaxPool2d(3, 2, 1), torch.empty(1, 8, 7, 7, device="meta")).shape
        torch.Size([1, 8, 4, 4])
    """
    n = _POOL_DIMS[type(m)]
    if x.dim() != n + 2 or getattr(m, "return_indices", False) or not x.is_floating_point() or 0 in x.shape:
        return None
    k, s, p = _as_tuple(m.kernel_size, n), _as_tuple(m.stride or m.kernel_size, n), _as_tuple(m.padding, n)
    d = _as_tuple(getattr(m, "dilation", 1), n)
    if k is None or s is None or p is None or d is None:
        return None
    spatial = []
    for size, ki, si, pi, di in zip(x.shape[2:], k, s, p, d):
        if min(ki, si, di) <= 0 or not 0 <= pi <= ki // 2 or size < (ki - 1) * di + 1:
            return None  # (a window larger than the input: avg_pool3d refuses it, padded or not)
        out = _pool_extent(size, ki, si, pi, di, bool(m.ceil_mode))
        if out < 1:
            return None
        spatial.append(out)
    return _empty(x, (*x.shape[:2], *spatial))


_POOL_DIMS = {torch.nn.MaxPool1d: 1, torch.nn.MaxPool2d: 2, torch.nn.MaxPool3d: 3,
              torch.nn.AvgPool1d: 1, torch.nn.AvgPool2d: 2, torch.nn.AvgPool3d: 3}


# Output of a module from its input's meta tensor, after the checks its kernel would make; None
# defers to the meta kernel. These modules' meta kernels (decompositions, for norms above all)
# cost far more than the shapes they return. Keyed by exact type: a subclass may change forward.
_SHAPE_RULES = {
    torch.nn.BatchNorm1d: batch_norm_shape, torch.nn.BatchNorm2d: batch_norm_shape, torch.nn.BatchNorm3d: batch_norm_shape,
    torch.nn.LayerNorm: _layer_norm, torch.nn.GroupNorm: _group_norm, torch.nn.Linear: _linear,
    torch.nn.Conv1d: conv_shape, torch.nn.Conv2d: conv_shape, torch.nn.Conv3d: conv_shape,
    torch.nn.AdaptiveAvgPool1d: _adaptive_pool, torch.nn.AdaptiveAvgPool2d: _adaptive_pool,
    torch.nn.AdaptiveAvgPool3d: _adaptive_pool,
    **{cls: _pool for cls in _POOL_DIMS},
    **{cls: lambda _m, x: _same(x) for cls in (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.SiLU, torch.nn.GELU, torch.nn.Hardswish,
                                     torch.nn.Hardsigmoid, torch.nn.Sigmoid, torch.nn.Tanh, torch.nn.Identity,
                                     torch.nn.Dropout, torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.Mish)},
}


def _elementwise(a: Any, b: Any) -> torch.Tensor | None:
    """A broadcasting arithmetic op on floating tensors of one dtype (or a tensor and a Python
    number); None defers to the meta kernel (type promotion, integer tensors, ...)."""
    tensors = [v for v in (a, b) if isinstance(v, torch.Tensor)]
    if not tensors or any(not isinstance(v, (torch.Tensor, int, float)) or isinstance(v, bool) for v in (a, b)) \
            or any(not t.is_floating_point() or t.dtype != tensors[0].dtype for t in tensors):
        return None
    shape = _broadcast(tensors[0].shape, tensors[1].shape) if len(tensors) == 2 else tensors[0].shape
    return None if shape is None else _empty(tensors[0], shape)


def _broadcast(a: torch.Size, b: torch.Size) -> tuple | None:
    """The broadcast of two shapes, or None where they do not broadcast (the kernel then raises
    its own error); ``torch.broadcast_shapes`` goes through a Python reference with symbolic-size
    checks, several times slower for the residual adds and gates of every block.

    Example:
        >>> _broadcast(torch.Size([2, 8, 4, 4]), torch.Size([8, 1, 1])), _broadcast(torch.Size([3]), torch.Size([4]))
        ((2, 8, 4, 4), None)
    """
    if a == b:
        return tuple(a)
    n = max(len(a), len(b))
    out = []
    for x, y in zip((1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)):
        if x != y and x != 1 and y != 1:
            return None
        out.append(x if y == 1 else y)
    return tuple(out)


def _binary(args: tuple, kwargs: dict) -> torch.Tensor | None:
    return _elementwise(*args) if len(args) == 2 and not kwargs else None


def _cat(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``torch.cat`` of floating tensors of one dtype and rank, equal off the joined dim."""
    if not args or set(kwargs) - {"dim"} or len(args) > 2 or (len(args) == 2 and kwargs):
        return None
    tensors, dim = args[0], (args[1] if len(args) == 2 else kwargs.get("dim", 0))
    if not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int) \
            or not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    first = tensors[0]
    rank = first.dim()
    if rank == 0 or not -rank <= dim < rank:
        return None
    dim %= rank
    rest = [first.shape[:dim], first.shape[dim + 1:]]
    if any(not t.is_floating_point() or t.dtype != first.dtype or t.dim() != rank
           or [t.shape[:dim], t.shape[dim + 1:]] != rest for t in tensors):
        return None
    return _empty(first, (*rest[0], sum(t.shape[dim] for t in tensors), *rest[1]))


_ATTENTION_KWARGS = {"key_padding_mask": None, "attn_mask": None, "is_causal": False}


def _attention(m: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """``nn.MultiheadAttention(q, k, v)`` without masks: the output and the averaged (or
    per-head) weights, after the checks of its kernel on widths, heads and projections."""
    if len(args) != 3 or set(kwargs) - {"need_weights", "average_attn_weights", *_ATTENTION_KWARGS} \
            or any(kwargs.get(k, v) is not v for k, v in _ATTENTION_KWARGS.items()):
        return None
    q, k, v = args
    e, heads = m.embed_dim, m.num_heads
    if not all(isinstance(t, torch.Tensor) and t.dim() == 3 and t.dtype == q.dtype and t.shape[-1] == e
               for t in (q, k, v)) or not q.is_floating_point() or k.shape != v.shape \
            or not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn or e % heads \
            or (q.shape[0] != k.shape[0] if m.batch_first else q.shape[1] != k.shape[1]) \
            or tuple(m.in_proj_weight.shape) != (3 * e, e) or m.in_proj_weight.dtype != q.dtype \
            or (m.in_proj_bias is not None and tuple(m.in_proj_bias.shape) != (3 * e,)) \
            or type(m.out_proj) is not torch.nn.modules.linear.NonDynamicallyQuantizableLinear \
            or tuple(m.out_proj.weight.shape) != (e, e) or not _params_fit(m.out_proj, q, (e,), ("bias",)):
        return None
    out = _empty(q, q.shape)
    if not kwargs.get("need_weights", True):
        return out, None
    (n, length), source = ((q.shape[0], q.shape[1]), k.shape[1]) if m.batch_first else ((q.shape[1], q.shape[0]), k.shape[0])
    heads_dim = () if kwargs.get("average_attn_weights", True) else (heads,)
    return out, _empty(q, (n, *heads_dim, length, source))


# Ops whose meta kernels (Python references with type promotion and checks) cost ~0.1 ms each:
# (args, kwargs) -> output or None (the meta kernel decides).
def _functional_batch_norm(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, training, ...)`` (timm's norm+act
    layers call it): the input's shape when every per-channel tensor fits the channel count.
    Its meta kernel is a decomposition costing ~5 ms a call."""
    names = ("input", "running_mean", "running_var", "weight", "bias")
    values = dict(zip(names, args))
    values.update((k, v) for k, v in kwargs.items() if k in names)
    x = values.get("input")
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point() \
            or set(kwargs) - {*names, "training", "momentum", "eps"}:
        return None
    if not all(_fits(values.get(name), x, (x.shape[1],)) for name in names[1:]):
        return None
    if kwargs.get("training", args[5] if len(args) > 5 else False) and x.numel() // x.shape[1] <= 1:
        return None  # the kernel refuses batch statistics of one value per channel
    return _same(x)


def _unary(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A shape-preserving activation on one floating tensor (no ``inplace`` aliasing to track)."""
    if len(args) != 1 or set(kwargs) - {"inplace", "approximate"} or not isinstance(args[0], torch.Tensor) \
            or not args[0].is_floating_point():
        return None
    return _same(args[0])


def _mean(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``x.mean(dim, keepdim)`` of a floating tensor over given dims (a ~7 ms Python reference on
    meta); None defers to the meta kernel (no dims, a dtype, anything unusual)."""
    names = ("input", "dim", "keepdim")
    if len(args) > 3 or set(kwargs) - set(names[1:]):
        return None
    values = dict(zip(names, args), **kwargs)
    x, dims, keep = values.get("input"), values.get("dim"), values.get("keepdim", False)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0 or not isinstance(keep, bool):
        return None
    dims = (dims,) if isinstance(dims, int) else dims
    if not isinstance(dims, (tuple, list)) or not dims or not all(isinstance(d, int) and -x.dim() <= d < x.dim() for d in dims):
        return None
    dims = {d % x.dim() for d in dims}
    if len(dims) != len(values["dim"] if isinstance(values["dim"], (tuple, list)) else (0,)):
        return None  # a repeated dim: the kernel's error
    shape = [1 if i in dims else n for i, n in enumerate(x.shape) if keep or i not in dims]
    return _empty(x, shape)


def _bound(args: tuple, kwargs: dict, names: tuple) -> dict | None:
    """``args``/``kwargs`` bound to ``names`` (positional first); None for an unknown or repeated name."""
    if len(args) > len(names) or set(kwargs) - set(names) or set(kwargs) & set(names[:len(args)]):
        return None
    return dict(zip(names, args), **kwargs)


def _functional_layer_norm(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.layer_norm(x, normalized_shape, weight, bias, eps)`` (timm's LayerNorm subclasses call
    it): the input's shape when the trailing dims, weight and bias fit (a ~2 ms decomposition on meta)."""
    values = _bound(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"))
    x = values and values.get("input")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or not isinstance(values.get("normalized_shape"), (tuple, list, torch.Size)):
        return None
    shape = tuple(values["normalized_shape"])
    if not shape or not all(isinstance(d, int) for d in shape) or len(shape) > x.dim() \
            or tuple(x.shape[x.dim() - len(shape):]) != shape \
            or not (_fits(values.get("weight"), x, shape) and _fits(values.get("bias"), x, shape)):
        return None
    return _same(x)


def _functional_linear(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` with a 2-D weight of the input's dtype (a ~1 ms reference on meta)."""
    values = _bound(args, kwargs, ("input", "weight", "bias"))
    x, w = (values.get("input"), values.get("weight")) if values else (None, None)
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or not x.is_floating_point() \
            or x.dim() < 1 or w.dim() != 2 or w.dtype != x.dtype or x.shape[-1] != w.shape[1] \
            or not _fits(values.get("bias"), x, (w.shape[0],)):
        return None
    return _empty(x, (*x.shape[:-1], w.shape[0]))


def _normalize(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.normalize(x, p, dim, eps)`` of a floating tensor over a valid dim (a ~3 ms reference on meta)."""
    values = _bound(args, kwargs, ("input", "p", "dim", "eps", "out"))
    x = values and values.get("input")
    dim = values.get("dim", 1) if values else None
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or values.get("out") is not None \
            or not isinstance(dim, int) or not -max(x.dim(), 1) <= dim < max(x.dim(), 1) \
            or not isinstance(values.get("p", 2.0), (int, float)):
        return None
    return _same(x)


def _attention_function(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale)`` on
    4-D tensors of one dtype with equal batch and head dims (no GQA broadcast) and a float or bool
    mask that broadcasts to the scores: ``(*q.shape[:-1], v.shape[-1])``. A ~2.5 ms kernel on meta."""
    values = _bound(args, kwargs, ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"))
    if not values:
        return None
    q, k, v, mask = (values.get(n) for n in ("query", "key", "value", "attn_mask"))
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.dtype == q.dtype for t in (q, k, v)) \
            or not q.is_floating_point() or values.get("enable_gqa", False) is not False \
            or not q.shape[:2] == k.shape[:2] == v.shape[:2] or q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2] \
            or not isinstance(values.get("is_causal", False), bool) \
            or not isinstance(values.get("dropout_p", 0.0), (int, float)) \
            or not (values.get("scale") is None or isinstance(values["scale"], (int, float))):
        return None
    if mask is not None:
        scores = (*q.shape[:-1], k.shape[-2])
        if not isinstance(mask, torch.Tensor) or mask.dtype not in (torch.bool, q.dtype) or mask.dim() > 4 \
                or values.get("is_causal"):
            return None
        try:
            if torch.broadcast_shapes(mask.shape, scores) != scores:
                return None
        except RuntimeError:
            return None
    return _empty(q, (*q.shape[:-1], v.shape[-1]))


_HASHABLE = (types.BuiltinFunctionType, types.FunctionType)  # targets that may key _FUNCTION_RULES
_FUNCTION_RULES = {operator.add: _binary, operator.mul: _binary, operator.sub: _binary,
                   operator.truediv: _binary, torch.add: _binary, torch.mul: _binary, torch.cat: _cat,
                   torch.nn.functional.batch_norm: _functional_batch_norm, torch.mean: _mean,
                   torch.nn.functional.layer_norm: _functional_layer_norm, torch.nn.functional.linear: _functional_linear,
                   torch.nn.functional.normalize: _normalize,
                   torch.nn.functional.scaled_dot_product_attention: _attention_function,
                   **{f: _unary for f in (torch.nn.functional.relu, torch.nn.functional.silu, torch.nn.functional.gelu,
                                          torch.nn.functional.hardswish, torch.nn.functional.hardsigmoid,
                                          torch.nn.functional.relu6, torch.sigmoid, torch.tanh, torch.relu, torch.neg,
                                          operator.neg, torch.nn.functional.dropout)}}
_METHOD_RULES = {"add": _binary, "mul": _binary, "sub": _binary, "div": _binary,
                 "sigmoid": _unary, "relu": _unary, "tanh": _unary, "mean": _mean, "neg": _unary}
def register_shape_rule(cls: type, rule: Any) -> None:
    """Give modules of exactly type ``cls`` a shape rule ``rule(module, x) -> meta tensor | None``
    (None: the meta kernel decides); ``coupling.timm_rules`` registers timm's layers this way.

    Example:
        >>> class Double(torch.nn.Module):
        ...     def forward(self, x):
        ...         return torch.cat([x, x], 1)
        >>> register_shape_rule(Double, lambda m, x: _empty(x, (x.shape[0], 2 * x.shape[1], *x.shape[2:])))
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), Double()))
        >>> from fxprune.shapes import propagate
        >>> _ = propagate(gm, (torch.randn(1, 3, 5, 5),))
        >>> [n.meta["fxprune"]["shape"] for n in gm.graph.nodes][-2]
        (1, 8, 5, 5)
    """
    _SHAPE_RULES[cls] = rule


# Modules called with several inputs: (module, args, kwargs) -> output or None.
_MODULE_CALL_RULES = {torch.nn.MultiheadAttention: _attention}
