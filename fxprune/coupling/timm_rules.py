"""timm's layers kept whole (``leaf_modules=[...]``): one row per layer type, built on first use.

``ops.rule_for`` consults :func:`module_rule` only for modules whose class (or a base class) is
defined in a module named ``timm.*``, so importing fxprune never imports timm; the table and the
hyper-parameter fixers of the rewrite (``fxprune.rewrite.slicers.register_fixer``) are made the
first time such a module is met.

What each row says:

- ``Conv2dSame`` (and timm's ``get_same_padding``/``pad_same``: padding from the spatial size
  only): a convolution; ``StdConv2d``/``ScaledStdConv2d`` (and ``*Same``): a convolution whose
  weight is standardised per output row (``gain`` a passenger of the output channels); the input
  channels it consumes are approximate unless it is depthwise (see ``param_expr``).
- ``BatchNormAct2d``/``FrozenBatchNormAct2d``, ``GroupNormAct``/``GroupNorm1Act``, timm's
  ``LayerNorm``/``LayerNormAct``, ``LayerNorm2d``/``LayerNormAct2d`` (channels-first, over dim 1):
  the norm's own rule, followed by its ``drop`` and ``act``, which must be per-channel modules.
- ``AvgPool2dSame``/``MaxPool2dSame``: pooling; ``BlurPool2d``: a fixed depthwise filter (its
  ``filt`` buffer a passenger when it has one row per channel; ``channels`` follows).
- timm's activations (``GELU``, ``Swish``, ``HardSwishMe``, ...): per-channel; its ``PReLU``: a
  per-channel weight.
- ``EcaModule``/``CecaModule``: blocked: a conv1d across the channel dim gates each channel by
  its neighbours.

Example:
    >>> import torch, timm.layers as tl, fxprune
    >>> m = torch.nn.Sequential(tl.Conv2dSame(3, 8, 3, stride=2), tl.BatchNormAct2d(8),
    ...                         torch.nn.Conv2d(8, 2, 1))
    >>> p = fxprune.plan(m, fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 8, 8),),
    ...                  leaf_modules=[tl.Conv2dSame, tl.BatchNormAct2d])
    >>> pruned = fxprune.apply(p)
    >>> getattr(pruned, "1").num_features
    4
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import torch.fx as fx
import torch.nn as nn

from .. import shape_rules
from . import conv_rules as C
from . import norm_rules as N
from . import rules as R
from .state import Analysis, ChannelInfo


def is_timm(module: nn.Module) -> bool:
    """True when the module's class or a base class is defined in timm."""
    return is_timm_type(type(module))


@functools.lru_cache(maxsize=4096)  # asked per module of every model and graph: once per class
def is_timm_type(cls: type) -> bool:
    """True when ``cls`` or a base class is defined in timm (read off ``__module__``: timm is not
    imported).

    Example:
        >>> is_timm_type(nn.Conv2d)
        False
    """
    return any(getattr(c, "__module__", "").startswith("timm.") for c in cls.__mro__)


def module_rule(module: nn.Module) -> Callable | None:
    """The rule of a timm module, or None when its type (with that forward) has no row."""
    table = _table()
    for cls in type(module).__mro__:
        if cls in table and type(module).forward is cls.forward:
            return table[cls]
    return None


def leaf_types(model: nn.Module, modules: Iterable[nn.Module] | None = None) -> tuple[type, ...]:
    """The types of ``model``'s timm modules that FX may keep whole: those with a row here (with
    that forward) that timm itself registers as not traceable (``timm.layers._fx``'s notrace
    modules: ``Conv2dSame``, ``BatchNormAct2d``, ``AvgPool2dSame``, ...), in the model's order.

    A leaf without a row would block its channels, so no other type is listed. timm is imported
    only when the model holds a timm module; () otherwise, or where timm has no such registry.

    Example:
        >>> import torch, timm.layers as tl
        >>> m = torch.nn.Sequential(tl.Conv2dSame(3, 8, 3), tl.BatchNormAct2d(8), tl.EcaModule(8))
        >>> [t.__name__ for t in leaf_types(m)]
        ['Conv2dSame', 'BatchNormAct2d']
        >>> leaf_types(torch.nn.Conv2d(3, 8, 3))
        ()
    """
    found = {type(m): m for m in (model.modules() if modules is None else modules) if is_timm(m)}
    if not found:
        return ()
    notrace = _notrace_modules()
    table = _table()
    leaves = []
    for cls, m in found.items():
        row = next((c for c in cls.__mro__ if c in table and cls.forward is c.forward), None)
        if row is not None and row in notrace:
            leaves.append(cls)
    return tuple(leaves)


