"""Convolution-family patterns against the mask oracle (float64, relative error <= 1e-9):
grouped convs, GroupNorm, channel shuffle, channels-last blocks, reductions over channels,
PReLU/InstanceNorm, U-Net and FPN decoders, feature extractors, and the torchvision models
built from them (ResNeXt, RegNet, ShuffleNetV2, ConvNeXt)."""
import pytest
import torch
import torch.nn as nn
import torchvision

import fxprune
from model_state import assert_unchanged, output_shapes as _shapes, snapshot
from zoo_conv import APPROXIMATE, EXACT, build

POLICIES = [
    fxprune.Policy(ratio=0.3),
    fxprune.Policy(ratio=0.5, importance="l2"),
    fxprune.Policy(ratio=0.8),
    fxprune.Policy(ratio=0.5, round_to=2),
    fxprune.Policy(ratio=1.0, min_channels=2),
]


def _params(m):
    return sum(p.numel() for p in m.parameters())


def _owners(group):
    return {p.owner for p in group.producers}


def _check(model, inputs, policy, fresh, expect_exact=True):
    """Transform, then: input untouched, oracle holds, shapes unchanged; returns the plan."""
    before = snapshot(model)
    pruned = fxprune.transform(model, policy, inputs)
    assert_unchanged(model, before)
    plan = pruned.meta["fxprune"]
    with torch.no_grad():
        assert _shapes(pruned(*fresh)) == _shapes(model(*fresh))
    if expect_exact:
        result = fxprune.verify(pruned, inputs=fresh)
        assert result.exact
        assert result.max_error <= 1e-9, f"relative error {result.max_error}"
    return pruned, plan


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"r{p.ratio}-{p.importance}-rt{p.round_to}")
@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_patterns_hold_the_oracle(name, policy):
    model, inputs = build(name)
    pruned, plan = _check(model, inputs, policy, build(name, seed=1)[1])
    assert any(g.removed for g in plan.groups) or policy.ratio < 0.5, f"{name}: nothing pruned"
    if policy.ratio >= 0.5:
        assert _params(pruned) < _params(model)


@pytest.mark.parametrize("name", sorted(APPROXIMATE))
def test_approximate_patterns_are_marked_and_exact_only_holds(name):
    model, inputs = build(name)
    fresh = build(name, seed=1)[1]
    _, plan = _check(model, inputs, fxprune.Policy(ratio=0.5, exact_only=True), fresh)
    assert all(g.exact for g in plan.groups if g.removed)
    assert any(not g.exact and "kept whole (exact_only)" in g.note for g in plan.groups)
    _, loose = _check(model, inputs, fxprune.Policy(ratio=0.5), fresh, expect_exact=False)
    inexact = [g for g in loose.groups if not g.exact]
    assert inexact and any(g.removed for g in inexact) and not loose.exact
    assert all(why for g in inexact for why in g.inexact.values())


# -- grouped convolutions -------------------------------------------------------------------
def test_grouped_conv_couples_position_j_of_every_block():
    model, inputs = build("grouped_2d")
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5), inputs)
    by_owner = {frozenset(_owners(g)): g for g in plan.groups}
    assert by_owner[frozenset({"stem.0"})].size == 4            # 12 channels seen as 3 blocks of 4
    assert by_owner[frozenset({"g3"})].size == 1                # blocks of 4 (g3) and of 3 (g4) leave one unit
    assert by_owner[frozenset({"g4", "res"})].size == 2
    dim, removed = plan.removed_channels()["stem_0"]
    g = by_owner[frozenset({"stem.0"})]
    assert removed == sorted(j + 4 * i for j in g.removed for i in range(3))
    pruned = fxprune.apply(plan)
    assert (pruned.g3.groups, pruned.g3.in_channels, pruned.g4.groups, pruned.up.groups) == (3, 6, 4, 4)


def test_grouped_widths_stay_divisible_by_groups():
    model, inputs = build("grouped_2d")
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.7), inputs)
    for m in pruned.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0
            w = m.weight.shape
            assert (w[1] * m.groups, w[0]) == ((m.out_channels, m.in_channels) if m.transposed
                                               else (m.in_channels, m.out_channels))


# -- GroupNorm ------------------------------------------------------------------------------
def test_group_norm_removes_whole_norm_groups_and_fixes_num_groups():
    model, inputs = build("group_norms")
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5), inputs)
    plan = pruned.meta["fxprune"]
    sizes = {frozenset(_owners(g)): g.size for g in plan.groups}
    assert sizes[frozenset({"a"})] == 4 and sizes[frozenset({"b"})] == 3 and sizes[frozenset({"c"})] == 8
    assert (pruned.gn1.num_groups, pruned.gn1.num_channels, pruned.gn1.weight.shape[0]) == (2, 8, 8)
    assert (pruned.gn2.num_groups, pruned.gn2.num_channels) == (2, 8)      # affine=False: no tensor to slice
    assert (pruned.gn3.num_groups, pruned.gn3.num_channels) == (4, 4)
    call = next(n for n in pruned.graph.nodes if n.op == "call_function" and "group_norm" in str(n.target))
    assert call.args[1] == 2                                             # literal num_groups rewritten


def test_group_norm_with_one_group_is_inexact():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(1, 8), nn.Conv2d(8, 2, 1)).double()
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 4, 4).double(),))
    (g,) = plan.groups[:1]
    assert g.size == 8 and not g.exact and "num_groups=1" in next(iter(g.inexact.values()))
    assert getattr(fxprune.apply(plan), "1").num_groups == 1


