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

    def __init__(self, traced, groups: list, analysis, latency_table=None):
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
        self.lut = latency_table
        if latency_table is not None:
            self._prepare_activations(traced, groups, analysis)

    def _prepare_activations(self, traced, groups: list, analysis) -> None:
        """Elements of every channel tensor, and which group channels each position holds."""
        from .coupling.state import ChannelInfo
        from .shapes import shape
        nodes = {n.name: n for n in traced.graph.nodes}
        self.total_elements, self.activation_members = 0, []
        per_position = {}
        for name, info in analysis.info.items():
            s = shape(nodes[name]) if name in nodes else None
            if isinstance(info, ChannelInfo) and isinstance(s, tuple) and s and all(isinstance(d, int) for d in s):
                per_position[name] = math.prod(s) / max(s[info.dim], 1)
                self.total_elements += math.prod(s)
        for g in groups:
            for mem in g.members:
                if mem.node in per_position:
                    self.activation_members.append(
                        (g.id, torch.tensor(mem.channels, dtype=torch.long), per_position[mem.node]))
        self.in_dims = {t: (0 if getattr(m, "transposed", False) else 1) for t, m in
                        ((t, _owner_module(traced, t)) for t in latency_table_targets(self.lut))}
        self.full_latency = self.lut.predict({}, 1.0, self.in_dims)

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
        keeps: dict[str, dict[int, float]] = {}
        for target, entries in self.sliced.items():
            keep = 1.0
            for dim, size, members in entries:
                gone = sum(int(masks[gid][ch].sum()) for gid, ch in members if gid in masks)
                keeps.setdefault(target, {})[dim] = (size - gone) / size
                keep *= (size - gone) / size
            macs += self.macs_of[target] * keep
            params += self.params_of[target] * keep
        out = {"macs": macs / max(self.total_macs, 1), "params": params / max(self.total_params, 1)}
        if self.lut is not None:
            gone = sum(float(masks[gid][ch].sum()) * per for gid, ch, per in self.activation_members if gid in masks)
            active = 1.0 - gone / max(self.total_elements, 1)
            out["activations"] = active
            out["latency"] = self.lut.predict(keeps, active, self.in_dims) / max(self.full_latency, 1e-12)
        return out


def _owner_module(traced, target: str):
    *path, _ = target.split(".")
    return traced.get_submodule(".".join(path)) if path else traced


def latency_table_targets(lut) -> list[str]:
    return list(lut.layers) if lut is not None else []


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


BUDGET_TOLERANCE = 0.01
"""A budget is met when what is kept is within this fraction *of the target* (relative): a
target of 0.5 is met by 0.495..0.505, a target of 0.0001 only by 0.000099..0.000101."""


def budget_met(achieved: float, target: float, rel_tol: float = BUDGET_TOLERANCE) -> bool:
    """Whether the fraction ``achieved`` meets the budget ``target`` within ``rel_tol`` of the target.

    Example:
        >>> budget_met(0.503, 0.5), budget_met(0.52, 0.5), budget_met(0.0002, 0.0001)
        (True, False, False)
    """
    return abs(achieved - target) <= rel_tol * target + 1e-12
