"""The op tables: which rule gives each op its channel semantics.

Supporting a new op means adding a row here (and a test). Ops that are not here are opaque:
the channels they touch are blocked, with the reason recorded.
"""
from __future__ import annotations

import functools
import operator
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import slice_rules
from . import layout_rules as L
from . import conv_rules as C
from . import param_expr as PE
from . import param_use as PU
from . import norm_rules as N
from . import rules as R
from . import shuffle as S
from . import attention_rules as A
from . import contraction_rules as CT
from . import tensor_rules as T
from . import sdpa_rules as SDPA
from . import table_rules as TB
from . import repeat_rules as RP
from . import rnn_rules as RNN
from . import position_rules as POS

Rule = Callable[..., Any]
P = functools.partial

_ACTIVATION_FUNCTIONS = [
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.mish, F.elu, F.leaky_relu,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
    torch.exp, torch.abs, torch.neg, torch.sqrt, torch.rsqrt, torch.square, torch.clamp, torch.clip,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.zeros_like, torch.ones_like,
    operator.neg, operator.pos,
]
_ARITHMETIC_FUNCTIONS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
    torch.minimum, torch.where, operator.floordiv, operator.mod, operator.pow, torch.pow,
]
_POOL_FUNCTIONS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3,
    torch.max_pool1d: 1, torch.max_pool2d: 2, torch.max_pool3d: 3, torch.avg_pool1d: 1,
}

try:  # torchvision's stochastic depth scales whole samples: per-channel in every mode
    from torchvision.ops import stochastic_depth as _stochastic_depth
    _ACTIVATION_FUNCTIONS.append(_stochastic_depth)
except ImportError:  # pragma: no cover
    pass

FUNCTION_RULES: dict[Any, Rule] = {
    **{f: R.elementwise for f in _ACTIVATION_FUNCTIONS + _ARITHMETIC_FUNCTIONS},
    **{f: P(R.passthrough, spatial=k) for f, k in _POOL_FUNCTIONS.items()},
    F.interpolate: TB.resize, F.upsample: TB.resize,  # a resized parameter is a per-channel table
    F.pad: P(slice_rules.pad, fallback=T.pad),  # constant padding of the channel dim: an offset map
    F.softmax: P(R.along_dim, dim_pos=1), F.log_softmax: P(R.along_dim, dim_pos=1),
    torch.softmax: P(R.along_dim, dim_pos=1), torch.log_softmax: P(R.along_dim, dim_pos=1),
    torch.mean: P(R.reduction, rescale=True), torch.amax: R.reduction, torch.amin: R.reduction,
    torch.sum: P(R.reduction, exact_over_channels=True),
    F.conv1d: P(C.conv_functional, spatial=1), F.conv2d: P(C.conv_functional, spatial=2),
    F.conv3d: P(C.conv_functional, spatial=3), F.linear: R.linear_functional,
    F.conv_transpose1d: P(C.conv_functional, spatial=1, transposed=True),
    F.conv_transpose2d: P(C.conv_functional, spatial=2, transposed=True),
    F.conv_transpose3d: P(C.conv_functional, spatial=3, transposed=True),
    F.group_norm: N.group_norm_functional, F.layer_norm: N.layer_norm_functional,
    F.rms_norm: P(N.layer_norm_functional, bias_pos=None), F.prelu: N.prelu_functional,
    F.instance_norm: P(N.functional_norm, positions={"running_mean": 1, "running_var": 2, "weight": 3, "bias": 4}),
    F.batch_norm: P(N.functional_norm, positions={"running_mean": 1, "running_var": 2, "weight": 3, "bias": 4}),
    F.normalize: P(R.along_dim, dim_pos=2, default=1, exact_if_channel=True),
    torch.channel_shuffle: S.channel_shuffle,
    torch.max: R.max_min, torch.min: R.max_min,
    torch.cat: L.cat, torch.concat: L.cat, torch.concatenate: L.cat, torch.stack: L.stack,
    torch.flatten: L.flatten, torch.reshape: L.reshape, torch.unflatten: L.unflatten, torch.permute: RP.permute,
    torch.transpose: L.transpose, torch.split: L.split, torch.chunk: P(L.split, chunks=True),
    operator.getitem: TB.getitem,  # list indices and table[:, index] first, then index_rules.getitem
    getattr: lambda an, node: _getattr(an, node),
}