def default_leaves(model: nn.Module, given: Iterable = (),
                   named: list[tuple[str, nn.Module]] | None = None) -> tuple[tuple[str, ...], tuple[type, ...]]:
    """The timm layers FX keeps whole by default: (their names in ``model``, their types in the
    model's order).

    A layer qualifies when its exact type is one of :func:`leaf_types` (a row here, and timm
    registers it as not traceable, as timm's own FX feature extraction keeps it) and its row takes
    it as it is (a norm's ``act``/``drop`` per-channel): kept whole it then prunes exactly as
    traced through, in a graph a fraction of the size (a ``BatchNormAct2d`` is one node instead of
    a dozen). Instances are named, not types, so a subclass with its own forward, or a layer its
    row would block, is still traced through. Types in ``given`` (the caller's ``leaf_modules``)
    are left to the caller. () for a model without timm layers (timm is not imported). ``named``:
    ``list(model.named_modules())`` where the caller has it already.

    Example:
        >>> import torch, timm.layers as tl, fxprune.coupling.ops
        >>> m = torch.nn.Sequential(tl.BatchNormAct2d(8), tl.BatchNormAct2d(8, act_layer=nn.Softmax2d))
        >>> names, types = default_leaves(m)
        >>> names, [t.__name__ for t in types]
        (('0',), ['BatchNormAct2d'])
    """
    named = list(model.named_modules()) if named is None else named
    kinds = leaf_types(model, (m for _, m in named))
    if not kinds:
        return (), ()
    given_types = tuple(t for t in given if isinstance(t, type))
    names, types = [], []
    for name, m in named:
        cls = type(m)
        if not name or cls not in kinds or (given_types and isinstance(m, given_types)):
            continue
        if getattr(module_rule(m), "checks_act", False) and act_problem(m) is not None:
            continue
        names.append(name)
        if cls not in types:
            types.append(cls)
    return tuple(names), tuple(types)


def _notrace_modules() -> frozenset:
    """The module types timm registers as leaves for FX (empty where this timm has no registry)."""
    try:
        from timm.layers import _fx
    except ImportError:
        return frozenset()
    get = getattr(_fx, "get_notrace_modules", None)
    return frozenset(get() if get is not None else getattr(_fx, "_leaf_modules", ()))


def act_problem(m: nn.Module, names: tuple = ("drop", "act")) -> str | None:
    """None when every submodule of ``m`` in ``names`` is a per-channel module fxprune knows
    (a passthrough row), else which one is not.

    Example:
        >>> import timm.layers as tl, fxprune.coupling.ops
        >>> act_problem(tl.BatchNormAct2d(8)) is None
        True
        >>> act_problem(tl.BatchNormAct2d(8, act_layer=nn.Softmax2d))
        'its act (Softmax2d) is not a per-channel module fxprune knows'
    """
    from .lookup import module_rules
    MODULE_RULES = module_rules()  # installed when ``ops`` loads: the caller loads it
    for name in names:
        sub = getattr(m, name, None)
        if sub is None:
            continue
        rule = next((MODULE_RULES[c] for c in type(sub).__mro__
                     if c in MODULE_RULES and type(sub).forward is c.forward), None)
        if rule is None and is_timm(sub):
            rule = module_rule(sub)
        if rule is not R.passthrough:
            return f"its {name} ({type(sub).__name__}) is not a per-channel module fxprune knows"
    return None


