"""Layers whose weight or bias is computed from parameters (coupling/param_expr.py, param_use.py):
BEiT/EVA/Swin v2's ``torch.cat((q_bias, k_bias, v_bias))`` bias, a convolution's concatenated bias,
a transposed convolution's scaled weight, and weights that mix rows (blocked, with the node named).
Every pruned model is held to the mask oracle in float64 with ``exact_only=True``."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from oracle_helpers import prune_verified

CAPTURES = ["fx", "export"]


def _exact(model: nn.Module, inputs: tuple, capture: str) -> tuple:
    """``prune_verified`` at ``Policy(ratio=0.5, exact_only=True)`` with the oracle within 1e-9;
    also asserts that something was removed."""
    plan, pruned = prune_verified(model, inputs, capture, exact_only=True, max_error=1e-9, seed=0)
    assert any(g.removed for g in plan.groups)
    return plan, pruned


def _shapes(pruned: nn.Module) -> dict:
    return {n: tuple(t.shape) for n, t in pruned.state_dict(keep_vars=True).items()}


def _linear_reasons(plan) -> list[str]:
    return [why for node, why in plan.blocked_ops if "linear" in why]


class QKVBias(nn.Module):
    """BEiT's attention input: ``F.linear(x, qkv.weight, cat((q_bias, <zeros>, v_bias)))``, the
    zeros a buffer (timm today), ``zeros_like(v_bias)`` (older timm), ``torch.zeros(C)`` or
    ``q_bias.new_zeros(C)``, or added after the linear (``separate``); heads and an output
    projection after it."""

    def __init__(self, zeros: str, dim: int = 8, heads: int = 2):
        super().__init__()
        self.zeros, self.heads = zeros, heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.proj = nn.Linear(dim, dim)

    def _k(self):
        if self.zeros == "buffer":
            return self.k_bias
        if self.zeros == "zeros_like":
            return torch.zeros_like(self.v_bias)
        if self.zeros == "new_zeros":
            return self.q_bias.new_zeros(8)
        return torch.zeros(8, dtype=self.q_bias.dtype)

    def forward(self, x):
        b, n, c = x.shape
        if self.zeros == "separate":  # timm's qkv_bias_separate=True: the bias added in place
            qkv = self.qkv(x)
            qkv += torch.cat((self.q_bias, self.k_bias, self.v_bias))
        else:
            qkv = F.linear(x, weight=self.qkv.weight, bias=torch.cat((self.q_bias, self._k(), self.v_bias)))
        q, k, v = qkv.reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("zeros", ["buffer", "zeros_like", "zeros", "new_zeros", "separate"])
def test_qkv_bias_concatenated_with_zeros_slices_each_segment(zeros, capture):
    plan, pruned = _exact(QKVBias(zeros), (torch.randn(2, 5, 8),), capture)
    assert not plan.blocked_ops
    shapes = _shapes(pruned)
    q, v = shapes["q_bias"][0], shapes["v_bias"][0]
    assert q < 8 and shapes["qkv.weight"][0] == 3 * q and v == q  # q, k, v heads go together
    assert shapes["proj.weight"] == (8, v)


class CatBiasConv(nn.Module):
    """A convolution whose bias is a learned half and a constant zero half, a depthwise one with a
    zeros_like bias, then a 1x1 convolution."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.lead = nn.Parameter(torch.randn(4))
        self.dw = nn.Parameter(torch.randn(8, 1, 3, 3))
        self.dw_bias = nn.Parameter(torch.randn(4))
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = F.relu(F.conv2d(x, self.weight, torch.cat((self.lead, torch.zeros(4, dtype=x.dtype))), padding=1))
        h = F.conv2d(h, self.dw, torch.cat([torch.zeros_like(self.dw_bias), self.dw_bias]), padding=1, groups=8)
        return self.out(F.relu(h))


@pytest.mark.parametrize("capture", CAPTURES)
def test_conv_bias_concatenated_from_a_parameter_and_zeros(capture):
    plan, pruned = _exact(CatBiasConv(), (torch.randn(1, 3, 6, 6),), capture)
    shapes = _shapes(pruned)
    kept = shapes["weight"][0]
    assert kept < 8 and shapes["dw"][0] == kept and shapes["out.weight"] == (2, kept, 1, 1)
    assert shapes["lead"][0] <= 4 and shapes["dw_bias"][0] <= 4