_ELEMENTWISE_METHODS = [
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "relu", "relu_", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "exp", "abs", "neg", "sqrt", "rsqrt", "clamp", "clamp_", "clamp_min", "clamp_max",
    "__add__", "__mul__", "pow",
]
METHOD_RULES: dict[str, Rule] = {
    **{m: R.elementwise for m in _ELEMENTWISE_METHODS},
    **{m: TB.param_copy for m in TB.COPY_METHODS},  # a parameter's own table (casts too), else elementwise
    "softmax": P(R.along_dim, dim_pos=1), "log_softmax": P(R.along_dim, dim_pos=1),
    "max": R.max_min, "min": R.max_min,
    "mean": P(R.reduction, rescale=True), "amax": R.reduction, "amin": R.reduction,
    "sum": P(R.reduction, exact_over_channels=True),
    "flatten": L.flatten, "view": L.reshape, "reshape": L.reshape, "unflatten": L.unflatten, "permute": RP.permute,
    "transpose": L.transpose, "split": L.split, "chunk": P(L.split, chunks=True),
    "size": lambda an, node: None, "dim": lambda an, node: None, "numel": lambda an, node: None,
}

_ACTIVATION_MODULES = [
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout,
]
_POOL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
    nn.ZeroPad1d: 1, nn.ZeroPad2d: 2, nn.ZeroPad3d: 3, nn.ReflectionPad2d: 2, nn.ReplicationPad2d: 2,
}
MODULE_RULES: dict[type, Rule] = {
    **{m: R.passthrough for m in _ACTIVATION_MODULES},
    **{m: P(R.passthrough, spatial=k) for m, k in _POOL_MODULES.items()},
    nn.Upsample: P(R.passthrough, spatial=None),
    nn.UpsamplingNearest2d: P(R.passthrough, spatial=None),
    nn.UpsamplingBilinear2d: P(R.passthrough, spatial=None),
    nn.Softmax: lambda an, node: _module_along_dim(an, node),
    nn.LogSoftmax: lambda an, node: _module_along_dim(an, node),
    **{m: P(POS.conv_positions, fallback=C.conv_module)  # CoaT's Conv1d over (B, 3, C) too
       for m in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)},
    nn.Linear: R.linear_module, nn.Embedding: R.embedding_module,
    nn.BatchNorm1d: R.batch_norm_module, nn.BatchNorm2d: R.batch_norm_module,
    nn.BatchNorm3d: R.batch_norm_module,
    nn.Flatten: L.flatten, nn.Unflatten: L.unflatten,
    nn.GroupNorm: N.group_norm_module, nn.LayerNorm: N.layer_norm_module, nn.RMSNorm: N.layer_norm_module,
    nn.InstanceNorm1d: N.instance_norm_module, nn.InstanceNorm2d: N.instance_norm_module,
    nn.InstanceNorm3d: N.instance_norm_module, nn.PReLU: N.prelu_module,
    nn.ChannelShuffle: S.channel_shuffle, nn.Softmax2d: P(R.along_dim, dim_pos=1, default=-3),
}


