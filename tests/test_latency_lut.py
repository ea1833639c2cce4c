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


def test_prune_to_latency_corrects_a_wrong_table_from_measurements(monkeypatch):
    """The loop asks the table again until the measured fraction is within tolerance. 'Measured'
    here is the MAC fraction (a deterministic stand-in for the clock): the synthetic table is
    wrong about this model, so round 1 misses and a later round corrects it."""
    from fxprune.bench import latency_target
    from fxprune.bench.compare import Comparison
    from fxprune.bench.latency import LatencyStats

    def fake_compare(original, pruned, inputs, **_):
        macs = fxprune.cost.count(pruned.meta["fxprune"].traced)["macs"], fxprune.cost.count(pruned)["macs"]
        stat = lambda ms: LatencyStats.from_samples([ms], device="cpu", dtype="fp32", batch=1)
        return Comparison("m", stat(float(macs[0])), stat(float(macs[1])), macs[0], macs[1], 1, 1)

    monkeypatch.setattr(latency_target, "compare", fake_compare)
    model, x = small(), (torch.randn(1, 3, 16, 16),)
    pruned, history = latency_target.prune_to_latency(model, fxprune.Policy(latency=0.6), x,
                                                      latency_table=synthetic_table(), rounds=4, tolerance=0.03)
    assert history[0].asked == 0.6 and abs(history[0].error) > 0.03
    if len(history) > 1:
        assert history[1].asked == pytest.approx(min(1.0, 0.6 * 0.6 / history[0].measured))
    assert abs(min(history, key=lambda r: abs(r.error)).error) <= 0.03
    assert fxprune.verify(pruned).ok


def test_prune_to_latency_needs_a_latency_policy():
    from fxprune.bench import prune_to_latency
    with pytest.raises(fxprune.PolicyError, match="latency="):
        prune_to_latency(small(), fxprune.Policy(flops=0.5), (torch.randn(1, 3, 16, 16),))


def test_cli_latency_flag_sets_the_budget():
    from fxprune.cli import parser, policy_from_args
    assert policy_from_args(parser().parse_args(["prune", "resnet18", "--latency", "0.6"])).latency == 0.6
