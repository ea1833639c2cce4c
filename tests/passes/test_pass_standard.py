"""The standard criteria: BN scale, FPGM, Taylor, HRank, LAMP."""
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune_passes import lamp
from passes_helpers import loss_fn, scores
from zoo import build


def _net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).double().eval()
    return m, (torch.randn(2, 3, 6, 6, dtype=torch.float64),)


def test_bn_scale_reads_gamma_and_falls_back_without_bn():
    model, x = _net()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -3.0, 0.1, 2.0]))
    plan = fxprune.plan(model, fxprune.Policy("bn_scale", 0.5), x)
    assert torch.allclose(scores(plan, "bn_scale")[0], torch.tensor([0.5, 3.0, 0.1, 2.0], dtype=torch.float64))
    assert plan.groups[0].removed == (0, 2)
    plain, xp = build("mlp")
    no_bn = fxprune.plan(plain, fxprune.Policy("bn_scale", 0.5), xp)
    l1 = fxprune.plan(plain, fxprune.Policy("l1", 0.5), xp)
    assert [g.removed for g in no_bn.groups][1:] == [g.removed for g in l1.groups][1:]
    with pytest.raises(fxprune.PolicyError, match="bn_fallback"):
        fxprune.plan(plain, fxprune.Policy("bn_scale", 0.5), xp, importance_options={"bn_fallback": "error"})


def test_fpgm_removes_the_filter_nearest_the_others():
    model, x = _net()
    with torch.no_grad():
        w = torch.randn(3, 3, 3, 3, dtype=torch.float64)
        model[0].weight.copy_(torch.stack([w[0], w[1], w[2], (w[0] + w[1] + w[2]) / 3]))
    plan = fxprune.plan(model, fxprune.Policy("fpgm", 0.25), x)
    assert plan.groups[0].removed == (3,)


def test_taylor_scores_a_dead_channel_zero():
    model, x = _net()
    with torch.no_grad():
        model[1].weight[1] = 0.0
        model[1].bias[1] = 0.0
    batches = [(x, [torch.randn(2, 2, 6, 6, dtype=torch.float64)])]
    plan = fxprune.plan(model, fxprune.Policy("taylor", 0.25), x, calibration=batches, loss_fn=loss_fn)
    s = scores(plan, "taylor", calibration=batches, loss_fn=loss_fn)[0]
    assert s[1] == 0 and (s[[0, 2, 3]] > 0).all()
    assert plan.groups[0].removed == (1,)
    for mode in ("producer", "consumer"):
        assert scores(plan, "taylor", {"taylor_params": mode}, calibration=batches, loss_fn=loss_fn)[0][1] == 0


def test_hrank_ranks_feature_maps():
    model, x = _net()
    with torch.no_grad():
        model[0].weight[2] = 0.0
        model[0].bias[2] = 0.0
        model[1].bias[2] = 0.0
        model[1].running_mean[2] = 0.0
    plan = fxprune.plan(model, fxprune.Policy("hrank", 0.25), x, calibration=[x])
    s = scores(plan, "hrank", calibration=[x])[0]
    assert s[2] == 0 and (s[[0, 1, 3]] >= 1).all() and (s <= 6).all()
    assert plan.groups[0].removed == (2,)


def test_lamp_keeps_order_and_scales_across_groups():
    s = torch.tensor([2.0, 0.5, 1.0, 1.0])
    out = lamp(s)
    assert torch.equal(torch.argsort(out, stable=True), torch.tensor([1, 2, 3, 0]))
    assert out.max() == 1.0
    assert torch.allclose(lamp(10 * s), out)
    model, x = build("residual")
    plan = fxprune.plan(model, fxprune.Policy("lamp", 0.5), x)
    assert [g.removed for g in plan.groups] == [g.removed for g in fxprune.plan(model, fxprune.Policy("l1", 0.5), x).groups]


def test_lamp_over_scp_keeps_its_compensation():
    model, x = build("conv_chain_2d")
    pruned = fxprune.transform(model, fxprune.Policy("lamp", 0.5), x, importance_options={"lamp_base": "scp"})
    direct = fxprune.plan(model, fxprune.Policy("scp", 0.5), x)
    plan = pruned.meta["fxprune"]
    assert [g.removed for g in plan.groups] == [g.removed for g in direct.groups]
    assert plan.edits.keys() == direct.edits.keys() and plan.edits
    assert fxprune.verify(pruned, inputs=build("conv_chain_2d", seed=1)[1]).max_error <= 1e-9
