"""The mask oracle on every coupling kind: the pruned model computes the masked original."""
import pytest
import torch

import fxprune
from model_state import assert_unchanged, output_shapes as _shapes, snapshot
from zoo import ZOO, build

POLICIES = [
    fxprune.Policy(ratio=0.3),
    fxprune.Policy(ratio=0.5, importance="l2"),
    fxprune.Policy(ratio=0.8),
    fxprune.Policy(ratio=0.5, round_to=4),
    fxprune.Policy(ratio=1.0, min_channels=2),
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"r{p.ratio}-{p.importance}-rt{p.round_to}")
@pytest.mark.parametrize("name", sorted(ZOO))
def test_oracle_holds_in_float64(name, policy):
    model, inputs = build(name)
    before = snapshot(model)
    pruned = fxprune.transform(model, policy, inputs)
    plan = pruned.meta["fxprune"]
    assert_unchanged(model, before)
    fresh = build(name, seed=1)[1]
    result = fxprune.verify(pruned, inputs=fresh)
    assert result.exact
    assert result.max_error <= 1e-9, f"{name}: relative error {result.max_error}"
    with torch.no_grad():
        assert _shapes(pruned(*fresh)) == _shapes(model(*fresh))
    removable = [g for g in plan.groups if not g.blocked]
    assert removable, f"{name}: nothing prunable"
    for g in plan.groups:
        assert g.kept >= min(policy.min_channels, g.size)
        if policy.round_to and g.removed:
            assert g.kept % policy.round_to == 0
    if policy.ratio >= 0.5:
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_ratio_zero_is_bit_identical(name):
    model, inputs = build(name)
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.0), inputs)
    fresh = build(name, seed=2)[1]
    with torch.no_grad():
        got, want = pruned(*fresh), model(*fresh)
    flat = lambda o: [o] if isinstance(o, torch.Tensor) else [t for v in (o.values() if isinstance(o, dict) else o) for t in flat(v)]
    assert all(torch.equal(a, b) for a, b in zip(flat(got), flat(want)))
    assert pruned.meta["fxprune"].removed_channels() == {}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_pruned_modules_are_physically_smaller_and_consistent(name):
    model, inputs = build(name)
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5), inputs)
    for mod in pruned.modules():
        if isinstance(mod, torch.nn.modules.conv._ConvNd):
            w = mod.weight
            if mod.transposed:
                assert (w.shape[0], w.shape[1] * mod.groups) == (mod.in_channels, mod.out_channels)
            else:
                assert (w.shape[0], w.shape[1] * mod.groups) == (mod.out_channels, mod.in_channels)
        elif isinstance(mod, torch.nn.Linear):
            assert tuple(mod.weight.shape) == (mod.out_features, mod.in_features)
        elif isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            assert mod.running_mean.shape[0] == mod.num_features == mod.weight.shape[0]
