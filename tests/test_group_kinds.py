"""Group kinds (fxprune.group_kinds) and per-kind ratios (Policy(structures=...)): kinds are right
on CNNs and transformers, a kind at 0.0 stays whole while the others prune, the pruned models
match the mask oracle, the plan JSON carries the kind and old plans still load."""
import collections
import dataclasses
import json

import pytest
import torch
import torch.nn as nn
import torchvision
from torch.utils._pytree import tree_leaves

import fxprune
from fxprune.errors import PolicyError
from fxprune.group_kinds import KINDS, RULES, canonical_kind
from fxprune.model_zoo import transformers_model
from fxprune.serialize import PlanFormatError, check_plan, plan_to_dict, rebuild


def _kinds(plan):
    return collections.Counter(g.kind for g in plan.groups)


def _by_kind(plan, kind):
    return [g for g in plan.groups if g.kind == kind]


def _owners(g, role):
    return sorted({p.owner for p in g.params if p.role == role})


# --- the policy field --------------------------------------------------------------------------

def test_structures_accept_singular_and_plural_keys_and_store_canonical_kinds():
    p = fxprune.Policy(ratio=0.5, structures={"heads": 0.25, "mlp": 0.5, "hidden": 0.0, "kv-groups": 1})
    assert p.structures == (("head", 0.25), ("kv-group", 1), ("hidden", 0.0), ("mlp", 0.5))
    assert p.structure_ratio("head") == 0.25 and p.structure_ratio("channel") is None
    assert fxprune.Policy(structures={"channels": 0.1}).structures == (("channel", 0.1),)
    assert json.loads(json.dumps(p.to_dict()))["structures"] == {"head": 0.25, "kv-group": 1, "hidden": 0.0,
                                                                  "mlp": 0.5}
    assert dataclasses.replace(p, ratio=0.3).structures == p.structures  # replace re-checks the normal form
    assert fxprune.Policy().structures == () and fxprune.Policy().to_dict()["structures"] == {}


@pytest.mark.parametrize("structures, words", [
    ({"attention": 0.5}, "'attention' (str) is no group kind; the kinds are channel(s), head(s), kv-group(s), "
                         "hidden, mlp"),
    ({3: 0.5}, "is no group kind"),
    ({"head": 0.5, "heads": 0.2}, "names the kind 'head' twice"),
    ({"mlp": 1.5}, "structures ratio for 'mlp' must be a number in [0, 1]; got 1.5 (float)"),
    ({"mlp": "0.5"}, "structures ratio for 'mlp'"),
    ({"mlp": True}, "structures ratio for 'mlp'"),
    ("mlp", "structures must be a dict {group kind: ratio in [0, 1]}"),
    (0.5, "structures must be a dict"),
])
def test_bad_structures_are_clear_errors(structures, words):
    with pytest.raises(PolicyError) as info:
        fxprune.Policy(structures=structures)
    assert words in str(info.value)


def test_the_rule_table_covers_every_kind_and_ends_with_a_catch_all():
    assert {r.kind for r in RULES} == set(KINDS)
    assert RULES[-1].kind == "channel" and all(r.why for r in RULES)
    assert [canonical_kind(k) for k in ("Heads", "kv_groups", "hidden", "mlps", "x")] == \
        ["head", "kv-group", "hidden", "mlp", None]


# --- kinds on real models --------------------------------------------------------------------------

def test_resnet18_groups_are_all_channels_and_explain_shows_the_kind():
    plan = fxprune.plan(torchvision.models.resnet18().eval(), fxprune.Policy(ratio=0.5),
                        (torch.randn(1, 3, 64, 64),))
    assert set(_kinds(plan)) == {"channel"}
    text = fxprune.explain(plan)
    header = next(line for line in text.splitlines() if line.split()[:1] == ["group"])
    assert header.split()[:2] == ["group", "kind"] and "channel" in text
    assert {g["kind"] for g in plan_to_dict(plan)["groups"]} == {"channel"}


def test_a_classifier_mlp_outside_a_transformer_is_not_mlp():
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4))
    plan = fxprune.plan(net, fxprune.Policy(ratio=0.5), (torch.randn(2, 16),))
    assert set(_kinds(plan)) == {"channel"}


def test_vit_b_16_heads_prune_while_mlp_and_stream_stay_whole():
    model = torchvision.models.vit_b_16().eval()
    x = (torch.randn(1, 3, 224, 224),)
    policy = fxprune.Policy(ratio=0.5, structures={"mlp": 0.0, "hidden": 0.0})
    pruned = fxprune.transform(model, policy, x)
    plan = pruned.meta["fxprune"]
    assert _kinds(plan) == {"head": 12, "mlp": 12, "hidden": 1, "channel": 1}  # heads 12x12, mlp 3072, stream 768
    assert all(g.size == 12 and g.kept == 6 for g in _by_kind(plan, "head"))
    assert all(g.size == 3072 and not g.removed for g in _by_kind(plan, "mlp"))
    stream, = _by_kind(plan, "hidden")
    assert stream.size == 768 and not stream.removed and "conv_proj" in _owners(stream, "producer")
    assert all(_owners(g, "producer") == [f"encoder.layers.encoder_layer_{i}.mlp.0"]
               for i, g in enumerate(_by_kind(plan, "mlp")))
    assert fxprune.verify(pruned).ok


