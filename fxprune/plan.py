"""The Plan: what will be removed, decided without changing anything."""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from .coupling.groups import ChannelOfRoot
from .coupling.state import Analysis, ChannelInfo
from .policy import Policy


@dataclasses.dataclass
class Plan:
    """The decision of a prune: groups with their removed channels, and how to check it.

    Attributes:
        traced: the traced original (parameters equal to the model's).
        policy: the policy that made the plan.
        groups: the coupled channel groups (see ``fxprune.coupling.groups.Group``).
        edits: parameter edits applied before slicing, ``{param_name: new_tensor}``.
        timings: seconds spent in each pipeline stage.
        selection: how the selection went (scope; for a budget: metric, target, achieved, met).
        capture: the front end that captured the model and why (``frontend``, ``requested``,
            ``fx_error``, ``reason``).

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
        >>> p = fxprune.plan(m, fxprune.Policy("l1", 0.5), (torch.randn(1, 3, 8, 8),))
        >>> [(g.size, g.kept) for g in p.groups]
        [(8, 4), (4, 4)]
        >>> sorted(p.removed_channels())
        ['_0', '_1']
    """

    traced: fx.GraphModule
    policy: Policy
    groups: list
    example_inputs: tuple
    analysis: Analysis = dataclasses.field(repr=False)
    group_of_component: dict = dataclasses.field(repr=False, default_factory=dict)
    channel_of_root: ChannelOfRoot = dataclasses.field(repr=False,
                                                       default_factory=lambda: ChannelOfRoot([], [], {}))
    edits: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    selection: dict = dataclasses.field(default_factory=dict)
    capture: dict = dataclasses.field(default_factory=dict)

    def removed_roots(self) -> set[int]:
        """Union-find roots of every removed channel unit."""
        component_of = {gi: comp for comp, gi in self.group_of_component.items()}
        root = self.channel_of_root.root
        return {root(component_of[g.id], ch) for g in self.groups if g.removed for ch in g.removed}

    def kept_positions(self, units: tuple[int, ...], removed: set[int] | None = None) -> list[int]:
        """Positions of ``units`` whose channel survives."""
        removed = self.removed_roots() if removed is None else removed
        roots = self.analysis.units.roots()
        return [i for i, u in enumerate(units) if roots[u] not in removed]

    def removed_channels(self) -> dict[str, tuple[int, list[int]]]:
        """``{node_name: (dim, sorted removed indices)}`` for every node of ``traced`` that loses channels."""
        removed = self.removed_roots()
        if not removed:
            return {}
        find = self.analysis.units.find
        out = {}
        for name, info in self.analysis.info.items():
            if isinstance(info, ChannelInfo):
                gone = [i for i, u in enumerate(info.units) if find(u) in removed]
                if gone:
                    out[name] = (info.dim, gone)
        return out

    def masked_params(self) -> dict[str, tuple[int, list[int]]]:
        """``{param_name: (dim, sorted removed positions)}`` for channel spaces that no node output
        shows (q/k/v inside ``nn.MultiheadAttention``, ...): the oracle zeroes these rows."""
        removed = self.removed_roots()
        if not removed:
            return {}
        find = self.analysis.units.find
        out = {}
        for target, dim in sorted(self.analysis.mask_sites):
            units = self.analysis.params[(target, dim)].units
            gone = [i for i, u in enumerate(units) if find(u) in removed]
            if gone:
                out[target] = (dim, gone)
        return out

    @property
    def blocked_ops(self) -> list[tuple[str, str]]:
        """``(node, reason)`` for every op whose channels fxprune blocked."""
        return list(self.analysis.blocked_ops)

    @property
    def exact(self) -> bool:
        """True when every group that loses channels is exact (the oracle must then hold)."""
        return all(g.exact for g in self.groups if g.removed)

    def __str__(self) -> str:
        from .report import explain
        return explain(self)