def _with_act(norm_rule: Callable) -> Callable:
    """A norm followed by ``drop`` and ``act``: the norm's rule when both are per-channel."""
    def rule(an: Analysis, node: fx.Node) -> Any:
        why = act_problem(an.modules[node.target])
        return R.opaque(an, node, f"{R.describe(node)}: {why}") if why else norm_rule(an, node)
    rule.__doc__ = f"{norm_rule.__name__}, then per-channel ``drop`` and ``act``"
    rule.checks_act = True
    return rule


def layer_norm_2d(an: Analysis, node: fx.Node) -> Any:
    """timm ``LayerNorm2d``: LayerNorm over dim 1 of an NCHW tensor (inexact over the channels;
    weight and bias are passengers; ``normalized_shape`` follows)."""
    m = an.modules[node.target]
    v = an.tensor_info(R.arg(node, 0, "input"))
    if v is None or v.dim != 1 or len(m.normalized_shape) != 1 or len(v.units) != m.normalized_shape[0]:
        return R.opaque(an, node, f"{R.describe(node)}: channels are not on dim 1")
    why = R.describe(node)
    an.units.mark_inexact(v.units, f"{why} normalises over the channel dim: removing a channel changes "
                                   "the others' mean and variance")
    for target in N._present(m, node.target, ("weight", "bias")):
        an.slice_param(target, 0, "passenger", v.units, node.target, why)
    an.size_module(node.target, v.units, why)
    return ChannelInfo(1, v.units)


def std_conv(an: Analysis, node: fx.Node) -> Any:
    """timm ``StdConv2d``/``ScaledStdConv2d`` kept whole: a convolution whose weight rows are
    standardised over their input channels (``gain``: one entry per output channel)."""
    m = an.modules[node.target]
    v = an.tensor_info(R.arg(node, 0, "input"))
    out = C.conv_module(an, node)
    if not isinstance(out, ChannelInfo):
        return out
    why = R.describe(node)
    if getattr(m, "gain", None) is not None:
        an.slice_param(f"{node.target}.gain", 0, "passenger", out.units, node.target, why)
    if m.groups != m.in_channels and v is not None and v.dim == 1:
        an.units.mark_inexact(v.units, f"{why} standardises each weight row over its input channels: "
                                       "removing an input channel changes the kept weights")
    return out


def blur_pool(an: Analysis, node: fx.Node) -> Any:
    """timm ``BlurPool2d``: reflect-padding and a fixed depthwise low-pass filter (per channel)."""
    m = an.modules[node.target]
    v = an.tensor_info(R.arg(node, 0, "input"))
    if v is None or v.dim != 1 or R.ndim(an, R.arg(node, 0, "input")) != 4:
        return R.opaque(an, node, f"{R.describe(node)}: channels are not on dim 1 of an NCHW input")
    if m.channels is not None:
        an.slice_param(f"{node.target}.filt", 0, "passenger", v.units, node.target, R.describe(node))
        an.size_module(node.target, v.units, R.describe(node))
    return ChannelInfo(1, v.units)


def eca(an: Analysis, node: fx.Node) -> Any:
    """timm ``EcaModule``/``CecaModule``: blocked (each channel's gate mixes its neighbours)."""
    k = an.modules[node.target].conv.kernel_size[0]
    return R.opaque(an, node, f"{R.describe(node)}: a conv1d across the channel dim (kernel {k}) gates "
                              "each channel by its neighbours' means")


# -- fixers of the rewrite (module size attributes after slicing) -----------------------------
def _blur_pool_fixer(m: nn.Module, before: dict) -> None:
    if m.channels is not None:
        m.channels = m.filt.shape[0]


def _frozen_bn_fixer(m: nn.Module, before: dict) -> None:
    m.num_features = m.running_mean.shape[0]


