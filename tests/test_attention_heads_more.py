"""Attention heads that meet constant tensors and fx-wrapped functions, against the mask oracle
(float64): creation ops sized by the head count (T5's cross-attention ``position_bias``) and
torchvision's Swin (v1, v2) heads pruned apart from the hidden stream."""
import copy

import pytest
import torch
import torch.nn as nn
from torchvision.models import maxvit, swin_transformer as swin

import fxprune
from fxprune import model_zoo
from oracle_helpers import prune_verified


class _Bias(nn.Module):
    """Two-head attention whose scores get a constant per-head bias made by a creation op."""

    def __init__(self, make):
        super().__init__()
        self.make = make
        self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x):
        t = self.qkv(x).chunk(3, -1)
        q, k, v = [t[i].reshape(2, 5, 2, 4).transpose(1, 2) for i in range(3)]
        scores = q @ k.transpose(-2, -1)
        scores = scores + self.make(scores)
        a = scores.softmax(-1) @ v
        return self.out(a.transpose(1, 2).reshape(2, 5, 8))


MAKERS = {
    "zeros": lambda s: torch.zeros((1, 2, 5, 5), dtype=s.dtype),
    "ones_ints": lambda s: torch.ones(1, 2, 1, 1, dtype=s.dtype),
    "full": lambda s: torch.full((1, 2, 5, 1), 0.5, dtype=s.dtype),
    "new_zeros": lambda s: s.new_zeros((1, 2, 5, 5)),
    "new_ones_kw": lambda s: s.new_ones(size=(2, 1, 5)),
}


@pytest.mark.parametrize("name,capture", [(n, "fx") for n in sorted(MAKERS)] + [("zeros", "export"), ("new_zeros", "export")])
def test_creation_op_sized_by_heads_loses_the_removed_heads(name, capture):
    torch.manual_seed(0)
    plan, pruned = prune_verified(_Bias(MAKERS[name]), (torch.randn(2, 5, 8),), capture, exact_only=True)
    heads = [g for g in plan.groups if g.kind == "head"]
    assert len(heads) == 1 and heads[0].size == 2 and heads[0].kept == 1, [(g.size, g.kind) for g in plan.groups]
    assert not plan.blocked_ops or all("creation" not in why for _, why in plan.blocked_ops)


def test_creation_op_without_a_channel_consumer_stays_whole():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):  # the constant meets the channels only after a sum over them
            return self.b(self.a(x)) + x.new_zeros((2, 2)).sum(-1, keepdim=True)

    plan = fxprune.plan(Net(), fxprune.Policy(ratio=0.5), (torch.randn(2, 3),))
    assert any(name.startswith("new_zeros") and "no consumer shows" in why for name, why in plan.blocked_ops)


def test_t5_cross_attention_heads_go_with_the_zeros_position_bias():
    pytest.importorskip("transformers")
    model, inputs = model_zoo.transformers_model("t5")  # torch.fx cannot trace T5: torch.export's graph
    plan, pruned = prune_verified(model, inputs, "export", exact_only=True)
    cross = [g for g in plan.groups if g.kind == "head"
             and any("EncDecAttention" in p.target for p in g.params)]
    assert cross and all(g.removed and not g.blocked for g in cross), [(g.size, g.kept) for g in cross]
    widths = {n: m.out_features for n, m in pruned.named_modules() if n.endswith("EncDecAttention.q")}
    assert widths and all(w == 32 for w in widths.values()), widths  # 4 heads of 16 -> 2


def _tiny_swin(v2: bool, depths=(2, 2)):
    """A torchvision Swin at 32x32: stage 1 shifts its windows, stage 2's window covers its map."""
    torch.manual_seed(0)
    extra = dict(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2) if v2 else {}
    model = swin.SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=list(depths), num_heads=[2, 4],
                                 window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=5, **extra)
    with torch.no_grad():  # torchvision zero-initialises some weights: the oracle would compare zeros
        for p in model.parameters():
            if p.dim() > 1 and not p.abs().max():
                p.normal_(0, 0.1)
    return model.eval(), (torch.randn(2, 3, 32, 32),)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_torchvision_swin_heads_go_apart_from_the_stream(v2):
    model, inputs = _tiny_swin(v2)
    plan, pruned = prune_verified(copy.deepcopy(model), inputs, exact_only=True)  # model: reused below
    assert not plan.blocked_ops, plan.blocked_ops
    assert "shifted_window_attention" not in pruned.code  # inlined with the kept head count
    for stage, heads in ((1, 2), (3, 4)):
        for block in (0, 1):
            attn = f"features.{stage}.{block}.attn"
            group = next(g for g in plan.groups if g.size == heads and any(p.target == f"{attn}.qkv.weight"
                                                                            and p.dim == 0 for p in g.params))
            assert group.kept == heads // 2 and group.exact
            targets = {(p.target, p.dim) for p in group.params}
            assert (f"{attn}.proj.weight", 1) in targets
            assert ((f"{attn}.cpb_mlp.2.weight", 0) if v2 else (f"{attn}.relative_position_bias_table", 1)) in targets
            if v2:
                assert (f"{attn}.logit_scale", 0) in targets
            qkv, proj = pruned.get_parameter(f"{attn}.qkv.weight"), pruned.get_parameter(f"{attn}.proj.weight")
            d = 24 * 2 ** (stage // 2) // heads
            assert qkv.shape[0] == 3 * d * heads // 2 and proj.shape[1] == d * heads // 2
            assert proj.shape[0] == qkv.shape[1]  # the stream keeps its own width, apart from the heads
    # other input sizes: padding and the dropped shift stay run-time values in the inlined ops
    m64, x = copy.deepcopy(model).double(), torch.randn(1, 3, 40, 56, dtype=torch.float64)
    result = fxprune.verify(pruned, inputs=(x,))
    assert result.ok and result.max_error <= 1e-9, result
    assert pruned(x).shape == m64(x).shape


def test_torchvision_maxvit_heads_are_their_own_groups_with_their_bias_column():
    torch.manual_seed(0)
    model = maxvit.MaxVit((16, 16), 8, 2, [8, 16], [1, 1], 4, 0.0, num_classes=3).eval()
    plan, pruned = prune_verified(model, (torch.randn(2, 3, 16, 16),), exact_only=True)
    heads = [g for g in plan.groups if g.kind == "head"]
    assert len(heads) == 4 and all(g.removed and g.exact for g in heads)  # window and grid attention, 2 stages
    for g in heads:
        targets = {(p.target, p.dim) for p in g.params}
        owner = next(t for t, d in targets if t.endswith("to_qkv.weight")).rsplit(".", 2)[0]
        assert {(f"{owner}.relative_position_bias_table", 1), (f"{owner}.merge.weight", 1)} <= targets
