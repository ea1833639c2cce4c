"""CPMC: channel importance from three criteria on the weights a channel depends on — weight
magnitude, MACs and parameters that vanish with it — normalised across the whole network
(see shared/METHODS.md, seed 4).

Per channel c of a group: ``M_c = Σ_p ‖W_p[c]‖₁ + Σ_q ‖W_q[:, c]‖₁`` over producers p and
consumers q; ``F_c`` = MACs of those weights (from the graph's recorded shapes, via
``fxprune.cost.param_macs``); ``P_c`` = parameters removed with c (weights, biases, norm affine).
Each term is min-max normalised over every removable channel of the network (computed once per
plan), then combined. Reconstructed choices ([I]), each an option:

==================  =====================  ==================================================
option              default                meaning
==================  =====================  ==================================================
``cpmc_weights``    ``(1.0, 0.5, 0.5)``    weights of (M̂, F̂, P̂)
``cpmc_form``       ``"difference"``       ``w_M·M̂ − w_F·F̂ − w_P·P̂``; ``"ratio"``:
                                           ``w_M·M̂ / (ε + w_F·F̂ + w_P·P̂)``
``cpmc_epsilon``    ``1e-3``               ε of the ratio form
``cpmc_normalize``   ``"global"``           min-max over the network; ``"group"``: per group;
                                           ``"none"``: raw units (MACs swamp the rest)
==================  =====================  ==================================================

Expensive channels get lower scores (pruned first) at equal magnitude. With the default global
normalisation the scores of different groups are already comparable: for
``Policy(scope="global")`` use ``normalize="none"``.
"""
from __future__ import annotations

import torch

import fxprune
from fxprune.cost import param_macs

from .base import Criterion, cached
from .weights import channel_sum, is_parameter


def raw_terms(group, ctx) -> torch.Tensor:
    """``(3, size)`` float64: M (L1 of producer rows and consumer columns), F (MACs), P (params).

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
        >>> p = fxprune.plan(m, fxprune.Policy("l1", 0.5), (torch.randn(5, 3),))
        >>> ctx = fxprune.ImportanceContext(p.traced, p.groups, p.example_inputs)
        >>> raw_terms(p.groups[0], ctx)[1:].tolist()   # MACs: 5 rows x (3 in + 1 out); params: 3 + 1 + 1
        [[20.0, 20.0], [5.0, 5.0]]
    """
    macs = cached(ctx, "param macs", lambda: param_macs(ctx.module))
    out = torch.zeros(3, group.size, dtype=torch.float64)
    for pm in group.params:
        t = ctx.param(pm.target)
        count = channel_sum(group, pm, torch.ones_like(t, dtype=torch.float64))  # elements per channel
        if pm.role in ("producer", "consumer"):
            out[0] += channel_sum(group, pm, t.detach().abs())
            per_element = macs.get(pm.target, 0) / max(t.numel(), 1)
            out[1] += count * per_element
        if is_parameter(ctx, pm.target):
            out[2] += count
    return out


def _network_ranges(ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of each term over every removable channel of every group."""
    def compute():
        lo = torch.full((3,), float("inf"), dtype=torch.float64)
        hi = torch.full((3,), float("-inf"), dtype=torch.float64)
        for g in ctx.groups:
            if g.blocked:
                continue
            free = [c for c in range(g.size) if c not in g.pinned]
            t = raw_terms(g, ctx)[:, free]
            lo, hi = torch.minimum(lo, t.min(1).values), torch.maximum(hi, t.max(1).values)
        return lo, hi
    return cached(ctx, "cpmc ranges", compute)


def _min_max(t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    span = (hi - lo).clamp(min=0)
    span = torch.where(span > 0, span, torch.ones_like(span))
    return (t - lo[:, None]) / span[:, None]


class MultiCriteria(Criterion):
    """CPMC: weight magnitude, MACs and parameters of each channel, normalised network-wide.

    Lower score = pruned first; options are listed in this module's docstring.

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
        >>> p = fxprune.plan(m, fxprune.Policy("cpmc", 0.25), (torch.randn(1, 3, 8, 8),))
        >>> p.groups[0].kept
        6
    """

    name = "cpmc"
    defaults = {"cpmc_weights": (1.0, 0.5, 0.5), "cpmc_form": "difference", "cpmc_epsilon": 1e-3,
                "cpmc_normalize": "global"}
    choices = {"cpmc_form": ("difference", "ratio"), "cpmc_normalize": ("global", "group", "none")}

    def terms(self, group, ctx) -> torch.Tensor:
        """``(3, size)``: the (normalised, per ``cpmc_normalize``) M, F and P of each channel."""
        t = raw_terms(group, ctx)
        scope = self.option(ctx, "cpmc_normalize")
        if scope == "global":
            return _min_max(t, *_network_ranges(ctx))
        if scope == "group":
            free = [c for c in range(group.size) if c not in group.pinned] or list(range(group.size))
            return _min_max(t, t[:, free].min(1).values, t[:, free].max(1).values)
        return t

    def score(self, group, ctx) -> torch.Tensor:
        weights = self.option(ctx, "cpmc_weights")
        if len(weights) != 3:
            raise fxprune.PolicyError(f"cpmc_weights must be three numbers (magnitude, MACs, params), got {weights!r}")
        wm, wf, wp = (float(w) for w in weights)
        m, f, p = self.terms(group, ctx)
        if self.option(ctx, "cpmc_form") == "ratio":
            return wm * m / (float(self.option(ctx, "cpmc_epsilon")) + wf * f + wp * p)
        return wm * m - wf * f - wp * p + (wf + wp)


cpmc = MultiCriteria()
