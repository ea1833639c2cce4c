"""DynamicPruner: masks follow the policy, straight-through gradients, freezing, exact finalize."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fxprune
from fxprune.policy import kept_width
from fxprune.training import DynamicPruner
from fxprune.verify import relative_error
from training_nets import batch, hook_count, tiny_resnet, train_steps
from zoo import build

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
X = (batch(0, n=2)[0],)


@pytest.mark.parametrize("policy", [
    fxprune.Policy(ratio=0.5),
    fxprune.Policy(ratio=0.5, scope="global"),
    fxprune.Policy(flops=0.6, scope="global"),
    fxprune.Policy(params=0.5, round_to=4),
])
def test_initial_masks_are_the_one_shot_plan(policy):
    model = tiny_resnet()
    pruner = DynamicPruner(model, policy, X)
    one_shot = fxprune.plan(model, policy, X)
    assert pruner.removed() == {g.id: g.removed for g in one_shot.groups if g.id in pruner.keep}
    if policy.flops:
        assert pruner.macs_kept() == pytest.approx(policy.flops, abs=0.01)
    pruner.remove()


def test_masks_follow_ratio_and_min_channels():
    model = tiny_resnet()
    pruner = DynamicPruner(model, fxprune.Policy(ratio=0.9, min_channels=3), X, every=1)
    train_steps(model, pruner, 3)
    for g in pruner.groups:
        assert int(pruner.keep[g.id].sum()) == kept_width(g.size, 0.9, 3, None) >= 3
    pruner.remove()


def test_scope_argument_overrides_policy():
    model = tiny_resnet()
    pruner = DynamicPruner(model, fxprune.Policy(ratio=0.5), X, scope="global")
    assert pruner.policy.scope == "global"
    kept = {g.id: int(pruner.keep[g.id].sum()) for g in pruner.groups}
    assert sum(kept.values()) == sum(g.size for g in pruner.groups) - sum(g.size for g in pruner.groups) // 2
    pruner.remove()


def test_straight_through_gradient_reaches_masked_weights():
    model = tiny_resnet()
    pruner = DynamicPruner(model, fxprune.Policy(ratio=0.5), X)
    group = next(g for g in pruner.groups if any(p.owner == "block1.conv1" for p in g.producers))
    off = ~pruner.keep[group.id]
    seen = {}
    model.block1.conv2.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    x, y = batch(1)
    F.cross_entropy(model(x), y).backward()
    assert (seen["x"][:, off] == 0).all()                  # the forward is masked ...
    assert (seen["x"][:, ~off] != 0).any()
    for weight in (model.block1.conv1.weight, model.block1.bn1.weight, model.block1.bn1.bias):
        assert (weight.grad[off].abs().reshape(int(off.sum()), -1).sum(1) > 0).all()   # ... the gradient is not
    pruner.remove()


def test_masks_change_until_frozen_then_stay():
    model = tiny_resnet()
    pruner = DynamicPruner(model, fxprune.Policy(ratio=0.5), X, every=1, freeze_at=3)
    group = next(g for g in pruner.groups if any(p.owner == "block1.conv1" for p in g.producers))

    def revive_masked():  # make every masked filter the largest, so an update must flip them
        with torch.no_grad():
            model.block1.conv1.weight[~pruner.keep[group.id]] *= 100.0

    before = pruner.keep[group.id].clone()
    revive_masked()
    pruner.step()
    assert not torch.equal(pruner.keep[group.id], before)  # step 1 < freeze_at: masks moved
    pruner.step(), pruner.step()
    assert pruner.frozen
    frozen = {gid: k.clone() for gid, k in pruner.keep.items()}
    for _ in range(3):
        revive_masked()
        assert pruner.step() is False
        assert all(torch.equal(pruner.keep[gid], k) for gid, k in frozen.items())
    pruner.remove()


def test_ramp_grows_the_pruned_fraction():
    model = tiny_resnet()
    pruner = DynamicPruner(model, fxprune.Policy(flops=0.5, scope="global"), X, every=2, ramp_steps=6)
    assert pruner.macs_kept() == 1.0
    kept = []
    for _ in range(8):
        if pruner.step():
            kept.append(pruner.macs_kept())
    assert kept == sorted(kept, reverse=True) and kept[-1] == pytest.approx(0.5, abs=0.01)
    pruner.remove()


def test_finalize_equals_masked_model_verifies_and_removes_hooks():
    model = tiny_resnet()
    pruner = DynamicPruner(model, fxprune.Policy(flops=0.5, scope="global"), X, every=2, freeze_at=4,
                           decorrelation=0.05)
    train_steps(model, pruner, 5)
    model.eval()
    x = batch(9)[0]
    with torch.no_grad():
        masked = model(x)
    assert hook_count(model) > 0
    pruned = pruner.finalize()
    assert hook_count(model) == 0 and not pruner.hooks_attached()
    with torch.no_grad():
        assert relative_error(pruned.eval()(x), masked) < 1e-5
    assert fxprune.verify(pruned).ok
    kept = fxprune.cost.count(pruned)["macs"] / fxprune.cost.count(pruner.plan.traced)["macs"]
    assert pruner.macs_kept() == pytest.approx(kept, abs=0.01) and 0.49 <= kept <= 0.53
    plain = tiny_resnet(seed=1).eval()               # the model is plain and dense again
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


@pytest.mark.parametrize("name", ["residual", "activations", "concat", "functional", "split_chunk",
                                  "shared", "multi_output", "flatten_heads", "depthwise"])
def test_zoo_masked_model_is_the_pruned_model(name):
    """Exit masks (pre-hooks), output masks and parametrized parameters all give the oracle."""
    model, inputs = build(name)
    pruner = DynamicPruner(model, fxprune.Policy(ratio=0.5), inputs)
    with torch.no_grad():
        masked = model(*inputs)
    pruned = pruner.finalize()
    with torch.no_grad():
        assert relative_error(pruned(*inputs), masked) < 1e-9
    assert fxprune.verify(pruned).ok and hook_count(model) == 0
    assert any(g.removed for g in pruned.meta["fxprune"].groups)


def test_remove_then_state_dict_round_trip():
    model = tiny_resnet()
    pruner = DynamicPruner(model, fxprune.Policy(ratio=0.5), X, every=1)
    train_steps(model, pruner, 2)
    state = pruner.state_dict()
    other = DynamicPruner(copy.deepcopy(model), fxprune.Policy(ratio=0.25), X)
    other.load_state_dict(state)
    assert other.removed() == pruner.removed() and other.steps == 2
    pruner.remove()
    assert hook_count(model) == 0


def test_named_criterion_and_callable():
    model = tiny_resnet()
    by_name = DynamicPruner(model, fxprune.Policy(ratio=0.5), X, importance="l2")
    by_name.remove()
    reverse = DynamicPruner(model, fxprune.Policy(ratio=0.5), X,
                            importance=lambda g, ctx: -torch.arange(g.size, dtype=torch.float64))
    assert all(r == tuple(range(g.size - len(r), g.size)) for g in reverse.groups
               for r in [reverse.removed()[g.id]])
    reverse.remove()