# -- channel shuffle ------------------------------------------------------------------------
def test_shuffle_keeps_the_same_positions_in_every_block_and_rewrites_literals():
    model, inputs = build("shuffle_literal")
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5), inputs)
    views = [n.args[1:] for n in pruned.graph.nodes if n.op == "call_method" and n.target == "view"]
    assert all(isinstance(d, int) for v in views for d in v)
    for split, merge in zip(views[0::2], views[1::2]):
        assert split[1] * split[2] == merge[1] < 12                 # literal sizes follow the kept width
    assert [v[1] for v in views[0:4:2]] == [2, 2]                   # g=2 shuffles: every block keeps j
    # the g=3 shuffle sees 3 blocks that each carry one unit (see zoo_conv.Shuffle): whole blocks go
    assert views[4][2] == 4 and views[4][1] < 3


def test_channel_shuffle_equals_its_view_transpose_spelling():
    decisions = {}
    for style in ("literal", "dynamic", "permute", "function", "module"):
        model, inputs = build(f"shuffle_{style}")
        plan = fxprune.plan(model, fxprune.Policy(ratio=0.5), inputs)
        decisions[style] = [(g.size, g.removed) for g in plan.groups]
    assert len({tuple(d) for d in decisions.values()}) == 1, decisions


# -- channels-last, reductions, norms ---------------------------------------------------------
def test_channels_last_layer_norm_marks_the_stream_inexact_and_prunes_the_mlp_exactly():
    model, inputs = build("channels_last")
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5, exact_only=True), inputs)
    stream = next(g for g in plan.groups if "dw" in _owners(g))
    hidden = next(g for g in plan.groups if _owners(g) == {"fc1"})
    assert not stream.exact and "LayerNorm" in next(iter(stream.inexact.values()))
    assert {p.target for p in stream.passengers} >= {"norm.weight", "norm.bias", "layer_scale"}
    assert not stream.removed and hidden.exact and hidden.kept == 16
    loose = fxprune.transform(model, fxprune.Policy(ratio=0.5), inputs)
    assert loose.norm.normalized_shape == (4,) and loose.norm2.normalized_shape == (4,)
    assert tuple(loose.layer_scale.shape) == (4, 1, 1)


def test_mean_over_channels_is_rescaled_to_stay_exact():
    model, inputs = build("reductions")
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5), inputs)
    assert all(g.exact for g in plan.groups)
    assert {k for k, _ in plan.analysis.literals.values()} == {"mean_rescale"}


def test_channel_mixing_reductions_give_reasons():
    model, inputs = build("mixing_reductions")
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5), inputs)
    reasons = " ".join(w for g in plan.groups for w in g.inexact.values())
    assert "amax" in reasons and ("softmax" in reasons or "Softmax" in reasons)


def test_per_channel_modules_fix_their_sizes():
    model, inputs = build("per_channel_2d")
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5), inputs)
    assert pruned.p1.num_parameters == pruned.p1.weight.numel() == 4
    assert pruned.p2.num_parameters == 1
    assert pruned.in1.num_features == pruned.in1.running_mean.shape[0] == pruned.in1.weight.shape[0] == 4
    assert pruned.in3.num_features == 3 and pruned.pw.shape[0] == 3


# -- decoders, multi-output, feature extractors -------------------------------------------------
def test_unet_skip_concats_use_offsets():
    model, inputs = build("unet")
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5), inputs)
    g_up = next(g for g in plan.groups if _owners(g) == {"up2"})
    g_e2 = next(g for g in plan.groups if _owners(g) == {"e2.0"})
    dim, removed = plan.removed_channels()["cat"]
    assert removed == sorted(list(g_up.removed) + [12 + c for c in g_e2.removed])


def test_create_feature_extractor_outputs_just_work():
    from torchvision.models.feature_extraction import create_feature_extractor
    torch.manual_seed(0)
    body = create_feature_extractor(torchvision.models.resnet18().eval(),
                                    {"layer2": "mid", "layer4": "out"}).double().eval()
    x = (torch.randn(1, 3, 64, 64, dtype=torch.float64),)
    pruned, plan = _check(body, x, fxprune.Policy(ratio=0.5), (torch.randn_like(x[0]),))
    assert isinstance(pruned(x[0]), dict) and set(pruned(x[0])) == {"mid", "out"}
    assert _params(pruned) < _params(body)


# -- torchvision models -------------------------------------------------------------------------
def _torchvision(name, size=64):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
        if hasattr(m, "layer_scale"):       # ConvNeXt's 1e-6 init would hide every block
            m.layer_scale.data.uniform_(0.5, 1.0)
    return model.double(), (torch.randn(1, 3, size, size, dtype=torch.float64),)


@pytest.mark.parametrize("name", ["resnext50_32x4d", "regnet_x_400mf", "regnet_y_400mf", "shufflenet_v2_x0_5",
                                  "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0"])
def test_torchvision_grouped_and_shuffled_models_prune_exactly(name):
    model, x = _torchvision(name)
    pruned, plan = _check(model, x, fxprune.Policy(ratio=0.5), (torch.randn_like(x[0]),))
    assert plan.exact and _params(pruned) < 0.6 * _params(model)


def test_torchvision_convnext_exact_only_is_exact_and_loose_is_marked():
    model, x = _torchvision("convnext_tiny", size=32)
    fresh = (torch.randn_like(x[0]),)
    pruned, plan = _check(model, x, fxprune.Policy(ratio=0.5, exact_only=True), fresh)
    assert any(g.removed for g in plan.groups) and _params(pruned) < _params(model)
    loose, lplan = _check(model, x, fxprune.Policy(ratio=0.5), fresh, expect_exact=False)
    streams = [g for g in lplan.groups if not g.exact]
    assert len(streams) == 4 and all(g.removed for g in streams) and not lplan.exact
    assert _params(loose) < 0.4 * _params(model)
