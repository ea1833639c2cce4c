"""L1 / L2 filter norms over a group's producers (Li et al. 2017), reduced over the group."""
from __future__ import annotations

import torch

from .registry import register


def producer_rows(group, ctx, role: str = "producer"):
    """Yield ``(rows, channels)``: each member's parameter rows along its channel dim
    (shape: positions x everything else, in the parameter's dtype) and the group channel of each row.
    """
    for pm in group.of_role(role):
        w = ctx.param(pm.target).detach().movedim(pm.dim, 0)
        if len(pm.positions) != w.shape[0]:
            w = w[list(pm.positions)]
        rows = w.reshape(len(pm.positions), -1)
        yield rows, torch.tensor(pm.channels, dtype=torch.long)


def reduce_rows(group, per_row: list, reduce: str = "mean") -> torch.Tensor:
    """Scatter per-row scores into group channels and reduce (mean or sum over members)."""
    total = torch.zeros(group.size, dtype=torch.float64)
    count = torch.zeros(group.size, dtype=torch.float64)
    for values, channels in per_row:
        total.index_add_(0, channels, values)
        count.index_add_(0, channels, torch.ones_like(values))
    return total / count.clamp(min=1) if reduce == "mean" else total


def _norm(group, ctx, p: int) -> torch.Tensor:
    reduce = ctx.options.get("reduce", "mean")
    per_row = [(rows.norm(p=p, dim=1).to(torch.float64), ch) for rows, ch in producer_rows(group, ctx)]
    return reduce_rows(group, per_row, reduce)


@register("l1")
def l1(group, ctx) -> torch.Tensor:
    """Mean L1 norm of each channel's producer rows (filters).

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 2, 1))
        >>> p = fxprune.plan(m, fxprune.Policy("l1", 0.5), (torch.randn(1, 3, 4, 4),))
        >>> p.groups[0].kept
        2
    """
    return _norm(group, ctx, 1)


@register("l2")
def l2(group, ctx) -> torch.Tensor:
    """Mean L2 norm of each channel's producer rows (filters)."""
    return _norm(group, ctx, 2)