_ACTIVATIONS = (  # elementwise, one value in, one out
    "activations:Swish", "activations:Mish", "activations:Sigmoid", "activations:Tanh", "activations:HardSwish",
    "activations:HardSigmoid", "activations:HardMish", "activations:GELU", "activations:GELUTanh",
    "activations:QuickGELU", "activations_me:SwishMe", "activations_me:MishMe", "activations_me:HardSigmoidMe",
    "activations_me:HardSwishMe", "activations_me:HardMishMe",
)
ROWS: dict[str, Callable] = {  # "timm.layers.<module>:<class>" -> rule
    "conv2d_same:Conv2dSame": C.conv_module,
    **{f"std_conv:{n}": std_conv for n in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")},
    "norm_act:BatchNormAct2d": _with_act(R.batch_norm_module),
    "norm_act:FrozenBatchNormAct2d": _with_act(R.batch_norm_module),
    "norm_act:GroupNormAct": _with_act(N.group_norm_module), "norm_act:GroupNorm1Act": _with_act(N.group_norm_module),
    "norm:LayerNorm": N.layer_norm_module, "norm_act:LayerNormAct": _with_act(N.layer_norm_module),
    "norm:LayerNorm2d": layer_norm_2d, "norm_act:LayerNormAct2d": _with_act(layer_norm_2d),
    "pool2d_same:AvgPool2dSame": functools.partial(R.passthrough, spatial=2),
    "pool2d_same:MaxPool2dSame": functools.partial(R.passthrough, spatial=2),
    "blur_pool:BlurPool2d": blur_pool,
    "eca:EcaModule": eca, "eca:CecaModule": eca,
    **{name: R.passthrough for name in _ACTIVATIONS},
    "activations:PReLU": N.prelu_module,
}
FIXER_ROWS: dict[str, Callable] = {
    "blur_pool:BlurPool2d": _blur_pool_fixer,
    "norm_act:FrozenBatchNormAct2d": _frozen_bn_fixer,
}


# -- shape rules (``fxprune.shape_rules``) for the layers FX keeps whole ------------------------------
def _std_conv_shape(m: nn.Module, x: Any) -> Any:
    """``StdConv2d``/``ScaledStdConv2d`` (and ``*Same``): a conv whose weight is standardised in
    place; ``gain`` has one entry per output channel."""
    gain = getattr(m, "gain", None)
    if gain is not None and gain.numel() != m.out_channels:
        return None
    return shape_rules.conv_shape(m, x, same=bool(getattr(m, "same_pad", False)))


def _with_act_shape(norm: Callable) -> Callable:
    """A norm followed by ``drop`` and ``act``: the norm's shape when both are per-channel."""
    return lambda m, x: None if act_problem(m) is not None else norm(m, x)


SHAPE_ROWS: dict[str, Callable] = {  # the meta kernels of these decompose the whole layer
    "norm_act:BatchNormAct2d": _with_act_shape(shape_rules.batch_norm_shape),
    "norm_act:FrozenBatchNormAct2d": _with_act_shape(shape_rules.batch_norm_shape),
    "conv2d_same:Conv2dSame": functools.partial(shape_rules.conv_shape, same=True),
    **{f"std_conv:{n}": _std_conv_shape for n in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d",
                                                  "ScaledStdConv2dSame")},
}


def resolve(name: str) -> type | None:
    """``"module:Class"`` under ``timm.layers`` as a type; None where this timm lacks it."""
    import importlib
    module, _, cls = name.partition(":")
    try:
        return getattr(importlib.import_module(f"timm.layers.{module}"), cls, None)
    except ImportError:
        return None


@functools.lru_cache(maxsize=None)
def _table() -> dict:
    """``ROWS`` by type (timm imported here, on first use); registers ``FIXER_ROWS`` with the
    rewrite and ``SHAPE_ROWS`` with the shape pass."""
    from ..rewrite import slicers
    for name, fixer in FIXER_ROWS.items():
        cls = resolve(name)
        if cls is not None:
            slicers.register_fixer(cls, fixer)
    for name, shape_rule in SHAPE_ROWS.items():
        cls = resolve(name)
        if cls is not None:
            shape_rules.register_shape_rule(cls, shape_rule)
    return {cls: rule for name, rule in ROWS.items() if (cls := resolve(name)) is not None}