@pytest.fixture(scope="module")
def bert():
    return transformers_model("bert")


@pytest.fixture(scope="module")
def llama():
    return transformers_model("llama")


def test_bert_kinds_and_mlp_left_whole_while_heads_prune(bert):
    model, x = bert
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5, structures={"mlp": 0.0}), x)
    plan = pruned.meta["fxprune"]
    assert plan.capture["frontend"] == "export"
    kinds = _kinds(plan)
    assert kinds["head"] == 2 and kinds["mlp"] == 2 and kinds["hidden"] >= 1
    assert all(g.size == 4 and g.kept == 2 for g in _by_kind(plan, "head"))
    assert all(g.size == 128 and not g.removed for g in _by_kind(plan, "mlp"))
    assert all(g.note == "kept whole: structures gives 'mlp' 0.0" for g in _by_kind(plan, "mlp"))
    assert all(o.endswith("intermediate.dense") for g in _by_kind(plan, "mlp") for o in _owners(g, "producer"))
    assert fxprune.verify(pruned).ok
    header = next(line for line in fxprune.explain(plan).splitlines() if line.startswith("Plan:"))
    assert "structures={'mlp': 0.0}" in header


def test_bert_heads_left_whole_while_mlp_prunes(bert):
    model, x = bert
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5, structures={"heads": 0.0, "mlp": 0.25}), x)
    plan = pruned.meta["fxprune"]
    assert all(not g.removed for g in _by_kind(plan, "head"))
    assert all(g.kept == 96 for g in _by_kind(plan, "mlp"))
    assert fxprune.verify(pruned).ok


def test_llama_has_kv_groups_and_one_gate_up_mlp_group_per_layer(llama):
    model, x = llama
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5), x)
    assert plan.capture["frontend"] == "export"
    kinds = _kinds(plan)
    assert kinds["kv-group"] == 2 and kinds["mlp"] == 2 and kinds["hidden"] >= 1 and "head" not in kinds
    for g in _by_kind(plan, "mlp"):
        assert g.size == 128 and [o.rsplit(".", 1)[-1] for o in _owners(g, "producer")] == ["gate_proj", "up_proj"]
        assert [o.rsplit(".", 1)[-1] for o in _owners(g, "consumer")] == ["down_proj"]
    for g in _by_kind(plan, "kv-group"):  # 2 kv heads, each shared by 2 of the 4 query heads
        assert g.size == 2 and {o.rsplit(".", 1)[-1] for o in _owners(g, "producer")} == {"q_proj", "k_proj",
                                                                                            "v_proj"}


def test_llama_mlp_left_whole_while_kv_groups_prune_and_the_reverse(llama):
    model, x = llama
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5, structures={"mlp": 0.0}), x)
    plan = pruned.meta["fxprune"]
    assert all(not g.removed for g in _by_kind(plan, "mlp"))
    assert any(g.removed for g in _by_kind(plan, "kv-group"))
    assert fxprune.verify(pruned).ok
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5, structures={"kv-groups": 0.0}), x)
    plan = pruned.meta["fxprune"]
    assert all(not g.removed for g in _by_kind(plan, "kv-group"))
    assert all(g.kept == 64 for g in _by_kind(plan, "mlp"))
    assert fxprune.verify(pruned).ok


# --- scope, budgets, plan files ----------------------------------------------------------------------

def test_global_scope_ranks_only_the_kinds_not_named(bert):
    model, x = bert
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5, scope="global", structures={"head": 0.0}), x)
    assert all(not g.removed for g in _by_kind(plan, "head"))
    free = [g for g in plan.groups if g.kind != "head" and not g.blocked]
    removable = sum(g.size - len(g.pinned) for g in free)
    assert sum(len(g.removed) for g in free) == removable // 2


def test_a_budget_moves_only_the_kinds_not_named(bert):
    model, x = bert
    plan = fxprune.plan(model, fxprune.Policy(params=0.75, structures={"heads": 0.25}), x)
    assert all(g.kept == 3 for g in _by_kind(plan, "head"))  # named: keeps its ratio
    assert any(g.removed for g in _by_kind(plan, "mlp"))    # the search moved the rest
    assert plan.selection["metric"] == "params" and plan.selection["met"]


def test_plan_json_carries_the_kind_and_old_plans_still_rebuild(bert):
    model, x = bert
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5, structures={"mlp": 0.0}), x)
    data = plan_to_dict(pruned.meta["fxprune"])
    assert [g["kind"] for g in data["groups"]] == [g.kind for g in pruned.meta["fxprune"].groups]
    check_plan(json.loads(json.dumps(data)))
    old = json.loads(json.dumps(data))
    for g in old["groups"]:
        del g["kind"]
    again = rebuild(model, old, x, state_dict=pruned.state_dict())
    with torch.no_grad():
        got, want = tree_leaves(again(*x)), tree_leaves(pruned(*x))
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    bad = json.loads(json.dumps(data))
    bad["groups"][0]["kind"] = "attention"
    with pytest.raises(PlanFormatError) as info:
        check_plan(bad)
    assert info.value.field == "groups[0].kind"
