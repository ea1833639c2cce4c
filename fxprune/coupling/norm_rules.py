"""Normalisations and per-channel parameters: GroupNorm, LayerNorm, InstanceNorm, PReLU.

What each one does to the channels it normalises:

- **InstanceNorm** (and functional ``batch_norm``): statistics per channel, so a channel's
  removal changes no other channel. Exact; affine weight/bias and running stats are passengers.
- **GroupNorm(G, C)**, ``G > 1``: statistics per norm-group of ``C // G`` channels. Removing part
  of a norm-group changes the other members' mean/var, but a whole norm-group can go exactly,
  so the channels of each norm-group are coupled into one unit (a *norm-group* edge) and
  ``num_groups`` shrinks with the kept width. ``G == 1`` normalises over all channels: the
  channels stay separate and are marked inexact (like LayerNorm).
- **LayerNorm** over the channel dim: the statistics mix every channel, so removal is an
  approximation: the units are marked inexact with the reason and weight/bias are passengers.
  LayerNorm over other dims only (the channel dim not normalised) is per-channel and exact.
- **PReLU** with ``num_parameters == C``: the weight is a passenger (exact).

Example:
    >>> import torch, fxprune
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.GroupNorm(4, 8), torch.nn.Conv2d(8, 2, 1))
    >>> p = fxprune.plan(m, fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 4, 4),))
    >>> g = p.groups[0]                     # 4 norm-groups of 2 channels
    >>> (g.size, g.kept, g.exact)
    (4, 2, True)
    >>> getattr(fxprune.apply(p), "1")
    GroupNorm(2, 4, eps=1e-05, affine=True, bias=True)
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from . import rules as R
from .state import Analysis, ChannelInfo, ParamRef


def _passengers(an: Analysis, node: fx.Node, targets: list, units, owner: str | None = None) -> None:
    """Declare every tensor in ``targets`` (None entries skipped) a per-channel passenger."""
    for target in targets:
        if target:
            an.slice_param(target, 0, "passenger", units, owner or target, R.describe(node))


def _present(m, target: str, names: tuple) -> list:
    return [f"{target}.{n}" for n in names if getattr(m, n, None) is not None]


def _ref(an: Analysis, node: fx.Node, pos: int, name: str) -> Any:
    """A ``get_attr`` tensor argument as its target; None if absent; False if not a parameter."""
    a = R.arg(node, pos, name)
    if a is None:
        return None
    v = an.value(a)
    return v.target if isinstance(v, ParamRef) else False


def _feature_dim(an: Analysis, node: fx.Node, v: ChannelInfo | None, spatial: int | None) -> bool:
    nd = R.ndim(an, R.arg(node, 0, "input"))
    if v is None or nd is None:
        return False
    return v.dim == (1 if spatial is None else nd - spatial - 1)


# -- per-channel statistics: exact ---------------------------------------------------------
def instance_norm_module(an: Analysis, node: fx.Node) -> Any:
    """``nn.InstanceNorm{1,2,3}d``: statistics per channel (exact); batched or not."""
    m = an.modules[node.target]
    v = an.tensor_info(R.arg(node, 0, "input"))
    if not _feature_dim(an, node, v, m._get_no_batch_dim() - 1):
        return R.opaque(an, node, f"{R.describe(node)}: channels are not on the feature dim")
    names = _present(m, node.target, ("weight", "bias", "running_mean", "running_var"))
    _passengers(an, node, names, v.units, node.target)
    an.size_module(node.target, v.units, R.describe(node))
    return ChannelInfo(v.dim, v.units)


def functional_norm(an: Analysis, node: fx.Node, positions: dict) -> Any:
    """``F.instance_norm`` / ``F.batch_norm``: per-channel statistics on dim 1 (exact)."""
    v = an.tensor_info(R.arg(node, 0, "input"))
    if not _feature_dim(an, node, v, None):
        return R.opaque(an, node, f"{R.describe(node)}: channels are not on dim 1")
    refs = {name: _ref(an, node, pos, name) for name, pos in positions.items()}
    if any(r is False for r in refs.values()):
        return R.opaque(an, node, f"{R.describe(node)}: statistics/affine are not get_attr tensors")
    _passengers(an, node, list(refs.values()), v.units)
    return ChannelInfo(v.dim, v.units)


# -- statistics over several channels -------------------------------------------------------
def _group_norm(an: Analysis, node: fx.Node, v: ChannelInfo, groups: int, why: str) -> None:
    size = len(v.units)
    per = size // groups
    if groups == 1 and size > 1:
        an.units.mark_inexact(v.units, f"{why} normalises over all channels (num_groups=1): "
                                       "removing one changes the others' mean and variance")
        return
    for i in range(groups):
        block = v.units[i * per:(i + 1) * per]
        an.units.union((block[0],) * per, block, "norm-group",
                       f"{why}: norm-group {i} shares its mean and variance, so it goes whole")


def group_norm_module(an: Analysis, node: fx.Node) -> Any:
    """``nn.GroupNorm``: whole norm-groups go (exact); ``num_groups=1`` is inexact."""
    m = an.modules[node.target]
    v = an.tensor_info(R.arg(node, 0, "input"))
    if not _feature_dim(an, node, v, None) or len(v.units) != m.num_channels:
        return R.opaque(an, node, f"{R.describe(node)}: channels are not on dim 1")
    _group_norm(an, node, v, m.num_groups, R.describe(node))
    _passengers(an, node, _present(m, node.target, ("weight", "bias")), v.units, node.target)
    an.size_module(node.target, v.units, R.describe(node))
    return ChannelInfo(v.dim, v.units)


def group_norm_functional(an: Analysis, node: fx.Node) -> Any:
    """``F.group_norm(x, num_groups, weight, bias)``: the literal ``num_groups`` is rewritten."""
    v = an.tensor_info(R.arg(node, 0, "input"))
    groups = R.arg(node, 1, "num_groups")
    refs = [_ref(an, node, 2, "weight"), _ref(an, node, 3, "bias")]
    if not _feature_dim(an, node, v, None) or not isinstance(groups, int) or False in refs:
        return R.opaque(an, node, f"{R.describe(node)}: needs channels on dim 1, an int num_groups "
                                  "and get_attr affine tensors")
    _group_norm(an, node, v, groups, R.describe(node))
    _passengers(an, node, refs, v.units)
    an.rewrite_literal(node, "group_norm", (v.units, len(v.units) // groups if groups > 1 else 0))
    return ChannelInfo(v.dim, v.units)


def _layer_norm(an: Analysis, node: fx.Node, shape: tuple, weights: list, owner: str | None) -> tuple:
    """(value, index of the channel dim inside ``shape`` or None when it is not normalised)."""
    x = R.arg(node, 0, "input")
    v, nd = an.tensor_info(x), R.ndim(an, x)
    if v is None or nd is None:
        return R.opaque(an, node), None
    first = nd - len(shape)
    if v.dim < first:  # the channel dim is not normalised: per-channel, exact
        return ChannelInfo(v.dim, v.units), None
    why = R.describe(node)
    an.units.mark_inexact(v.units, f"{why} normalises over the channel dim: removing a channel "
                                   "changes the others' mean and variance")
    for target in weights:
        if target:
            an.slice_param(target, v.dim - first, "passenger", v.units, owner or target, why)
    return ChannelInfo(v.dim, v.units), v.dim - first


def layer_norm_module(an: Analysis, node: fx.Node) -> Any:
    """``nn.LayerNorm`` (and ``nn.RMSNorm``): inexact over the channel dim, exact otherwise."""
    m = an.modules[node.target]
    shape = tuple(m.normalized_shape)
    names = _present(m, node.target, ("weight", "bias"))
    out, index = _layer_norm(an, node, shape, names, node.target)
    if index is not None and not names:
        if index != len(shape) - 1:
            an.units.pin(out.units, f"{R.describe(node)}: no affine weight tells which normalised dim "
                                    "carries the channels")
        an.size_module(node.target, out.units, R.describe(node))
    return out


def layer_norm_functional(an: Analysis, node: fx.Node, bias_pos: int | None = 3) -> Any:
    """``F.layer_norm(x, shape, weight, bias)`` / ``F.rms_norm(x, shape, weight)``: the literal
    ``normalized_shape`` is rewritten."""
    shape = R.arg(node, 1, "normalized_shape")
    refs = [_ref(an, node, 2, "weight")] + ([_ref(an, node, bias_pos, "bias")] if bias_pos else [])
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) for d in shape) or False in refs:
        return R.opaque(an, node, f"{R.describe(node)}: needs a literal normalized_shape and get_attr affine tensors")
    out, index = _layer_norm(an, node, tuple(shape), refs, None)
    if index is not None:
        an.rewrite_literal(node, "normalized_shape", (out.units, index))
    return out


# -- per-channel weights --------------------------------------------------------------------
def _prelu(an: Analysis, node: fx.Node, target: str, owner: str) -> Any:
    v = an.tensor_info(R.arg(node, 0, "input"))
    nd = R.ndim(an, R.arg(node, 0, "input"))
    n = an.param_tensor(target).numel()
    if v is None or nd is None:
        return R.opaque(an, node)
    if n == 1:
        return ChannelInfo(v.dim, v.units)
    if v.dim != (1 if nd >= 2 else 0) or n != len(v.units):
        return R.opaque(an, node, f"{R.describe(node)}: the per-channel weight is not on the channel dim")
    an.slice_param(target, 0, "passenger", v.units, owner, R.describe(node))
    return ChannelInfo(v.dim, v.units)


def prelu_module(an: Analysis, node: fx.Node) -> Any:
    """``nn.PReLU``: a per-channel weight is a passenger; a single weight changes nothing."""
    return _prelu(an, node, f"{node.target}.weight", node.target)


def prelu_functional(an: Analysis, node: fx.Node) -> Any:
    """``F.prelu(x, weight)`` on a ``get_attr`` weight."""
    target = _ref(an, node, 1, "weight")
    if not target:
        return R.opaque(an, node, f"{R.describe(node)}: weight is not a get_attr parameter")
    return _prelu(an, node, target, target)
