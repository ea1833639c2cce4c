"""Transformer patterns against the mask oracle (float64, 1e-9): nn.MultiheadAttention heads and
per-head dims, MLP hidden dims, class token and position embedding, einsum/matmul attention,
and torchvision's ViT, Swin (v1, v2) and MaxViT code paths on tiny configurations."""
import contextlib
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import maxvit, swin_transformer as swin, vision_transformer as vit

import fxprune
from model_state import assert_unchanged, snapshot
from fxprune.coupling import attention_rules, ops
from fxprune.rewrite import slicers
from fxprune.verify import MaskedInterpreter, relative_error
from zoo_transformer import ZOO, build

POLICIES = [fxprune.Policy(ratio=0.5), fxprune.Policy(ratio=0.3, importance="l2"), fxprune.Policy(ratio=0.8)]


def _shapes(out):
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    return tuple(_shapes(o) for o in out)


def _check(model, inputs, fresh, policy):
    """Transform, then: input model untouched, oracle within 1e-9, output shapes unchanged."""
    before = snapshot(model)
    pruned = fxprune.transform(model, policy, inputs)
    assert_unchanged(model, before)
    result = fxprune.verify(pruned, inputs=fresh)
    assert result.max_error <= 1e-9, f"relative error {result.max_error}"
    with torch.no_grad():
        assert _shapes(pruned(*fresh)) == _shapes(model(*fresh))
    return pruned, pruned.meta["fxprune"]


@contextlib.contextmanager
def _mha_rule(rule):
    saved = ops.MODULE_RULES[nn.MultiheadAttention]
    ops.MODULE_RULES[nn.MultiheadAttention] = rule
    try:
        yield
    finally:
        ops.MODULE_RULES[nn.MultiheadAttention] = saved


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"r{p.ratio}-{p.importance}")
@pytest.mark.parametrize("name", sorted(ZOO))
def test_attention_nets_prune_exactly(name, policy):
    model, inputs = build(name)
    _, plan = _check(model, inputs, build(name, seed=1)[1], policy)
    assert plan.exact and any(g.removed for g in plan.groups)


def test_mha_heads_are_their_own_space_and_the_call_becomes_functional():
    model, inputs = build("mha")
    pruned, plan = _check(model, inputs, build("mha", seed=1)[1], fxprune.Policy(ratio=0.5))
    heads = next(g for g in plan.groups if g.size == 4)
    assert {p.target for p in heads.producers} == {"mha.in_proj_weight"} and heads.kept == 2
    assert set(plan.masked_params()) == {"mha.in_proj_weight", "mha.in_proj_bias"}
    assert "scaled_dot_product_attention" in pruned.code and "fxprune" not in pruned.code
    assert (pruned.mha.num_heads, pruned.mha.head_dim) == (2, 4)
    assert tuple(pruned.mha.in_proj_weight.shape) == (24, 8)  # 2 heads x 4 dims x q/k/v, embedding 16 -> 8
    buffer = io.BytesIO()
    torch.save(pruned, buffer)  # a plain GraphModule: no fxprune objects inside
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    x = build("mha", seed=2)[1]
    assert torch.equal(again(*x), pruned(*x))


def test_unchanged_attention_keeps_the_module_call():
    model, inputs = build("mha")
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.0), inputs)
    assert "scaled_dot_product_attention" not in pruned.code
    x = build("mha", seed=2)[1]
    assert torch.equal(pruned(*x), model(*x))


def test_the_oracle_needs_the_head_masks():
    """Zeroing node outputs alone cannot express removed heads: the q/k/v rows are masked too."""
    model, inputs = build("mha")
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5), inputs)
    plan = pruned.meta["fxprune"]
    x = build("mha", seed=1)[1]
    with torch.no_grad():
        without = MaskedInterpreter(plan.traced, plan.removed_channels()).run(*x)
        got = pruned(*x)
    assert relative_error(got, without) > 1e-3


def test_mha_that_must_stay_a_module_couples_heads_with_the_embedding():
    model, inputs = build("mha_bias_kv")
    pruned, plan = _check(model, inputs, build("mha_bias_kv", seed=1)[1], fxprune.Policy(ratio=0.5))
    group = next(g for g in plan.groups if g.removed)
    assert group.size == 4 and {"mha.in_proj_weight", "mha.out_proj.weight", "inp.weight"} <= {p.target for p in group.params}
    mha = pruned.mha
    assert isinstance(mha, nn.MultiheadAttention) and "scaled_dot_product_attention" not in pruned.code
    assert (mha.embed_dim, mha.num_heads, mha.head_dim, mha.kdim) == (8, 2, 4, 8)
    assert tuple(mha.bias_k.shape) == (1, 1, 8)


def _fixer_without_rescale(m, before):
    m.embed_dim = m.in_proj_weight.shape[0] // 3
    m.head_dim = m.embed_dim // m.num_heads


