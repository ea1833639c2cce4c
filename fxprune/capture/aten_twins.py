"""The ATen op table: each ATen op of an exported graph and its Python-level twin.

An exported graph calls ATen ops (``torch.ops.aten.conv2d.default``); fxprune's op tables speak
Python-level torch (``F.conv2d``, ``torch.cat``, ``x.view``). A twin is the Python-level call that
computes the same thing, given the ATen op's arguments through an adapter when their order or
spelling differs. The export front end rewrites every ATen call to its twin, so an ATen op and
its Python-level twin share one coupling rule, one shape rule and one slicer: there is no second
copy of op knowledge. An ATen op without a row stays as it is and blocks the channels it touches.

Example:
    >>> twin = TWINS[torch.ops.aten.conv2d]
    >>> twin.op, twin.target is F.conv2d
    ('call_function', True)
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F

aten = torch.ops.aten
Adapter = Callable[[tuple, dict], tuple[tuple, dict]]


def same(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Arguments that the twin takes as they are."""
    return args, kwargs


@dataclasses.dataclass(frozen=True)
class Twin:
    """A Python-level call equal to an ATen op: ``op`` is ``"call_function"`` or ``"call_method"``.

    Example:
        >>> Twin("call_method", "view").adapt((1, [2]), {})
        ((1, [2]), {})
    """

    op: str
    target: Any
    adapt: Adapter = same


def _fn(target: Any, adapt: Adapter = same) -> Twin:
    return Twin("call_function", target, adapt)


def _method(name: str, adapt: Adapter = same) -> Twin:
    return Twin("call_method", name, adapt)


