"""Every importance pass: registered by name, scores of the right shape, deterministic, and the
pruned model matches the mask oracle (float64, 1e-9) on small zoo nets: conv-BN-ReLU chains, a
residual net, flatten -> Linear heads, depthwise convs, an MLP with BatchNorm1d, functional
conv/linear, channel concatenation."""
import pytest
import torch

import fxprune
from passes_helpers import ALL, NETS, WITH_DATA, data_kwargs, scores
from zoo import build


def test_every_pass_is_registered_by_name():
    names = fxprune.importance.available()
    for name in ALL:
        assert name in names
        assert fxprune.Policy(importance=name).importance == name


@pytest.mark.parametrize("criterion", ALL)
@pytest.mark.parametrize("net", NETS)
def test_scores_deterministic_and_oracle_holds(criterion, net):
    model, inputs = build(net)
    kwargs = data_kwargs(net, model)
    pruned = fxprune.transform(model, fxprune.Policy(criterion, 0.5), inputs, **kwargs)
    plan = pruned.meta["fxprune"]
    assert any(g.removed for g in plan.groups)
    first, second = scores(plan, criterion, **kwargs), scores(plan, criterion, **data_kwargs(net, model))
    assert first.keys() == second.keys()
    for gid, s in first.items():
        assert s.shape == (plan.groups[gid].size,)
        assert torch.isfinite(s).all()
        assert torch.equal(s, second[gid])
    result = fxprune.verify(pruned, inputs=build(net, seed=1)[1])
    assert result.exact and result.max_error <= 1e-9, result.max_error
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_random_depends_on_seed_only():
    model, inputs = build("residual")
    def removed(seed):
        p = fxprune.plan(model, fxprune.Policy("random", 0.5), inputs, importance_options={"seed": seed})
        return [g.removed for g in p.groups]
    assert removed(3) == removed(3)
    assert removed(3) != removed(4)


@pytest.mark.parametrize("criterion", WITH_DATA)
def test_data_criteria_say_what_to_pass(criterion):
    model, inputs = build("conv_chain_2d")
    with pytest.raises(fxprune.FxPruneError, match="calibration"):
        fxprune.plan(model, fxprune.Policy(criterion, 0.5), inputs)


@pytest.mark.parametrize("criterion,options", [("taylor", {}), ("sensitivity", {"hessian": "fisher"}),
                                               ("sensitivity", {"hessian": "hutchinson"})])
def test_loss_criteria_ask_for_a_loss(criterion, options):
    model, inputs = build("conv_chain_2d")
    with pytest.raises(fxprune.FxPruneError, match="loss_fn"):
        fxprune.plan(model, fxprune.Policy(criterion, 0.5), inputs, calibration=[inputs],
                     importance_options=options)


def test_bad_option_values_are_policy_errors():
    model, inputs = build("conv_chain_2d")
    with pytest.raises(fxprune.PolicyError, match="target_metric"):
        fxprune.plan(model, fxprune.Policy("scp", 0.5), inputs, importance_options={"target_metric": "l3"})


def test_calibration_is_read_once_and_model_left_alone(unchanged):
    snapshot, assert_unchanged = unchanged
    model, inputs = build("residual")
    model.train()
    before = snapshot(model)
    reads = []

    def stream():
        for seed in (5, 6):
            reads.append(seed)
            yield build("residual", seed=seed)[1]
    fxprune.plan(model, fxprune.Policy("sensitivity", 0.5), inputs, calibration=stream())
    assert reads == [5, 6]
    assert_unchanged(model, before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