# -- transformer building blocks (tensor_rules, contraction_rules, attention_rules) ----------------------------
FUNCTION_RULES.update({
    torch._assert: T.no_channels, torch.roll: T.roll, torch.broadcast_to: T.expand,
    **{f: R.elementwise for f in (operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge)},
    torch.unsqueeze: T.unsqueeze, torch.squeeze: T.squeeze, torch.movedim: T.movedim, torch.unbind: P(POS.unbind, fallback=T.unbind),
    torch.moveaxis: T.movedim, torch.swapaxes: L.transpose, torch.swapdims: L.transpose,
    torch.einsum: CT.einsum, torch.addmm: R.addmm_functional, torch.bmm: CT.matmul,
    **{f: P(TB.param_matmul, fallback=CT.matmul) for f in (torch.matmul, operator.matmul)},
    F.scaled_dot_product_attention: SDPA.attention,
    **{f: T.creation for f in T.CREATION_SIZE if not isinstance(f, str)},
})
METHOD_RULES.update({
    "expand": T.expand, "expand_as": T.expand, "repeat": P(TB.tile, fallback=T.repeat), "unsqueeze": T.unsqueeze,
    "squeeze": T.squeeze, "movedim": T.movedim, "moveaxis": T.movedim, "swapaxes": L.transpose,
    "swapdims": L.transpose, "roll": T.roll, "bmm": CT.matmul, "unbind": P(POS.unbind, fallback=T.unbind),
    **{m: P(TB.param_matmul, fallback=CT.matmul) for m in ("matmul", "__matmul__")},
    **{m: T.creation for m in T.CREATION_SIZE if isinstance(m, str)},
})
FUNCTION_RULES[torch.narrow] = slice_rules.narrow  # an offset map on the channel dim, like a slice
METHOD_RULES["narrow"] = slice_rules.narrow
MODULE_RULES[nn.MultiheadAttention] = A.multihead_attention
try:  # torchvision's Swin functions are kept whole by torch.fx.wrap
    from torchvision.models import swin_transformer as _swin
    FUNCTION_RULES.update({
        _swin.shifted_window_attention: A.shifted_window_attention,
        _swin._get_relative_position_bias: A.relative_position_bias,
        _swin._patch_merging_pad: A.patch_merging_pad,
    })
except ImportError:  # pragma: no cover
    pass


_METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}


def _getattr(an, node):
    """``getattr(x, "shape")`` and friends read metadata only; other attributes are opaque."""
    if len(node.args) >= 2 and node.args[1] in _METADATA_ATTRIBUTES:
        return None
    return R.opaque(an, node)


def _module_along_dim(an, node):
    m = an.modules[node.target]
    if m.dim is None:
        return R.opaque(an, node, f"{R.describe(node)}: dim=None picks the dim at run time")
    return R.along_dim(an, node, dim_pos=1, default=m.dim)


def _aten_rule(target: Any) -> Rule | None:
    """An ATen op the export front end left as it is (no twin): blocked with the table's reason."""
    from ..capture.aten_twins import blocked_reason
    why = blocked_reason(target)
    if why is None:
        return None
    return lambda an, node: R.opaque(an, node, f"{R.describe(node)}: {why}")


def _region_rule(node: Any) -> Rule | None:
    """A region the export front end could not inline (an enabled autocast): blocked with its reason."""
    from ..capture.regions import region_reason
    why = region_reason(node)
    return None if why is None else (lambda an, node: R.opaque(an, node, why))


def rule_for(an, node) -> Rule | None:
    """The rule of a node, or None when the op is unknown.

    Example:
        >>> import torch.fx as fx
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.ReLU()))
        >>> from fxprune.coupling.state import Analysis
        >>> rule_for(Analysis(gm), list(gm.graph.nodes)[1]) is R.passthrough
        True
    """
    if node.op == "placeholder":
        return R.placeholder
    if node.op == "get_attr":
        return R.get_attr
    if node.op == "output":
        return R.output
    if node.op in ("call_function", "call_method") and node.name in PE.chains(an):
        return PE.chain_rule  # computes a convolution's weight row by row (param_expr)
    if node.op == "call_function":
        rule = FUNCTION_RULES.get(node.target)
        if rule is None and isinstance(node.target, torch._ops.OpOverload):
            return _aten_rule(node.target)
        if rule is None and isinstance(node.target, torch._ops.HigherOrderOperator):
            return _region_rule(node)
        return rule
    if node.op == "call_method":
        return METHOD_RULES.get(node.target)
    if node.op == "call_module":
        module = an.modules[node.target]
        for cls in type(module).__mro__:
            if cls in MODULE_RULES and type(module).forward is cls.forward:
                return MODULE_RULES[cls]
        from . import timm_rules  # its table imports timm on first use: only for timm's modules
        if timm_rules.is_timm(module):
            return timm_rules.module_rule(module)
    return None


