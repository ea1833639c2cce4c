"""The latency lookup table and the latency-targeted policy."""
import json

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.latency_lut import LatencyTable, _bilinear


def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 10)).eval()


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    model, x = small(), (torch.randn(1, 3, 16, 16),)
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.0), x)
    cache = tmp_path_factory.mktemp("lut") / "lut.json"
    return LatencyTable.build(plan.traced, plan.analysis, x, runs=1, warmup=0, cache=cache), cache


def test_table_covers_prunable_layers_and_is_cached(table):
    lut, cache = table
    assert set(lut.layers) == {"0.weight", "3.weight", "7.weight"}
    assert all(len(g) == 4 and len(g[0]) == 4 and min(min(r) for r in g) > 0 for g in lut.layers.values())
    assert len(json.loads(cache.read_text())) == 3


def synthetic_table():
    """Deterministic timings: each layer costs in x out fractions of a base, plus a fixed rest."""
    from fxprune.latency_lut import GRID
    grid = lambda base: [[base * fi * fo for fo in GRID] for fi in GRID]
    return LatencyTable({"0.weight": grid(2.0), "3.weight": grid(5.0), "7.weight": grid(0.5)}, 1.0, 8.5, "test")


def test_latency_policy_reaches_its_predicted_target():
    lut = synthetic_table()
    model, x = small(), (torch.randn(1, 3, 16, 16),)
    pruned = fxprune.transform(model, fxprune.Policy(latency=0.6), x, latency_table=lut)
    sel = pruned.meta["fxprune"].selection
    assert sel["metric"] == "latency" and sel["target"] == 0.6
    assert 0.6 - 1e-9 <= sel["achieved"] <= 0.62
    assert fxprune.verify(pruned).ok


def test_bilinear_interpolation_is_exact_on_grid_and_monotone():
    grid = [[1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0], [3.0, 4.0, 5.0, 6.0], [4.0, 5.0, 6.0, 7.0]]
    assert _bilinear(grid, 1.0, 1.0) == 7.0 and _bilinear(grid, 0.5, 0.75) == 4.0
    assert _bilinear(grid, 0.6, 0.6) < _bilinear(grid, 0.7, 0.7)
    assert _bilinear(grid, 0.1, 1.0) < _bilinear(grid, 0.25, 1.0)


def test_latency_budget_is_validated():
    with pytest.raises(fxprune.PolicyError, match="give one budget"):
        fxprune.Policy(latency=0.5, flops=0.5)
    with pytest.raises(fxprune.PolicyError, match="latency is the fraction to keep"):
        fxprune.Policy(latency=1.5)