class ScaledTransposed(nn.Module):
    """``F.conv_transpose2d`` with weight ``v * g`` (``g`` one factor per input channel: the rows)
    and a bias concatenated from a parameter and zeros (one per output channel)."""

    def __init__(self, mixed: bool = False):
        super().__init__()
        self.mixed = mixed
        self.inp = nn.Conv2d(3, 6, 1)
        self.v = nn.Parameter(torch.randn(6, 4, 2, 2))
        self.g = nn.Parameter(torch.rand(6, 1, 1, 1) + 0.5)
        self.b = nn.Parameter(torch.randn(2))
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        w = self.v * self.g
        if self.mixed:  # each input channel's row divided by its norm over the output channels
            w = w * (self.v * self.v).sum(dim=(1, 2, 3), keepdim=True).rsqrt()
        bias = torch.cat((torch.zeros(2, dtype=x.dtype), self.b))
        h = F.conv_transpose2d(F.relu(self.inp(x)), w, bias, stride=2)
        return self.out(F.relu(h))


@pytest.mark.parametrize("capture", CAPTURES)
def test_transposed_conv_weight_scaled_per_input_channel(capture):
    plan, pruned = _exact(ScaledTransposed(), (torch.randn(1, 3, 4, 4),), capture)
    shapes = _shapes(pruned)
    assert shapes["v"][0] == shapes["g"][0] == shapes["inp.weight"][0] < 6  # rows: input channels
    assert shapes["v"][1] == shapes["out.weight"][1] < 4 and shapes["b"][0] <= 2  # entries: outputs


@pytest.mark.parametrize("capture", CAPTURES)
def test_transposed_conv_weight_normed_over_its_outputs_is_approximate_there(capture):
    plan, pruned = _exact(ScaledTransposed(mixed=True), (torch.randn(1, 3, 4, 4),), capture)
    shapes = _shapes(pruned)
    assert shapes["v"][0] < 6 and shapes["v"][1] == 4  # the outputs are mixed by the norm: kept
    inexact = [g for g in plan.groups if not g.exact]
    assert inexact and any("reduces each weight row" in " ".join(g.inexact.values()) for g in inexact)


class ScaledLinear(nn.Module):
    """``F.linear`` with weight ``w * g`` (``g`` one factor per output row), bias ``b * s``."""

    def __init__(self):
        super().__init__()
        self.w, self.g = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.rand(6, 1) + 0.5)
        self.b, self.s = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(()))
        self.inp, self.out = nn.Linear(3, 4), nn.Linear(6, 2)

    def forward(self, x):
        return self.out(F.relu(F.linear(F.relu(self.inp(x)), self.w * self.g, self.b * self.s)))


@pytest.mark.parametrize("capture", CAPTURES)
def test_linear_weight_scaled_per_row(capture):
    plan, pruned = _exact(ScaledLinear(), (torch.randn(2, 3),), capture)
    shapes = _shapes(pruned)
    assert shapes["w"] == (shapes["g"][0], shapes["inp.weight"][0]) and shapes["w"][0] < 6
    assert shapes["b"] == (shapes["w"][0],) and shapes["s"] == ()


class StackedQKV(nn.Module):
    """``F.linear`` on ``cat((wq, wk, wv))`` with ``cat((bq, zeros, bv))``: the weight's rows laid
    end to end from three parameters, each consuming the input channels."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(3, 6), nn.Linear(12, 2)
        self.wq, self.wk, self.wv = (nn.Parameter(torch.randn(n, 6)) for n in (4, 4, 4))
        self.bq, self.bv = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))

    def forward(self, x):
        w = torch.cat((self.wq, self.wk, self.wv))
        b = torch.cat((self.bq, torch.zeros(4, dtype=x.dtype), self.bv))
        return self.out(F.relu(F.linear(F.relu(self.inp(x)), w, b)))


@pytest.mark.parametrize("capture", CAPTURES)
def test_linear_weight_concatenated_from_several_parameters(capture):
    plan, pruned = _exact(StackedQKV(), (torch.randn(2, 3),), capture)
    assert not plan.blocked_ops
    shapes = _shapes(pruned)
    inner = shapes["inp.weight"][0]
    assert inner < 6 and all(shapes[w][1] == inner for w in ("wq", "wk", "wv"))
    assert shapes["wq"][0] + shapes["wk"][0] + shapes["wv"][0] == shapes["out.weight"][1] < 12
    assert shapes["bq"][0] == shapes["wq"][0] and shapes["bv"][0] == shapes["wv"][0]


class Mixing(nn.Module):
    """Weights that are no row-wise chain: each output row mixes rows or columns of a parameter,
    or the computed bias is read by something else too."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.w, self.b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(2))
        self.inp, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.inp(x))
        if self.how == "gram":
            h = F.linear(h, torch.matmul(self.w, self.w))
        elif self.how == "transpose":
            h = F.linear(h, self.w.transpose(0, 1))
        elif self.how == "input":  # scaled by a value of the input: no parameter expression
            h = F.linear(h, self.w * h.mean())
        else:
            bias = torch.cat((self.b, torch.zeros(2, dtype=x.dtype)))
            h = F.linear(h, self.w, bias) + bias.sum()
        return self.out(F.relu(h))


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("how, why", [("gram", "matmul"), ("transpose", "transpose"),
                                      ("read_elsewhere", "also read by"), ("input", "model input")])