def register_module_rule(module_type: type, rule: Rule) -> None:
    """Declare the channel semantics of a module type (e.g. a custom leaf module).

    Example:
        >>> class Scale(nn.Module):
        ...     def forward(self, x):
        ...         return x * 2
        >>> register_module_rule(Scale, R.passthrough)
    """
    MODULE_RULES[module_type] = rule


# -- norms, sliding-window unfolds and views shaped like another tensor (reduce_rules) --------
from . import reduce_rules as RR  # noqa: E402

FUNCTION_RULES.update({
    torch.norm: RR.torch_norm, torch.linalg.vector_norm: RR.linalg_vector_norm,
    torch.linalg.norm: RR.linalg_norm, torch.linalg.matrix_norm: RR.linalg_matrix_norm,
    F.unfold: RR.im2col, torch.addcmul: R.elementwise,  # input + value * t1 * t2 (ConvNeXt-V2's GRN)
    torch.reshape: RR.param_view,  # a per-channel parameter viewed to broadcast; else L.reshape
})
METHOD_RULES.update({
    "norm": RR.torch_norm, "unfold": RR.tensor_unfold, "addcmul": R.elementwise,
    "reshape_as": RR.reshape_as, "view_as": RR.reshape_as, "expand_as": RR.expand_as,
    "view": RR.param_view, "reshape": RR.param_view,
})
MODULE_RULES[nn.Unfold] = RR.im2col


from . import lookup as _lookup  # noqa: E402  (rules read the table through it: see lookup.py)

_lookup.install(rule_for=rule_for, FUNCTION_RULES=FUNCTION_RULES, METHOD_RULES=METHOD_RULES,
                MODULE_RULES=MODULE_RULES, elementwise_rules=frozenset({R.elementwise, TB.param_copy}), param_use=PU)


# -- writes into slices, constant channel padding, list indices, parameter tables ----------

FUNCTION_RULES.update({
    torch.slice_scatter: slice_rules.slice_scatter,
    torch.ops.aten.slice_scatter.default: slice_rules.slice_scatter,  # export without a twin
    torch.ops.aten._upsample_bilinear2d_aa.default: TB.resize,  # antialias=True through export
    torch.ops.aten._upsample_bicubic2d_aa.default: TB.resize,
    torch.ops.aten._upsample_bilinear2d_aa.vec: TB.resize, torch.ops.aten._upsample_bicubic2d_aa.vec: TB.resize,
    torch.ops.aten.tile.default: P(TB.tile, fallback=T.repeat),
})
FUNCTION_RULES[torch.tile] = P(TB.tile, fallback=T.repeat)
METHOD_RULES["tile"] = P(TB.tile, fallback=T.repeat)
METHOD_RULES["copy_"] = slice_rules.copy_into  # x[:, :c] = y through export: copy_ into the slice


# -- repeat_interleave, fold (the inverse of unfold), rsub -----------------------------------
FUNCTION_RULES.update({
    torch.repeat_interleave: RP.repeat_interleave,  # each unit r times in a row along the channel dim
    F.fold: RR.col2im,  # blocks of C * k entries summed into C channels: each block goes whole
    torch.rsub: R.elementwise,  # other - alpha * x (export's ``1.0 - x``): the oracle zeroes removed outputs
})
METHOD_RULES["repeat_interleave"] = RP.repeat_interleave
MODULE_RULES[nn.Fold] = RR.col2im


# -- recurrent layers: input features consumed by weight_ih_l0, hidden units pinned ----------
MODULE_RULES.update({nn.LSTM: RNN.rnn_module, nn.GRU: RNN.rnn_module, nn.RNN: RNN.rnn_module})
FUNCTION_RULES.update({op: RNN.rnn_aten for op in RNN.ATEN_OPS})  # torch.export's aten.lstm.input, ...
