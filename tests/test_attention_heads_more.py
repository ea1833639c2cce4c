"""Attention heads that meet constant tensors and fx-wrapped functions, against the mask oracle
(float64): creation ops sized by the head count (T5's cross-attention ``position_bias``) and
torchvision's Swin (v1, v2) heads pruned apart from the hidden stream."""
import copy

import pytest
import torch
import torch.nn as nn
from torchvision.models import swin_transformer as swin

import fxprune
from fxprune import model_zoo


def _exact(model, inputs, policy=None, capture="auto"):
    """Transform in float64 with exact groups only; the oracle must hold within 1e-9."""
    m64 = copy.deepcopy(model).double().eval()
    x64 = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    pruned = fxprune.transform(m64, policy or fxprune.Policy(ratio=0.5, exact_only=True), x64, capture=capture)
    result = fxprune.verify(pruned, inputs=x64)
    assert result.ok and result.exact and result.compared >= 1, result
    return pruned, pruned.meta["fxprune"]


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


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_creation_op_sized_by_heads_loses_the_removed_heads(name, capture):
    torch.manual_seed(0)
    pruned, plan = _exact(_Bias(MAKERS[name]), (torch.randn(2, 5, 8),), capture=capture)
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
    pruned, plan = _exact(model, inputs, capture="export")
    cross = [g for g in plan.groups if g.kind == "head"
             and any("EncDecAttention" in p.target for p in g.params)]
    assert cross and all(g.removed and not g.blocked for g in cross), [(g.size, g.kept) for g in cross]
    widths = {n: m.out_features for n, m in pruned.named_modules() if n.endswith("EncDecAttention.q")}
    assert widths and all(w == 32 for w in widths.values()), widths  # 4 heads of 16 -> 2
