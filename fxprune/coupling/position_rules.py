"""Channels that lie on a dim an op treats as positions, and a channel dim taken apart.

- **A convolution along the channels' positions.** CoaT's head stacks the class tokens of three
  scales as ``(B, 3, C)`` and mixes the scales with ``nn.Conv1d(3, 1, kernel_size=1)``: the conv's
  own channel dim is the 3 scales, and the hidden channels ``C`` are its *length*. With kernel 1,
  stride 1 and no padding along that dim, output position ``c`` reads input position ``c`` alone,
  so the hidden channels pass through (the weight and bias are untouched; the mask oracle zeroes
  the output's removed positions as it does the input's). Any other kernel, stride or padding
  along it mixes or shifts positions: blocked, naming the node and the numbers.
- **unbind of the channel dim.** ``q, k, v = qkv.unbind(-1)`` (CSATv2's single-channel attention)
  hands out each channel as a tensor of its own without the channel dim; the code reads every
  output by position, so none of them can go: all the channels are pinned with that reason.
  Along any other dim ``tensor_rules.unbind`` applies.

Example:
    >>> import torch, fxprune
    >>> class Agg(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.agg, self.head = torch.nn.Linear(4, 8), torch.nn.Conv1d(3, 1, 1), torch.nn.Linear(8, 2)
    ...     def forward(self, x):                       # x: (B, 3, 4)
    ...         return self.head(self.agg(self.a(x)).squeeze(1))
    >>> p = fxprune.plan(Agg(), fxprune.Policy(ratio=0.5), (torch.randn(2, 3, 4),))
    >>> [(g.size, g.kept, g.exact) for g in p.groups if g.removed]
    [(8, 4, True)]
"""
from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx

from .rules import arg, describe, ndim, norm_dim, opaque
from .state import Analysis, ChannelInfo
from .contraction_rules import has_removable


def _along(m: Any, k: int) -> tuple:
    """(kernel, stride, padding, output padding) of conv module ``m`` along its spatial dim ``k``."""
    pad = m.padding if isinstance(m.padding, str) else m.padding[k]
    out_pad = m.output_padding[k] if getattr(m, "transposed", False) else 0
    return m.kernel_size[k], m.stride[k], pad, out_pad


def conv_positions(an: Analysis, node: fx.Node, fallback: Callable) -> Any:
    """``nn.Conv*d`` / ``nn.ConvTranspose*d`` whose input carries prunable channels on a spatial
    dim: pointwise along that dim (kernel 1, stride 1, no padding) passes them through (the conv's
    own output channels are then not tracked: they keep their width); otherwise blocked with the
    reason. Channels on the conv's own channel dim, or only pinned ones, go to ``fallback``."""
    m = an.modules[node.target]
    x = arg(node, 0, "input")
    v, nd, out_shape = an.tensor_info(x), ndim(an, x), an.shape(node)
    spatial = len(m.kernel_size)
    if v is None or nd is None or nd not in (spatial + 1, spatial + 2) or not has_removable(an, [v]):
        return fallback(an, node)  # pinned ones (a channels-last model input) stay pinned: the conv's own come out
    first = nd - spatial  # unbatched input: (C, L...)
    if v.dim < first:
        return fallback(an, node)
    k = v.dim - first
    kernel, stride, pad, out_pad = _along(m, k)
    if (kernel, stride, out_pad) != (1, 1, 0) or pad not in (0, "valid", "same") \
            or not isinstance(out_shape, tuple) or out_shape[v.dim] != len(v.units):
        return opaque(an, node, f"{describe(node)} convolves along the dim that carries channels (dim {v.dim}: "
                                f"kernel {kernel}, stride {stride}, padding {pad!r}): it mixes or moves them")
    return ChannelInfo(v.dim, v.units)


def unbind(an: Analysis, node: fx.Node, fallback: Callable) -> Any:
    """``x.unbind(d)`` / ``torch.unbind(x, d)``: on the channel dim every channel becomes a tensor
    of its own, read by position, so all are pinned with that reason (their outputs carry no
    channel dim); on another dim, ``fallback``."""
    x = arg(node, 0, "input")
    v, nd, out_shape = an.tensor_info(x), ndim(an, x), an.shape(node)
    d = arg(node, 1, "dim", 0)
    if v is None or nd is None or not isinstance(d, int) or not isinstance(out_shape, tuple) \
            or norm_dim(d, nd) != v.dim:
        return fallback(an, node)
    why = (f"{describe(node)} splits the channel dim into its {len(v.units)} channels, one tensor each "
           "without the channel dim; the code reads every one by position, so none can go")
    an.blocked_ops.append((node.name, why))
    an.units.pin(v.units, why)
    return tuple(an.fresh(node, s, "opaque", f"{describe(node)}: one channel alone, no channel dim")
                 for s in out_shape)
