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

from . import layout_rules as L
from . import rules as R

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
    torch.minimum, torch.where,
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
    F.interpolate: P(R.passthrough, spatial=None),
    F.upsample: P(R.passthrough, spatial=None),
    F.pad: P(R.passthrough, spatial=None),
    F.softmax: P(R.along_dim, dim_pos=1), F.log_softmax: P(R.along_dim, dim_pos=1),
    torch.softmax: P(R.along_dim, dim_pos=1), torch.log_softmax: P(R.along_dim, dim_pos=1),
    torch.mean: R.reduction, torch.amax: R.reduction, torch.amin: R.reduction,
    torch.sum: P(R.reduction, exact_over_channels=True),
    F.conv1d: P(R.conv_functional, spatial=1), F.conv2d: P(R.conv_functional, spatial=2),
    F.conv3d: P(R.conv_functional, spatial=3), F.linear: R.linear_functional,
    torch.cat: L.cat, torch.concat: L.cat, torch.concatenate: L.cat, torch.stack: L.stack,
    torch.flatten: L.flatten, torch.reshape: L.reshape, torch.permute: L.permute,
    torch.transpose: L.transpose, torch.split: L.split, torch.chunk: P(L.split, chunks=True),
    operator.getitem: L.getitem,
    getattr: lambda an, node: _getattr(an, node),
}

_ELEMENTWISE_METHODS = [
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "relu", "relu_", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "exp", "abs", "neg", "sqrt", "rsqrt", "clamp", "clamp_", "clamp_min", "clamp_max",
    "contiguous", "clone", "detach", "float", "double", "half", "to", "type_as", "__add__", "__mul__",
]
METHOD_RULES: dict[str, Rule] = {
    **{m: R.elementwise for m in _ELEMENTWISE_METHODS},
    "softmax": P(R.along_dim, dim_pos=1), "log_softmax": P(R.along_dim, dim_pos=1),
    "mean": R.reduction, "amax": R.reduction, "amin": R.reduction,
    "sum": P(R.reduction, exact_over_channels=True),
    "flatten": L.flatten, "view": L.reshape, "reshape": L.reshape, "permute": L.permute,
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
    nn.Conv1d: R.conv_module, nn.Conv2d: R.conv_module, nn.Conv3d: R.conv_module,
    nn.ConvTranspose1d: R.conv_module, nn.ConvTranspose2d: R.conv_module, nn.ConvTranspose3d: R.conv_module,
    nn.Linear: R.linear_module,
    nn.BatchNorm1d: R.batch_norm_module, nn.BatchNorm2d: R.batch_norm_module,
    nn.BatchNorm3d: R.batch_norm_module,
    nn.Flatten: L.flatten,
}


_METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}


def _getattr(an, node):
    """``getattr(x, "shape")`` and friends read metadata only; other attributes are opaque."""
    if len(node.args) >= 2 and node.args[1] in _METADATA_ATTRIBUTES:
        return None
    return R.opaque(an, node)


def _module_along_dim(an, node):
    m = an.modules[node.target]
    v = an.tensor_info(node.args[0])
    nd = R.ndim(an, node.args[0])
    if v is None or m.dim is None or R.norm_dim(m.dim, nd) == v.dim:
        return R.opaque(an, node, f"{R.describe(node)} works along the channel dim and mixes channels")
    return R.passthrough(an, node)


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
    if node.op == "call_function":
        return FUNCTION_RULES.get(node.target)
    if node.op == "call_method":
        return METHOD_RULES.get(node.target)
    if node.op == "call_module":
        module = an.modules[node.target]
        for cls in type(module).__mro__:
            if cls in MODULE_RULES and type(module).forward is cls.forward:
                return MODULE_RULES[cls]
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
