"""The last blocked channels of some timm models, each as a small module copying timm's pattern:
a parameter cast before use (DeepSeek-ViT's RmsNormFp32, Qwen3-ViT's position table), Gemma 4's
per-head q/k norm before a 2-D RoPE and its one-hot position table, CoaT's Conv1d over stacked
class tokens, CSATv2's unbind of q/k/v scalars. Pruned in float64 with ``exact_only=True`` and held
to the mask oracle, through torch.fx and torch.export."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.blocked import blocked_summary
from oracle_helpers import prune_verified

CAPTURES = ["fx", "export"]
EXACT = dict(exact_only=True, max_error=1e-9, seed=0)  # float64, exact groups only, oracle within 1e-9


def removed(plan) -> list:
    return [(g.size, g.kept) for g in plan.groups if g.removed]


# -- a parameter cast before use: x.float(), x.to(dtype) ---------------------------------------
class RmsFp32(nn.Module):
    """timm's RmsNormFp32: ``F.rms_norm(x.float(), shape, self.weight.float()).to(x.dtype)``."""

    def __init__(self, n: int):
        super().__init__()
        self.normalized_shape = (n,)
        self.weight = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x):
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), 1e-6).to(x.dtype)


class ConvRms(nn.Module):
    """RmsNormFp32 over the length dim of (B, C, L): the channels C stay apart (exact)."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Conv1d(3, 8, 1), RmsFp32(5), nn.Conv1d(8, 2, 1)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


class TokenRms(nn.Module):
    """RmsNormFp32 over the hidden channels (DeepSeek-ViT's norm1): approximate, not blocked."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(4, 8), RmsFp32(8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


class CastPos(nn.Module):
    """Qwen3-ViT's ``x + pos_embed.to(x.dtype)`` and a layer scale cast with ``type_as``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 8))
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        y = self.a(x) + self.pos_embed.to(x.dtype)
        return self.b(torch.relu(y) * self.gamma.type_as(y))


@pytest.mark.parametrize("capture", CAPTURES)
def test_cast_weight_of_rms_norm_over_other_dims_is_exact(capture):
    plan, pruned = prune_verified(ConvRms(), (torch.randn(2, 3, 5),), capture, **EXACT)
    assert plan.blocked_ops == [] and removed(plan) == [(8, 4)]
    assert tuple(pruned.norm_weight.shape if hasattr(pruned, "norm_weight") else pruned.norm.weight.shape) == (5,)


@pytest.mark.parametrize("capture", CAPTURES)
def test_cast_weight_of_rms_norm_over_channels_is_a_passenger(capture):
    x = (torch.randn(2, 3, 4, dtype=torch.float64),)
    plan = fxprune.plan(TokenRms().double(), fxprune.Policy(ratio=0.5), x, capture=capture)
    assert plan.blocked_ops == []
    assert [(g.size, g.kept, g.exact) for g in plan.groups if g.removed] == [(8, 4, False)]
    pruned = fxprune.apply(plan)
    weight = dict(pruned.named_parameters())["norm.weight"]
    assert tuple(weight.shape) == (4,) and pruned(*x).shape == (2, 3, 2)
    exact = fxprune.plan(TokenRms().double(), fxprune.Policy(ratio=0.5, exact_only=True), x, capture=capture)
    assert exact.blocked_ops == [] and removed(exact) == []


@pytest.mark.parametrize("capture", CAPTURES)
def test_cast_parameter_tables_are_passengers(capture):
    plan, pruned = prune_verified(CastPos(), (torch.randn(2, 5, 4),), capture, **EXACT)
    assert plan.blocked_ops == [] and removed(plan) == [(8, 4)]
    params = dict(pruned.named_parameters())
    assert tuple(params["pos_embed"].shape) == (1, 5, 4) and tuple(params["gamma"].shape) == (4,)


# -- Gemma 4: per-head q/k norm, 2-D RoPE over split halves, one-hot position table -------------
def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_2d(x, cos, sin):
    """timm gemma4_vit.apply_multidimensional_rope with ndim=2, unsqueeze_dim=2."""
    half = 2 * (x.shape[-1] // 4)
    parts = torch.split(x, [half, half], dim=-1)
    cs, ss = torch.split(cos, [half, half], dim=-1), torch.split(sin, [half, half], dim=-1)
    out = [parts[k] * cs[k].unsqueeze(2) + rotate_half(parts[k]) * ss[k].unsqueeze(2) for k in range(2)]
    return torch.cat(out, dim=-1)


class GemmaAttention(nn.Module):
    """Gemma4Attention: q/k/v views, F.rms_norm over head_dim, 2-D RoPE, SDPA with scale=1."""

    def __init__(self, dim=16, heads=4, head_dim=8, grid=3, table=4):
        super().__init__()
        self.heads, self.head_dim, self.grid = heads, head_dim, grid
        self.inp = nn.Linear(dim, dim)
        self.q, self.k, self.v = (nn.Linear(dim, heads * head_dim, bias=False) for _ in range(3))
        self.o = nn.Linear(heads * head_dim, dim, bias=False)
        self.q_norm, self.k_norm = nn.Parameter(torch.rand(head_dim) + .5), nn.Parameter(torch.rand(head_dim) + .5)
        self.pos_table = nn.Parameter(torch.randn(2, table, dim))
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(0, head_dim // 2, 2).double() / (head_dim // 2)))

    def rope(self, pos):  # pos: (N, 2) -> cos, sin of shape (1, N, head_dim)
        freqs = [pos[:, i:i + 1].double() * self.inv_freq[None, :] for i in range(2)]
        emb = [torch.cat((f, f), dim=-1) for f in freqs]
        return torch.cat([e.cos() for e in emb], -1)[None], torch.cat([e.sin() for e in emb], -1)[None]

    def forward(self, x):
        B, N, C = x.shape
        pos = torch.stack(torch.meshgrid(torch.arange(self.grid), torch.arange(self.grid), indexing="ij"), -1)
        pos = pos.reshape(N, 2)
        one_hot = F.one_hot(pos, num_classes=self.pos_table.shape[1]).permute(1, 0, 2).to(self.pos_table)
        x = self.inp(x) + (one_hot @ self.pos_table).sum(dim=0)
        q = F.rms_norm(self.q(x).view(B, N, self.heads, self.head_dim), [self.head_dim], self.q_norm, 1e-6)
        k = F.rms_norm(self.k(x).view(B, N, self.heads, self.head_dim), [self.head_dim], self.k_norm, 1e-6)
        v = F.rms_norm(self.v(x).view(B, N, self.heads, self.head_dim), [self.head_dim], None, 1e-6)
        cos, sin = self.rope(pos)
        q, k = rope_2d(q, cos, sin).transpose(1, 2), rope_2d(k, cos, sin).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), scale=1.0)
        return self.o(a.transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("capture", CAPTURES)
def test_gemma_heads_through_head_norm_and_2d_rope(capture):
    plan, pruned = prune_verified(GemmaAttention(), (torch.randn(2, 9, 16),), capture, **EXACT)
    assert blocked_summary(plan).blocked == 0
    assert (4, 2) in removed(plan)  # whole heads
    params = dict(pruned.named_parameters())
    assert params["q.weight"].shape[0] == 2 * 8 and tuple(params["q_norm"].shape) == (8,)  # 2 heads of 8


@pytest.mark.parametrize("capture", CAPTURES)
def test_one_hot_position_table_is_a_passenger(capture):
    x = (torch.randn(2, 9, 16, dtype=torch.float64),)
    plan = fxprune.plan(GemmaAttention().double(), fxprune.Policy(ratio=0.5), x, capture=capture)
    hidden = [g for g in plan.groups if g.size == 16 and g.removed]
    assert hidden and not any("different dims" in why for _, why in plan.blocked_ops)
    pruned = fxprune.apply(plan)
    assert tuple(dict(pruned.named_parameters())["pos_table"].shape) == (2, 4, 16 - len(hidden[0].removed))
    check = fxprune.verify(pruned, inputs=x)
    assert check.compared and check.ok, check


class OneHotTable(nn.Module):
    """``one_hot(index) @ table`` added to the hidden channels, which stay exact (no norm)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.table = nn.Parameter(torch.randn(2, 6, 8))

    def forward(self, x, idx):
        oh = F.one_hot(idx, 6).permute(1, 0, 2).to(self.table)  # (2, N, 6)
        return self.b(torch.relu(self.a(x) + (oh @ self.table).sum(0)))


@pytest.mark.parametrize("capture", CAPTURES)
def test_one_hot_matmul_table_exact(capture):
    idx = torch.randint(0, 6, (5, 2))
    plan, pruned = prune_verified(OneHotTable(), (torch.randn(3, 5, 4), idx), capture, **EXACT)
    assert removed(plan) == [(8, 4)]
    assert tuple(dict(pruned.named_parameters())["table"].shape) == (2, 6, 4)


def test_timm_gemma4_vit_tiny_has_nothing_blocked():
    timm_gemma = pytest.importorskip("timm.models.gemma4_vit")
    m = timm_gemma.Gemma4VitClassifier(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, head_dim=16,
                                       intermediate_size=64, position_embedding_size=16, num_classes=5,
                                       use_clipped_linears=True)
    plan, _ = prune_verified(m, (torch.rand(1, 3, 32, 32),), "export", **EXACT)
    assert blocked_summary(plan).blocked == 0 and (2, 1) in removed(plan)


# -- CoaT: Conv1d mixing the class tokens of three scales, hidden channels as its length --------
class Aggregate(nn.Module):
    def __init__(self, kernel=1, padding=0):
        super().__init__()
        self.scales = nn.ModuleList(nn.Linear(4, 8) for _ in range(3))
        self.aggregate = nn.Conv1d(3, 1, kernel, padding=padding)
        self.head = nn.Linear(8, 2)

    def forward(self, x):  # x: (B, N, 4)
        t = torch.cat([s(x)[:, 1:].mean(dim=1, keepdim=True) for s in self.scales], dim=1)  # (B, 3, 8)
        return self.head(self.aggregate(t).squeeze(dim=1))


@pytest.mark.parametrize("capture", CAPTURES)
def test_pointwise_conv_along_the_channels_passes_them(capture):
    plan, pruned = prune_verified(Aggregate(), (torch.randn(2, 5, 4),), capture, **EXACT)
    assert plan.blocked_ops == [] and removed(plan) == [(8, 4)]
    assert tuple(dict(pruned.named_parameters())["aggregate.weight"].shape) == (1, 3, 1)


@pytest.mark.parametrize("capture", CAPTURES)
def test_conv_with_a_kernel_along_the_channels_blocks(capture):
    x = (torch.randn(2, 5, 4),)
    plan = fxprune.plan(Aggregate(kernel=3, padding=1), fxprune.Policy(ratio=0.5), x, capture=capture)
    reasons = [why for _, why in plan.blocked_ops]
    assert any("convolves along the dim that carries channels" in why and "kernel 3" in why for why in reasons)
    assert removed(plan) == []


# -- CSATv2: q, k, v = qkv.unbind(-1) of a 3-channel projection ---------------------------------
class ScalarQKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.qkv, self.b = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 2)

    def forward(self, x):  # (B, N, 4)
        y = torch.relu(self.a(x))
        q, k, v = self.qkv(y).unbind(-1)
        attn = (q.unsqueeze(-1) @ k.unsqueeze(-2)).softmax(-1)
        return self.b(y * (attn @ v.unsqueeze(-1)))


@pytest.mark.parametrize("capture", CAPTURES)
def test_unbind_of_the_channel_dim_pins_each_channel_with_its_reason(capture):
    plan, _ = prune_verified(ScalarQKV(), (torch.randn(2, 5, 4),), capture, **EXACT)
    reasons = [why for _, why in plan.blocked_ops]
    assert any("splits the channel dim into its 3 channels" in why for why in reasons), reasons
    assert removed(plan) == [(8, 4)]  # the hidden channels stay prunable
    qkv = [g for g in plan.groups if g.size == 3]
    assert qkv and all(len(g.pinned) == 3 for g in qkv)
