"""CPMC: network-wide min-max normalisation puts magnitude, MACs and parameters on one scale."""
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune_passes.cpmc import cpmc, raw_terms
from passes_helpers import scores


class ThreeBranches(nn.Module):
    """An expensive strong branch, a medium one with one weak channel, a cheap one."""

    def __init__(self):
        super().__init__()
        self.expensive, self.medium, self.cheap = nn.Conv2d(3, 4, 5, padding=2), nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(12, 2, 1)
        with torch.no_grad():
            self.expensive.weight.fill_(1.0)
            self.medium.weight.fill_(0.5)
            self.medium.weight[0] = 0.001
            self.cheap.weight.fill_(0.5)
            self.head.weight.fill_(0.1)

    def forward(self, x):
        return self.head(torch.relu(torch.cat([self.expensive(x), self.medium(x), self.cheap(x)], 1)))


def _ranked(options):
    model, x = ThreeBranches().double(), (torch.randn(1, 3, 8, 8, dtype=torch.float64),)
    plan = fxprune.plan(model, fxprune.Policy("cpmc", 0.0), x)
    by_owner = {g.producers[0].owner: s for g, s in zip(plan.groups, scores(plan, "cpmc", options).values())}
    flat = [(v.item(), owner, c) for owner, s in by_owner.items() if owner != "head" for c, v in enumerate(s)]
    return sorted(flat)


def test_global_normalisation_ranks_the_cheap_weak_channel_first():
    assert _ranked({})[0][1:] == ("medium", 0)


def test_without_normalisation_macs_swamp_the_magnitude():
    first = _ranked({"cpmc_normalize": "none"})[0]
    assert first[1] == "expensive"


def test_raw_terms_count_what_a_channel_removes():
    model, x = ThreeBranches().double(), (torch.randn(1, 3, 8, 8, dtype=torch.float64),)
    plan = fxprune.plan(model, fxprune.Policy("cpmc", 0.0), x)
    ctx = fxprune.ImportanceContext(plan.traced, plan.groups, x)
    g = next(g for g in plan.groups if g.producers[0].owner == "cheap")
    m, f, p = raw_terms(g, ctx)
    # producer row 3 weights + bias, consumer column 2 weights; MACs per 8x8 output position
    assert torch.allclose(p, torch.full((4,), 3 + 1 + 2, dtype=torch.float64))
    assert torch.allclose(f, torch.full((4,), 64 * 3 + 64 * 2, dtype=torch.float64))
    assert torch.allclose(m, torch.full((4,), 3 * 0.5 + 2 * 0.1, dtype=torch.float64))


def test_weights_and_ratio_form():
    model, x = ThreeBranches().double(), (torch.randn(1, 3, 8, 8, dtype=torch.float64),)
    plan = fxprune.plan(model, fxprune.Policy("cpmc", 0.0), x)
    only_magnitude = scores(plan, "cpmc", {"cpmc_weights": (1.0, 0.0, 0.0)})
    ctx = fxprune.ImportanceContext(plan.traced, plan.groups, x)
    for g in plan.groups:
        if not g.blocked:
            assert torch.allclose(only_magnitude[g.id], cpmc.terms(g, ctx)[0])
    ratio = scores(plan, "cpmc", {"cpmc_form": "ratio"})
    assert all((s >= 0).all() for s in ratio.values())
    with pytest.raises(fxprune.PolicyError):
        scores(plan, "cpmc", {"cpmc_weights": (1.0, 0.5)})


def test_global_scope_prunes_the_cheap_weak_channel_first():
    model, x = ThreeBranches().double(), (torch.randn(1, 3, 8, 8, dtype=torch.float64),)
    policy = fxprune.Policy("cpmc", 0.09, scope="global", normalize="none")
    plan = fxprune.plan(model, policy, x)
    removed = {g.producers[0].owner: g.removed for g in plan.groups if g.removed}
    assert removed == {"medium": (0,)}