def _positional(*names: str) -> Adapter:
    """Move keyword arguments of the ATen schema into positions (for twins that name them otherwise)."""
    def adapt(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args, kwargs = list(args), dict(kwargs)
        for name in names[len(args):]:
            if name not in kwargs:
                break
            args.append(kwargs.pop(name))
        return tuple(args), kwargs
    return adapt


def _batch_norm(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # aten: (input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled)
    x, w, b, mean, var, training, momentum, eps = (*args, *[None] * 8)[:8]
    return (x, mean, var, w, b, bool(training), 0.1 if momentum is None else momentum,
            1e-5 if eps is None else eps), {}


def _layer_norm(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return tuple(args[:5]), {}  # drops cudnn_enable


def _group_norm(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return tuple(args[:5]), {}


def _embedding(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    weight, indices, padding_idx = (*args, -1)[:3]
    return (indices, weight, None if padding_idx == -1 else padding_idx), {}


def _einsum(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return (args[0], *args[1]), {}


def _softmax(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return (args[0], args[1]), {}  # _softmax's half_to_float is False in every traced model


def _constant_pad(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return (args[0], list(args[1]), "constant", args[2] if len(args) > 2 else 0.0), {}


def _upsample(mode: str, align_pos: int | None) -> Adapter:
    def adapt(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x, size = args[0], args[1]
        scales = args[-1] if len(args) > 2 else kwargs.get("scale_factors")
        out = {"mode": mode}
        if size is not None:
            out["size"] = list(size)
        else:
            out["scale_factor"] = list(scales)
        if align_pos is not None:
            out["align_corners"] = args[align_pos]
        return (x,), out
    return adapt


def _at_dim(dim: int, entry: Any) -> tuple:
    """An index that puts ``entry`` at ``dim`` (a negative dim counts from the end, after ``...``)."""
    if dim < 0:
        return (Ellipsis, entry, *[slice(None)] * (-dim - 1))
    return (*[slice(None)] * dim, entry)


def _slice(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    x, dim, start, end, step = (*args, *[None] * 5)[:5]
    dim = dim or 0
    stop = None if end is None or end >= 2 ** 62 else end  # "to the end" is spelled 2**63 - 1
    return (x, _at_dim(dim, slice(start, stop, step if step not in (None, 1) else None))), {}


def _select(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    x, dim, index = args
    return (x, _at_dim(dim, index)), {}


def _narrow(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    x, dim, start, length = args
    stop = start + length
    return (x, _at_dim(dim, slice(start, None if start < 0 and stop == 0 else stop))), {}


def _index(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # aten.index(x, [None, idx]): None is a whole dim (Python's ':'), not a new axis
    x, indices = args
    return (x, tuple(slice(None) if i is None else i for i in indices)), {}


def _clamp(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return (args[0],), {"min": args[1] if len(args) > 1 else kwargs.get("min"),
                        "max": args[2] if len(args) > 2 else kwargs.get("max")}


def _clamp_min(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return (args[0],), {"min": args[1]}


def _clamp_max(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return (args[0],), {"max": args[1]}


def _transpose_2d(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return (args[0], 0, 1) if args[0] is not None else args, {}


def _to(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # to.dtype(x, dtype, ...), to.device(x, device, dtype, ...), to.other(x, other, ...), _to_copy(x, *, ...)
    kwargs = {k: v for k, v in kwargs.items() if k in ("dtype", "device", "memory_format") and v is not None}
    targets = tuple(a for a in args[1:3] if not isinstance(a, bool) and a is not None)
    return (*args[:1], *targets), kwargs


def _unary(name: str) -> Twin:
    return _fn(getattr(torch, name))


_UNARY = ["relu", "sigmoid", "tanh", "exp", "abs", "neg", "sqrt", "rsqrt", "square", "log", "sin", "cos",
          "erf", "reciprocal", "floor", "ceil", "round", "sign", "logical_not", "isnan", "bitwise_not"]
_INPLACE_METHODS = ["add_", "sub_", "mul_", "div_", "relu_", "sigmoid_", "tanh_", "clamp_", "clamp_min_",
                    "clamp_max_", "masked_fill_", "copy_", "fill_", "zero_", "exp_", "neg_"]

# ATen op (overload packet) -> its Python-level twin. Keep rows one op a line, grouped by kind.
TWINS: dict[Any, Twin] = {
    # elementwise, unary
    **{getattr(aten, name): _unary(name) for name in _UNARY},
    **{getattr(aten, name): _method(name) for name in _INPLACE_METHODS},
    aten.gelu: _fn(F.gelu), aten.silu: _fn(F.silu), aten.mish: _fn(F.mish), aten.elu: _fn(F.elu),
    aten.hardswish: _fn(F.hardswish), aten.hardsigmoid: _fn(F.hardsigmoid), aten.hardtanh: _fn(F.hardtanh),
    aten.leaky_relu: _fn(F.leaky_relu), aten.softplus: _fn(F.softplus), aten.relu6: _fn(F.relu6),
    aten.silu_: _fn(F.silu, lambda a, k: ((a[0],), {"inplace": True})),
    aten.hardswish_: _fn(F.hardswish, lambda a, k: ((a[0],), {"inplace": True})),
    aten.hardsigmoid_: _fn(F.hardsigmoid, lambda a, k: ((a[0],), {"inplace": True})),
    aten.hardtanh_: _fn(F.hardtanh, lambda a, k: ((*a[:3],), {"inplace": True})),
    aten.leaky_relu_: _fn(F.leaky_relu, lambda a, k: ((*a[:2],), {"inplace": True})),
    aten.gelu_: _fn(F.gelu, lambda a, k: ((a[0],), dict(k))),  # no in-place gelu in Python: the result is used
    aten.clamp: _fn(torch.clamp, _clamp), aten.clamp_min: _fn(torch.clamp, _clamp_min),
    aten.clamp_max: _fn(torch.clamp, _clamp_max),
    aten.dropout: _fn(F.dropout), aten.feature_dropout: _fn(F.dropout2d),
    aten.feature_dropout_: _fn(F.dropout2d, lambda a, k: ((*a[:3],), {"inplace": True})),
    aten.alpha_dropout: _fn(F.alpha_dropout),
    # elementwise, binary (Tensor and Scalar overloads alike)
    aten.add: _fn(torch.add), aten.sub: _fn(torch.sub), aten.rsub: _fn(torch.rsub), aten.mul: _fn(torch.mul),
    aten.div: _fn(torch.div), aten.pow: _fn(torch.pow), aten.maximum: _fn(torch.maximum),
    aten.minimum: _fn(torch.minimum), aten.where: _fn(torch.where), aten.remainder: _fn(torch.remainder),
    aten.floor_divide: _fn(torch.floor_divide), aten.fmod: _fn(torch.fmod),
    aten.eq: _fn(operator.eq), aten.ne: _fn(operator.ne), aten.lt: _fn(operator.lt), aten.le: _fn(operator.le),
    aten.gt: _fn(operator.gt), aten.ge: _fn(operator.ge),
    aten.logical_and: _fn(torch.logical_and), aten.logical_or: _fn(torch.logical_or),
    aten.bitwise_and: _fn(torch.bitwise_and), aten.bitwise_or: _fn(torch.bitwise_or),
    aten.__and__: _fn(operator.and_), aten.__or__: _fn(operator.or_), aten.diff: _fn(torch.diff),
    aten.index: _fn(operator.getitem, _index), aten.gather: _fn(torch.gather),
    aten.item: _method("item"), aten.meshgrid: _fn(torch.meshgrid, lambda a, k: ((*a[0],), dict(k))),
    aten.masked_fill: _method("masked_fill"),
    # dtype, device, copies
    aten.to: _method("to", _to), aten._to_copy: _method("to", _to), aten.clone: _method("clone", lambda a, k: (a[:1], {})),
    aten.contiguous: _method("contiguous", lambda a, k: (a[:1], {})), aten.detach: _method("detach"),
    aten.lift_fresh_copy: _method("clone"), aten.type_as: _method("type_as"),
    # layout
    aten.view: _method("view"), aten.reshape: _method("reshape"), aten._unsafe_view: _method("view"),
    aten.unflatten: _method("unflatten"),
    aten.permute: _fn(torch.permute), aten.transpose: _fn(torch.transpose), aten.t: _fn(torch.transpose, _transpose_2d),
    aten.flatten: _fn(torch.flatten), aten.unsqueeze: _fn(torch.unsqueeze), aten.squeeze: _fn(torch.squeeze),
    aten.expand: _method("expand", lambda a, k: (a[:2], {})), aten.expand_as: _method("expand_as"),
    aten.repeat: _method("repeat"), aten.cat: _fn(torch.cat), aten.concat: _fn(torch.cat),
    aten.stack: _fn(torch.stack), aten.split: _fn(torch.split), aten.split_with_sizes: _fn(torch.split),
    aten.chunk: _fn(torch.chunk), aten.unbind: _fn(torch.unbind), aten.roll: _fn(torch.roll),
    aten.movedim: _fn(torch.movedim), aten.slice: _fn(operator.getitem, _slice),
    aten.select: _fn(operator.getitem, _select), aten.narrow: _fn(operator.getitem, _narrow),
    aten.channel_shuffle: _fn(torch.channel_shuffle), aten.pixel_shuffle: _fn(F.pixel_shuffle),
    # reductions and normalised maps
    aten.mean: _fn(torch.mean), aten.sum: _fn(torch.sum), aten.amax: _fn(torch.amax), aten.amin: _fn(torch.amin),
    aten.softmax: _fn(torch.softmax, _softmax), aten._softmax: _fn(torch.softmax, _softmax),
    aten.log_softmax: _fn(torch.log_softmax, _softmax), aten._log_softmax: _fn(torch.log_softmax, _softmax),
    aten.cumsum: _fn(torch.cumsum), aten.max: _fn(torch.max), aten.min: _fn(torch.min),
    # layers
    aten.conv1d: _fn(F.conv1d), aten.conv2d: _fn(F.conv2d), aten.conv3d: _fn(F.conv3d),
    aten.conv_transpose1d: _fn(F.conv_transpose1d), aten.conv_transpose2d: _fn(F.conv_transpose2d),
    aten.conv_transpose3d: _fn(F.conv_transpose3d), aten.linear: _fn(F.linear),
    aten.matmul: _fn(torch.matmul), aten.bmm: _fn(torch.matmul), aten.mm: _fn(torch.matmul),
    aten.einsum: _fn(torch.einsum, _einsum), aten.addmm: _fn(torch.addmm),
    aten.batch_norm: _fn(F.batch_norm, _batch_norm), aten.layer_norm: _fn(F.layer_norm, _layer_norm),
    aten.group_norm: _fn(F.group_norm, _group_norm), aten.rms_norm: _fn(F.rms_norm),
    aten.embedding: _fn(F.embedding, _embedding), aten.prelu: _fn(F.prelu),
    aten.scaled_dot_product_attention: _fn(F.scaled_dot_product_attention),
    # pooling, resampling, padding
    aten.max_pool1d: _fn(F.max_pool1d), aten.max_pool2d: _fn(F.max_pool2d), aten.max_pool3d: _fn(F.max_pool3d),
    aten.avg_pool1d: _fn(F.avg_pool1d), aten.avg_pool2d: _fn(F.avg_pool2d), aten.avg_pool3d: _fn(F.avg_pool3d),
    aten.adaptive_avg_pool1d: _fn(F.adaptive_avg_pool1d), aten.adaptive_avg_pool2d: _fn(F.adaptive_avg_pool2d),
    aten.adaptive_avg_pool3d: _fn(F.adaptive_avg_pool3d),
    aten.pad: _fn(F.pad), aten.constant_pad_nd: _fn(F.pad, _constant_pad),
    aten.upsample_nearest1d: _fn(F.interpolate, _upsample("nearest", None)),
    aten.upsample_nearest2d: _fn(F.interpolate, _upsample("nearest", None)),
    aten.upsample_nearest3d: _fn(F.interpolate, _upsample("nearest", None)),
    aten.upsample_bilinear2d: _fn(F.interpolate, _upsample("bilinear", 2)),
    aten.upsample_bicubic2d: _fn(F.interpolate, _upsample("bicubic", 2)),
    aten.upsample_linear1d: _fn(F.interpolate, _upsample("linear", 2)),
    # tensor creation (no channel inputs)
    aten.arange: _fn(torch.arange), aten.zeros: _fn(torch.zeros), aten.ones: _fn(torch.ones),
    aten.full: _fn(torch.full), aten.zeros_like: _fn(torch.zeros_like), aten.ones_like: _fn(torch.ones_like),
    aten.full_like: _fn(torch.full_like), aten.empty_like: _fn(torch.empty_like),
    aten.new_ones: _method("new_ones"), aten.new_zeros: _method("new_zeros"), aten.new_full: _method("new_full"),
    aten.tril: _fn(torch.tril), aten.triu: _fn(torch.triu),
}

# norms, sliding-window unfolds and views shaped like another tensor (coupling/reduce_rules.py)
TWINS.update({
    aten.norm: _method("norm"),  # p=None (ScalarOpt overloads) is the 2-norm, as in Tensor.norm
    aten.linalg_vector_norm: _fn(torch.linalg.vector_norm), aten.linalg_norm: _fn(torch.linalg.norm),
    aten.linalg_matrix_norm: _fn(torch.linalg.matrix_norm),
    aten.im2col: _fn(F.unfold),  # (x, kernel_size, dilation, padding, stride): F.unfold's order
    aten.addcmul: _fn(torch.addcmul),
    aten.unfold: _method("unfold"), aten.reshape_as: _method("reshape_as"), aten.view_as: _method("view_as"),
    aten.col2im: _fn(F.fold),  # (x, output_size, kernel_size, dilation, padding, stride): F.fold's order
    aten.repeat_interleave: _fn(torch.repeat_interleave),  # self_int, self_Tensor; Tensor: repeats alone
})

# ATen ops that only assert metadata or alias a value: the node is dropped (its users read the input).
DROPPED = {aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size,
           aten._assert_async}
ALIASES = {aten.alias, aten.lift_fresh}


# ATen ops with no Python-level twin that fxprune can track, and why their channels are blocked.
BLOCKED: dict[Any, str] = {
    aten.nonzero: "its output size depends on tensor values",
    aten.index_put: "writes positions chosen by an index tensor",
    aten.index_put_: "writes positions chosen by an index tensor",
    aten.scatter: "writes positions chosen by an index tensor",
    aten.scatter_add: "writes positions chosen by an index tensor",
    aten.scatter_reduce: "writes positions chosen by an index tensor",
    aten.index_select: "picks positions chosen by an index tensor",
    aten.sort: "reorders values along a dim by their values",
    aten.topk: "picks values along a dim by their values",
    aten.argmax: "returns positions, not channel values",
    aten.argmin: "returns positions, not channel values",
    aten.grid_sampler_2d: "samples positions given by another tensor",
    aten.unique_consecutive: "its output size depends on tensor values",
    aten._unique2: "its output size depends on tensor values",
    aten.multinomial: "draws random positions",
    aten.bernoulli: "draws random values",
    aten.stft: "mixes the signal dim into frequencies",
}


def blocked_reason(target: Any) -> str | None:
    """Why an ATen op without a twin blocks the channels it touches (None: no row).

    Example:
        >>> blocked_reason(torch.ops.aten.nonzero.default)
        'its output size depends on tensor values'
    """
    return BLOCKED.get(getattr(target, "overloadpacket", None))


def twin_of(target: Any) -> Twin | None:
    """The Python-level twin of an ATen op overload, or None when the table has no row.

    Example:
        >>> twin_of(torch.ops.aten.relu.default).target is torch.relu
        True
        >>> twin_of(torch.ops.aten.nonzero.default) is None  # blocked, see BLOCKED
        True
    """
    packet = getattr(target, "overloadpacket", None)
    return TWINS.get(packet) if packet is not None else None
