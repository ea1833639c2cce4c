"""Similar Channel Pruning: identical channels merge exactly; options behave as documented."""
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune_passes.scp import distances, scp
from passes_helpers import scores
from zoo import build


def _twins(head: str = "conv"):
    """conv -> BN -> ReLU -> (conv | flatten -> Linear), channels 1 and 3 identical after BN."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU()]
    layers += [nn.Conv2d(5, 2, 1)] if head == "conv" else [nn.Flatten(), nn.Linear(5 * 4 * 4, 3)]
    m = nn.Sequential(*layers).double().eval()
    conv, bn = m[0], m[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        # channel 3 = channel 1 after folding: twice the weights and bias and mean, half the scale
        conv.weight[3] = 2 * conv.weight[1]
        conv.bias[3] = 2 * conv.bias[1]
        bn.running_mean[3] = 2 * bn.running_mean[1]
        bn.running_var[3] = bn.running_var[1] * 4 + 3 * bn.eps
        bn.weight[3] = bn.weight[1]
        bn.bias[3] = bn.bias[1]
    return m, (torch.randn(2, 3, 4, 4, dtype=torch.float64),)


@pytest.mark.parametrize("head", ["conv", "linear"])
def test_identical_channels_one_goes_and_output_is_unchanged(head):
    model, x = _twins(head)
    pruned = fxprune.transform(model, fxprune.Policy("scp", 0.2), x)
    plan = pruned.meta["fxprune"]
    assert plan.groups[0].removed in ((1,), (3,))
    assert plan.edits
    with torch.no_grad():
        got, want = pruned(*x), model(*x)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert fxprune.verify(pruned).max_error <= 1e-9


def test_without_compensation_the_output_changes():
    model, x = _twins()
    pruned = fxprune.transform(model, fxprune.Policy("scp", 0.2), x, importance_options={"compensate": False})
    plan = pruned.meta["fxprune"]
    assert plan.groups[0].removed in ((1,), (3,)) and not plan.edits
    with torch.no_grad():
        assert (pruned(*x) - model(*x)).abs().max() > 1e-3
    assert fxprune.verify(pruned).max_error <= 1e-9


@pytest.mark.parametrize("fold", [True, False])
def test_bn_folding_finds_the_scaled_twin(fold):
    model, x = _twins()
    plan = fxprune.plan(model, fxprune.Policy("scp", 0.2), x)
    options = {"fold_bn": fold, "target_only": True}
    ctx = fxprune.ImportanceContext(plan.traced, plan.groups, x, options=options)
    removed, twin, saliency, _alpha = scp.steps(plan.groups[0], ctx)[0]
    if fold:
        assert {removed, twin} == {1, 3} and saliency < 1e-12
    else:
        assert saliency > 1e-3


def test_scores_are_the_greedy_order_so_larger_ratios_extend_the_removal():
    model, x = build("conv_chain_2d")
    removed = [set(fxprune.plan(model, fxprune.Policy("scp", r), x).groups[1].removed)
               for r in (0.25, 0.5, 0.75)]
    assert removed[0] < removed[1] < removed[2]


@pytest.mark.parametrize("options", [{"target_only": True}, {"pair_saliency": "sum"},
                                     {"target_metric": "cosine", "next_metric": "l2"},
                                     {"scp_score": "saliency"}])
def test_options_keep_the_oracle(options):
    model, x = build("residual")
    pruned = fxprune.transform(model, fxprune.Policy("scp", 0.5), x, importance_options=options)
    assert fxprune.verify(pruned, inputs=build("residual", seed=1)[1]).max_error <= 1e-9


def test_saliency_scores_rank_like_the_greedy_order():
    model, x = build("residual")
    plan = fxprune.plan(model, fxprune.Policy("scp", 0.5), x)
    ranks = scores(plan, "scp")
    values = scores(plan, "scp", {"scp_score": "saliency"})
    for gid in ranks:
        assert torch.equal(torch.argsort(ranks[gid]), torch.argsort(values[gid]))


def test_pinned_channels_are_never_removed_by_the_greedy_loop():
    model, x = build("multi_output")
    plan = fxprune.plan(model, fxprune.Policy("scp", 1.0), x)
    for g in plan.groups:
        assert not set(g.removed) & set(g.pinned)


def test_distance_metrics():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    assert torch.allclose(distances(a, a, "l1")[0], torch.tensor([0.0, 3.0, 1.0], dtype=torch.float64))
    assert torch.allclose(distances(a, a, "l2")[0, 1], torch.tensor(5.0, dtype=torch.float64).sqrt())
    assert torch.allclose(distances(a, a, "cosine")[0], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(distances(a[:1], a, "l1"), distances(a, a, "l1")[:1])


def _scaled_twins():
    """conv -> ReLU -> conv; channel 3's filter and bias are twice channel 1's (no norm)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 2, 1)).double().eval()
    with torch.no_grad():
        m[0].weight[3] = 2 * m[0].weight[1]
        m[0].bias[3] = 2 * m[0].bias[1]
    return m, (torch.randn(2, 3, 4, 4, dtype=torch.float64),)


def test_scaled_compensation_is_exact_for_parallel_channels_and_plain_is_not():
    model, x = _scaled_twins()
    outputs = {}
    for compensate in (True, "scaled"):
        options = {"compensate": compensate, "target_metric": "cosine"}
        pruned = fxprune.transform(model, fxprune.Policy("scp", 0.2), x, importance_options=options)
        assert pruned.meta["fxprune"].groups[0].removed in ((1,), (3,))
        assert fxprune.verify(pruned).max_error <= 1e-9  # the oracle holds either way
        with torch.no_grad():
            outputs[compensate] = (pruned(*x) - model(*x)).abs().max().item()
    assert outputs["scaled"] <= 1e-12 < outputs[True]


def test_scaled_compensation_skips_opposite_channels():
    model, x = _scaled_twins()
    with torch.no_grad():
        model[0].weight[3] = -model[0].weight[1]
        model[0].bias[3] = -model[0].bias[1]
    plan = fxprune.plan(model, fxprune.Policy("scp", 0.2), x, importance_options={"compensate": "scaled"})
    ctx = fxprune.ImportanceContext(plan.traced, plan.groups, x, options={"compensate": "scaled"})
    assert all(alpha >= 0.0 for _, _, _, alpha in scp.steps(plan.groups[0], ctx))
