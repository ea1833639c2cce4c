"""HRank (Lin et al. 2020): channels whose feature maps have low rank carry little information.

The score of channel c is the rank of its feature map (an ``H × rest`` matrix per sample),
averaged over calibration samples and over the group's spatial members (every node output in
the group that has dims after the channel dim: conv outputs, norm and activation outputs, sums).
Groups with no spatial member (linear layers) use the rank of 1 × 1 maps, i.e. how often the
activation is non-zero. Needs unlabelled calibration inputs; ``max_batches`` (default ``None``)
limits the batches read.
"""
from __future__ import annotations

import torch

from .base import Criterion, cached
from .data import observe


def map_ranks(value: torch.Tensor, dim: int) -> torch.Tensor:
    """``(channels,)`` float64: the rank of every channel's map, summed over the batch.

    Example:
        >>> x = torch.zeros(1, 2, 3, 3)
        >>> x[0, 1] = torch.eye(3)
        >>> map_ranks(x, 1)
        tensor([0., 3.], dtype=torch.float64)
    """
    v = value.detach().movedim(dim, 1)
    n, c, rest = v.shape[0], v.shape[1], v.shape[2:]
    if len(rest) == 0:
        mats = v.reshape(n, c, 1, 1)
    else:
        mats = v.reshape(n, c, rest[0], -1)
    return torch.linalg.matrix_rank(mats.to(torch.float64)).to(torch.float64).sum(0)


def _spatial(ctx, member) -> bool:
    nodes = cached(ctx, "nodes by name", lambda: {n.name: n for n in ctx.module.graph.nodes})
    node = nodes.get(member.node)
    shape = node.meta.get("fxprune", {}).get("shape") if node is not None else None
    return isinstance(shape, tuple) and len(shape) > member.dim + 1


class FeatureRank(Criterion):
    """Average feature-map rank on calibration data (HRank); lower rank = pruned first.

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
        >>> x = torch.randn(2, 3, 8, 8)
        >>> fxprune.plan(m, fxprune.Policy("hrank", 0.5), (x,), calibration=[x]).groups[0].kept
        4
    """

    name = "hrank"
    defaults = {"max_batches": None}

    def members(self, group, ctx) -> list:
        """The group members whose maps are ranked (spatial ones when there are any)."""
        spatial = [m for m in group.members if _spatial(ctx, m)]
        return spatial or list(group.members)

    def node_ranks(self, ctx) -> dict[str, torch.Tensor]:
        """``{node name: mean rank per tensor position}`` for every member ranked, once per plan."""
        def compute():
            wanted = {(m.node, m.dim) for g in ctx.groups if not g.blocked for m in self.members(g, ctx)}
            acc: dict[str, torch.Tensor] = {}
            dims = dict(wanted)

            def record(node, args, result):
                r = map_ranks(result, dims[node.name])
                acc[node.name] = acc.get(node.name, 0) + r
            samples = observe(ctx, self.name, {name: record for name in dims}, self.option(ctx, "max_batches"))
            return {k: v / max(samples, 1) for k, v in acc.items()}
        return cached(ctx, "hrank", compute)

    def score(self, group, ctx) -> torch.Tensor:
        ranks = self.node_ranks(ctx)
        total = torch.zeros(group.size, dtype=torch.float64)
        count = torch.zeros(group.size, dtype=torch.float64)
        for m in self.members(group, ctx):
            if m.node not in ranks:
                continue
            channels = torch.tensor(m.channels, dtype=torch.long)
            total.index_add_(0, channels, ranks[m.node][list(m.positions)])
            count.index_add_(0, channels, torch.ones(len(m.channels), dtype=torch.float64))
        return total / count.clamp(min=1)


hrank = FeatureRank()
