"""Selection: budgets reached, monotone, overrides by precedence, clamps reported."""
import pytest
import torch
import torch.nn as nn
import torchvision

import fxprune
from fxprune.cost import count
from zoo import build


def _fractions(pruned):
    plan = pruned.meta["fxprune"]
    before, after = count(plan.traced), count(pruned)
    return after["macs"] / before["macs"], after["params"] / before["params"]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("policy", [
    fxprune.Policy(flops=0.5), fxprune.Policy(flops=0.6), fxprune.Policy(params=0.5),
    fxprune.Policy(flops=0.5, scope="global"), fxprune.Policy(flops=0.6, scope="global", normalize="lamp"),
    fxprune.Policy(flops=0.5, allocation="cost"),
], ids=lambda p: f"{p.scope}-{p.budget}-{p.normalize}-{p.allocation}")
def test_budget_is_met_within_one_percent(name, policy):
    model = torchvision.models.get_model(name).eval()
    pruned = fxprune.transform(model, policy, (torch.randn(1, 3, 64, 64),))
    macs, params = _fractions(pruned)
    metric, target = policy.budget
    got = macs if metric == "macs" else params
    assert target - 1e-9 <= got <= target + 0.01
    sel = pruned.meta["fxprune"].selection
    assert sel["met"] and abs(sel["achieved"] - got) < 1e-9


def test_more_pruning_never_gives_a_bigger_model():
    model, x = build("flatten_heads")
    sizes = []
    for r in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
        sizes.append(_fractions(fxprune.transform(model, fxprune.Policy(ratio=r), x)))
    assert all(a[0] >= b[0] and a[1] >= b[1] for a, b in zip(sizes, sizes[1:]))


def test_global_scope_ranks_across_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 1))
    with torch.no_grad():
        model[2].weight.mul_(100)  # the second conv's filters all outrank the first's (raw norms)
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5, scope="global", normalize="none"), (torch.randn(1, 3, 9, 9),))
    first, second = plan.groups[0], plan.groups[1]
    assert len(first.removed) == 7 and len(second.removed) == 1  # min_channels clamps the first


def test_overrides_follow_precedence():
    model = torchvision.models.resnet18()
    policy = fxprune.Policy(ratio=0.5, overrides={nn.Conv2d: 0.25, "layer4.*": 0.75, "layer4.1.conv1": 0.0})
    plan = fxprune.plan(model, policy, (torch.randn(1, 3, 64, 64),))
    by_owner = {p.owner: g for g in plan.groups for p in g.producers}
    assert by_owner["layer1.0.conv1"].kept == 48          # type: 0.25 of 64
    assert by_owner["layer4.0.conv1"].kept == 128         # pattern: 0.75 of 512
    assert by_owner["layer4.1.conv1"].kept == 512         # name: 0.0
    assert by_owner["fc"].removed == ()                   # output stays


def test_clamp_is_reported_not_silent():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 2, 1))
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5, round_to=4), (torch.randn(1, 3, 8, 8),))
    g = plan.groups[0]
    assert g.kept == 4 and "round_to=4" in g.note


@pytest.mark.parametrize("kwargs, words", [
    ({"scope": "everywhere"}, "scope must be one of local, global"),
    ({"flops": 0.0}, "flops is the fraction to keep"),
    ({"flops": 0.5, "params": 0.5}, "give one budget"),
    ({"overrides": {"fc": 2.0}}, "override ratio"),
    ({"normalize": "zscore"}, "normalize must be one of"),
    ({"allocation": "greedy"}, "allocation must be one of"),
])
def test_invalid_budget_policies(kwargs, words):
    with pytest.raises(fxprune.PolicyError, match=words):
        fxprune.Policy(**kwargs)


def test_cost_model_predicts_the_rewritten_counts():
    from fxprune.budget import CostModel
    model = torchvision.models.mobilenet_v2()
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.4), (torch.randn(1, 3, 64, 64),))
    plan = pruned.meta["fxprune"]
    predicted = CostModel(plan.traced, plan.groups, plan.analysis).fractions({g.id: g.removed for g in plan.groups})
    macs, params = _fractions(pruned)
    assert predicted["macs"] == pytest.approx(macs, rel=1e-9)
    assert predicted["params"] == pytest.approx(params, rel=1e-9)


class _GlobalRanker:
    """A criterion that ranks channels across groups whatever the policy says."""
    __name__ = "global_ranker"

    def __call__(self, group, ctx):
        return torch.arange(group.size, dtype=torch.float64) * (group.id + 1)

    def selection_policy(self, policy, ctx):
        import dataclasses
        return dataclasses.replace(policy, scope="global", normalize="none")


def test_a_criterion_may_derive_the_selection_policy_and_it_is_recorded():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(8, 2, 1))
    x = (torch.randn(1, 3, 4, 4),)
    plan = fxprune.plan(model, fxprune.Policy(_GlobalRanker(), ratio=0.5), x)
    assert plan.selection["selection_policy"] == {"scope": "global", "normalize": "none"}
    assert plan.policy.scope == "local"
    assert sorted(len(g.removed) for g in plan.groups if not g.blocked) == [3, 5]  # not 4 and 4


def test_a_selection_policy_that_is_not_a_policy_is_reported():
    class Bad(_GlobalRanker):
        def selection_policy(self, policy, ctx):
            return {"scope": "global"}
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 2, 1))
    with pytest.raises(fxprune.StageError, match="not a Policy"):
        fxprune.plan(model, fxprune.Policy(Bad(), ratio=0.5), (torch.randn(1, 3, 4, 4),))