@pytest.mark.parametrize("name", ["mha", "mha_bias_kv"])  # own head space / coupled with the embedding
def test_same_per_head_dims_in_every_head_are_exact_with_the_query_rescale(name, monkeypatch):
    model, inputs = build(name)
    fresh = build(name, seed=1)[1]
    with _mha_rule(attention_rules.multihead_attention_dims):
        pruned, plan = _check(model, inputs, fresh, fxprune.Policy(ratio=0.5))
        dims = next(g for g in plan.groups if any(p.target == "mha.in_proj_weight" for p in g.producers))
        assert (dims.size, dims.kept) == (4, 2)
        assert (pruned.mha.num_heads, pruned.mha.head_dim) == (4, 2)
        monkeypatch.setitem(slicers.FIXERS, nn.MultiheadAttention, _fixer_without_rescale)
        unscaled = fxprune.transform(model, fxprune.Policy(ratio=0.5), inputs)
    assert fxprune.verify(unscaled, inputs=fresh).max_error > 1e-6  # the 1/sqrt(d) scale matters


def test_used_attention_weights_block_the_heads():
    model, inputs = build("weights_used")
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5), inputs)
    group = next(g for g in plan.groups if any(p.target == "mha.in_proj_weight" for p in g.params))
    assert group.blocked and "attention weights" in next(iter(group.pinned.values()))


def test_tiny_vit_class_token_position_embedding_and_layer_norm():
    model, inputs = build("tiny_vit")
    fresh = build("tiny_vit", seed=1)[1]
    pruned, plan = _check(model, inputs, fresh, fxprune.Policy(ratio=0.5, exact_only=True))
    embedding = next(g for g in plan.groups if any(p.target == "class_token" for p in g.params))
    assert not embedding.exact and "LayerNorm" in next(iter(embedding.inexact.values()))
    roles = {p.target: p.role for p in embedding.params}
    assert roles["class_token"] == roles["pos_embedding"] == "passenger"
    assert sorted(g.size for g in plan.groups if g.removed) == [4, 4, 24, 24]  # heads and MLP of 2 blocks
    approx = fxprune.transform(model, fxprune.Policy(ratio=0.5), inputs)
    assert tuple(approx.class_token.shape) == (1, 1, 8) and tuple(approx.pos_embedding.shape) == (1, 5, 8)
    with torch.no_grad():
        assert approx(*fresh).shape == model(*fresh).shape


class _Layout(nn.Module):
    """roll and pad along non-channel dims, expand/unsqueeze/squeeze/movedim, matmul with a
    channel contraction between two tracked operands."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):                                   # x: (B, H, W, 4), channels last
        y = F.pad(torch.roll(self.a(x), (1, -1), (1, 2)), (0, 0, 1, 1))
        y = y.unsqueeze(1).squeeze(1).movedim(-1, 1).movedim(1, -1)
        z = self.b(x).mean((1, 2)).unsqueeze(1).expand(-1, 3, -1)   # (B, 3, 6)
        gram = y.flatten(1, 2) @ z.transpose(1, 2)          # contracts the 6 channels: (B, HW', 3)
        return self.c(y).flatten(1).sum(1) + gram.sum((1, 2))


def test_layout_ops_and_a_contraction_over_channels():
    torch.manual_seed(0)
    model = _Layout().double().eval()
    _, plan = _check(model, (torch.randn(2, 3, 3, 4, dtype=torch.float64),),
                     (torch.randn(2, 3, 3, 4, dtype=torch.float64),), fxprune.Policy(ratio=0.5))
    assert not plan.blocked_ops
    pruned = {frozenset(p.owner for p in g.producers): (g.size, g.kept) for g in plan.groups if g.removed}
    assert pruned == {frozenset({"a", "b"}): (6, 3), frozenset({"c"}): (3, 2)}  # a, b meet in the contraction


def test_roll_along_channels_is_blocked_with_the_reason():
    class Roll(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.roll(self.a(x), 1, -1))

    plan = fxprune.plan(Roll(), fxprune.Policy(ratio=0.5), (torch.randn(2, 3),))
    assert any("rolls along the channel dim" in why for _, why in plan.blocked_ops)
    assert not any(g.removed for g in plan.groups)


def _tiny_torchvision(name):
    torch.manual_seed(0)
    if name == "vit":
        model = vit.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8,
                                      mlp_dim=16, num_classes=3)
    elif name == "maxvit":
        model = maxvit.MaxVit((16, 16), 8, 2, [8, 16], [1, 1], 4, 0.0, num_classes=3)
    else:
        extra = dict(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2) if name == "swin_v2" else {}
        model = swin.SwinTransformer([2, 2], 8, [2, 2], [2, 4], [2, 2], stochastic_depth_prob=0.0, num_classes=3, **extra)
    with torch.no_grad():  # torchvision zero-initialises heads and tokens: the oracle would compare zeros
        for p in model.parameters():
            if p.dim() > 1 and not p.abs().max():
                p.normal_(0, 0.1)
    return model.double().eval(), (torch.randn(2, 3, 16, 16, dtype=torch.float64),)


@pytest.mark.parametrize("name", ["vit", "swin", "swin_v2", "maxvit"])
def test_torchvision_transformer_code_paths(name):
    model, inputs = _tiny_torchvision(name)
    fresh = (torch.randn_like(inputs[0]),)
    _, plan = _check(model, inputs, fresh, fxprune.Policy(ratio=0.5, exact_only=True))
    assert not plan.blocked_ops, plan.blocked_ops
    assert plan.exact and sum(1 for g in plan.groups if g.removed) >= 4
    approx = fxprune.transform(model, fxprune.Policy(ratio=0.5), inputs)
    assert all(g.removed for g in approx.meta["fxprune"].groups if not g.blocked)
    with torch.no_grad():
        assert approx(*fresh).shape == model(*fresh).shape
