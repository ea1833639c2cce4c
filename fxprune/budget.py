"""Fast MAC and parameter estimates of a candidate removal, for budget searches.

MACs of a conv/linear are proportional to its weight's size, so a weight whose sliced dims keep
fractions f1, f2 keeps f1*f2 of its MACs; every other cost (attention products, uncounted ops)
stays constant. Parameters shrink the same way. Both agree with ``fxprune.cost.count`` of the
rewritten module on conv/linear nets (tests/test_budget.py).
"""
from __future__ import annotations

import math

import torch

from .cost import count, param_macs


class CostModel:
    """Predicts MACs and parameters kept for ``{group id: removed channels}``.

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
        >>> p = fxprune.plan(m, fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 8, 8),))
        >>> cm = CostModel(p.traced, p.groups, p.analysis)
        >>> cm.fractions({g.id: g.removed for g in p.groups})["macs"] < 1
        True
    """

    def __init__(self, traced, groups: list, analysis):
        totals = count(traced)
        self.total_macs, self.total_params = totals["macs"], totals["params"]
        weight_macs = param_macs(traced)
        params = dict(traced.named_parameters())
        self.sliced: dict[str, list[tuple[int, int, list]]] = {}
        for (target, dim), ps in analysis.params.items():
            self.sliced.setdefault(target, []).append((dim, len(ps.units), []))
        by_key = {(t, d): entry for t, entries in self.sliced.items() for entry in entries for d in [entry[0]]}
        for g in groups:
            for pm in g.params:
                by_key[(pm.target, pm.dim)][2].append((g.id, torch.tensor(pm.channels, dtype=torch.long)))
        self.macs_of = {t: weight_macs.get(t, 0) for t in self.sliced}
        self.params_of = {t: params[t].numel() if t in params else 0 for t in self.sliced}
        self.fixed_macs = self.total_macs - sum(self.macs_of.values())
        self.fixed_params = self.total_params - sum(self.params_of.values())
        self.sizes = {g.id: g.size for g in groups}

    def fractions(self, removed: dict[int, "tuple | torch.Tensor"]) -> dict[str, float]:
        """Fractions of MACs and parameters kept (``removed``: channels or a bool mask per group)."""
        masks = {}
        for gid, r in removed.items():
            if isinstance(r, torch.Tensor) and r.dtype == torch.bool:
                masks[gid] = r
            else:
                m = torch.zeros(self.sizes[gid], dtype=torch.bool)
                m[list(r)] = True
                masks[gid] = m
        macs, params = float(self.fixed_macs), float(self.fixed_params)
        for target, entries in self.sliced.items():
            keep = 1.0
            for _dim, size, members in entries:
                gone = sum(int(masks[gid][ch].sum()) for gid, ch in members if gid in masks)
                keep *= (size - gone) / size
            macs += self.macs_of[target] * keep
            params += self.params_of[target] * keep
        return {"macs": macs / max(self.total_macs, 1), "params": params / max(self.total_params, 1)}


def bisect(predicate, lo: float = 0.0, hi: float = 1.0, steps: int = 40) -> float:
    """Largest x in [lo, hi] with ``predicate(x)`` true, for a monotone predicate true at ``lo``.

    Example:
        >>> round(bisect(lambda x: x * x <= 0.25), 6)
        0.5
    """
    if predicate(hi):
        return hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        if predicate(mid):
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-6:
            break
    return lo


def is_close(a: float, b: float, tol: float) -> bool:
    return math.isclose(a, b, abs_tol=tol)
