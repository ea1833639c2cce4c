"""Outputs keep their width unless Policy(prune_outputs=...) narrows them; the mask oracle then
compares the kept channels of a narrowed output. The model follows Torch-Pruning's
test_multiple_inputs_and_outputs: two inputs, two outputs, every layer feeds an output."""
import argparse
import json

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.blocked import blocked_summary
from fxprune.cli_args import add_model_arguments, add_policy_arguments, policy_from_args
from fxprune.policy_file import policy_from_file
from fxprune.serialize import PlanFormatError, check_plan, plan_to_dict, rebuild


class TwoInTwoOut(nn.Module):
    """Each input has a conv+BN branch; both branches meet in a concat that feeds one head per
    output, and each head adds its branch back, so every channel group reaches an output."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.head1, self.head2 = nn.Conv2d(2 * c, c, 1), nn.Conv2d(2 * c, c, 1)

    def forward(self, x1, x2):
        a = torch.relu(self.bn1(self.conv1(x1)))
        b = torch.relu(self.bn2(self.conv2(x2)))
        cat = torch.cat([a, b], 1)
        return self.head1(cat) + a, self.head2(cat) + b


class DictOut(TwoInTwoOut):
    def forward(self, x1, x2):
        y1, y2 = super().forward(x1, x2)
        return {"left": y1, "right": y2}


def _model(cls=TwoInTwoOut):
    torch.manual_seed(0)
    m = cls().double().eval()
    for bn in (m.bn1, m.bn2):  # non-trivial statistics, so a wrong slice shows
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return m


X = (torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 3, 8, 8, dtype=torch.float64))


def _widths(out):
    out = out.values() if isinstance(out, dict) else out
    return [o.shape[1] for o in out]


def test_by_default_nothing_is_pruned_and_the_report_says_why():
    plan = fxprune.plan(_model(), fxprune.Policy(ratio=0.5), X)
    assert all(g.blocked and not g.removed for g in plan.groups)
    assert sorted(next(iter(g.pinned.values())) for g in plan.groups) == [
        "reaches a model output (#0)", "reaches a model output (#1)"]
    first = fxprune.explain(plan).splitlines()[0]
    assert first == ("nothing to prune: every channel group reaches a model output (2 groups; outputs #0, #1); "
                     "Policy(prune_outputs=True) narrows hidden outputs")
    assert blocked_summary(plan).nothing_to_prune
    assert _widths(fxprune.apply(plan)(*X)) == [8, 8]


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("prune_outputs, widths", [(True, [4, 4]), ([0], [4, 8]), ([1], [8, 4])])
def test_narrowed_outputs_hold_exactly_the_kept_channels(capture, prune_outputs, widths):
    model = _model()
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5, prune_outputs=prune_outputs), X, capture=capture)
    assert _widths(pruned(*X)) == widths
    check = fxprune.verify(pruned)
    assert check.ok and check.compared == 2 and check.max_error <= 1e-12
    assert not blocked_summary(pruned.meta["fxprune"]).nothing_to_prune


def test_the_oracle_still_catches_a_wrong_narrowed_output():
    pruned = fxprune.transform(_model(), fxprune.Policy(ratio=0.5, prune_outputs=True), X, capture="fx")
    with torch.no_grad():
        pruned.head1.bias[0] += 1.0
    check = fxprune.verify(pruned)
    assert not check.ok and check.max_error > 1e-3


def test_narrowed_output_equals_the_masked_original_on_its_kept_channels():
    model = _model()
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5, prune_outputs=[0]), X, capture="fx")
    plan = pruned.meta["fxprune"]
    removed = plan.removed_channels()
    from fxprune.verify import MaskedInterpreter
    full = MaskedInterpreter(plan.traced, removed, narrow_outputs=False).run(*X)
    out_node = next(n for n in plan.traced.graph.nodes if n.op == "output").args[0][0].name
    dim, gone = removed[out_node]
    kept = [c for c in range(8) if c not in gone]
    assert torch.allclose(pruned(*X)[0], full[0][:, kept], rtol=1e-12, atol=1e-12)
    assert torch.allclose(pruned(*X)[1], full[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_outputs_are_named_by_dict_key(capture):
    model = _model(DictOut)
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5, prune_outputs=["right"]), X, capture=capture)
    assert _widths(pruned(*X)) == [8, 4]
    assert fxprune.verify(pruned).ok
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5), X, capture=capture)
    assert "reaches a model output ('left')" in {w for g in plan.groups for w in g.pinned.values()}


@pytest.mark.parametrize("value, message", [
    ("yes", "prune_outputs must be True, False or a list"), ([-1], "neither"), ([0, 0], "twice"),
    ([True], "neither"), (1, "prune_outputs must be True, False or a list")])
def test_bad_values_are_rejected(value, message):
    with pytest.raises(fxprune.PolicyError, match=message):
        fxprune.Policy(prune_outputs=value)


def test_an_output_the_model_lacks_is_a_policy_error_naming_its_outputs():
    with pytest.raises(fxprune.PolicyError, match=r"2, 'logits' are no output of the model \(its outputs: 0, 1\)"):
        fxprune.plan(_model(), fxprune.Policy(prune_outputs=[2, "logits"]), X)


def test_plan_json_keeps_the_field_and_rebuild_narrows_the_same_outputs(tmp_path):
    model = _model()
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5, prune_outputs=[1]), X, capture="fx")
    data = json.loads(json.dumps(plan_to_dict(pruned.meta["fxprune"])))
    assert data["policy"]["prune_outputs"] == [1]
    again = rebuild(_model(), data, X, state_dict=pruned.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again(*X), pruned(*X)))
    old = dict(data, policy={k: v for k, v in data["policy"].items() if k != "prune_outputs"})
    with pytest.raises(fxprune.PlanMismatchError, match="cannot be removed"):
        rebuild(_model(), old, X)  # a plan without the field pins every output
    with pytest.raises(PlanFormatError, match="policy.prune_outputs"):
        check_plan(dict(data, policy=dict(data["policy"], prune_outputs="all")))


def test_cli_flag_and_policy_file(tmp_path):
    p = argparse.ArgumentParser()
    add_model_arguments(p)
    add_policy_arguments(p)
    assert policy_from_args(p.parse_args(["m"])).prune_outputs is False
    assert policy_from_args(p.parse_args(["m", "--prune-outputs"])).prune_outputs is True
    assert policy_from_args(p.parse_args(["m", "--prune-outputs", "0", "logits"])).prune_outputs == (0, "logits")
    path = tmp_path / "policy.json"
    path.write_text('{"ratio": 0.5, "prune_outputs": "logits"}')
    assert policy_from_file(path).prune_outputs == ("logits",)
    path.write_text('{"prune_outputs": {"a": 1}}')
    with pytest.raises(fxprune.PolicyError, match="'prune_outputs' must be true, false or a list"):
        policy_from_file(path)
    assert fxprune.Policy(prune_outputs=[0, "x"]).to_dict()["prune_outputs"] == [0, "x"]