def test_a_weight_mixing_rows_blocks_naming_the_node(how, why, capture):
    model = Mixing(how).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    plan = fxprune.plan(model, fxprune.Policy("l1", 0.5, exact_only=True), (x,), capture=capture)
    reasons = _linear_reasons(plan)
    assert len(reasons) == 1 and why in reasons[0] and "at node" in reasons[0], reasons
    assert not any(g.removed for g in plan.groups if any(p.target in ("w", "inp.weight") for p in g.params))
    check = fxprune.verify(fxprune.apply(plan), inputs=(x,))
    assert check.ok, check


@pytest.mark.parametrize("capture", CAPTURES)
def test_timm_beit_attention_prunes_its_heads(capture):
    timm = pytest.importorskip("timm")
    from timm.models.beit import Beit
    torch.manual_seed(0)
    model = Beit(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    with torch.no_grad():  # timm starts them at zero: learned biases make the check meaningful
        for name, p in model.named_parameters():
            if name.endswith(("q_bias", "v_bias")):
                p.normal_()
    plan, pruned = _exact(model, (torch.randn(2, 3, 32, 32),), capture)
    assert not _linear_reasons(plan) and timm is not None
    shapes = _shapes(pruned)
    q = shapes["blocks.0.attn.q_bias"][0]
    assert q < 64 and shapes["blocks.0.attn.qkv.weight"][0] == 3 * q == 3 * shapes["blocks.0.attn.v_bias"][0]


class CosineHeads(nn.Module):
    """Swin v2's cosine attention: the qkv bias by cat, scores scaled per head by
    ``clamp(logit_scale, max=...).exp()`` (a (heads, 1, 1) vector computed from a parameter)."""

    def __init__(self, dim: int = 8, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.logit_scale = nn.Parameter(torch.rand(heads, 1, 1) + 1)

    def forward(self, x):
        b, n, c = x.shape
        qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = (attn * torch.clamp(self.logit_scale, max=4.6).exp()).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("capture", CAPTURES)
def test_scores_scaled_per_head_by_a_computed_vector(capture):
    plan, pruned = _exact(CosineHeads(), (torch.randn(2, 5, 8),), capture)
    assert not plan.blocked_ops
    shapes = _shapes(pruned)
    assert shapes["logit_scale"][0] < 4 and shapes["q_bias"][0] == 2 * shapes["logit_scale"][0]


@pytest.mark.parametrize("how", ["read_elsewhere", "only_here"])
def test_a_computed_vector_on_another_dim_keeps_its_shape(how):
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.s, self.out = nn.Linear(3, 4), nn.Parameter(torch.rand(5, 1) + 1), nn.Linear(4, 2)

        def forward(self, x):  # x: (5, 3); s scales the 5 rows (tokens), not the 4 channels
            h = F.relu(self.inp(x)) * self.s.exp()
            return self.out(h) + (self.s.exp().sum() if how == "read_elsewhere" else 0)

    plan, pruned = _exact(Scale(), (torch.randn(5, 3),), "fx")
    assert _shapes(pruned)["s"] == (5, 1) and _shapes(pruned)["inp.weight"][0] < 4


def test_timm_swinv2_heads_and_qkv_bias():
    pytest.importorskip("timm")
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    torch.manual_seed(0)
    model = SwinTransformerV2(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1),
                              num_heads=(2, 4), num_classes=5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_bias", "v_bias")):
                p.normal_()
    plan, pruned = _exact(model, (torch.randn(1, 3, 32, 32),), "fx")
    assert not plan.blocked_ops
    assert _shapes(pruned)["layers.1.blocks.0.attn.logit_scale"][0] < 4
