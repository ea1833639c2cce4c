"""Contractions whose operands carry channels on two different indices.

The scores ``q @ k.T`` of single-head attention sum over head_dim and carry only a pinned
placeholder (on the heads dim); ``scores @ v`` then tracks v's head_dim, which passes to the
output (MViTv2's first stage). Channels on two indices kept in the output (EfficientViM's
``x @ (a * b).T``: embedding rows, state columns) cannot both be tracked: one set stays whole,
with a reason naming both indices, unless the result's one user is a contraction that settles
the second set. Linear attention (EfficientViT's ``q @ (k.T @ v)``) is that case: k's channels
are summed with q's there (coupled: a removed pair drops out of the sum) and v's become the
result's channel dim.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune

from oracle_helpers import blocked_reasons, prune_verified


class OneHead(nn.Module):
    """MViTv2's attention with one head: a ``(B, N, 3, 1, hd)`` view, optional per-head-dim norms
    on q, k, v (LayerNorm statistics make those channels approximate)."""

    def __init__(self, dim: int = 8, norms: bool = False) -> None:
        super().__init__()
        self.norms = norms
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_k, self.norm_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.scale = dim ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 1, c).permute(2, 0, 3, 1, 4).unbind(0)
        if self.norms:
            q, k, v = self.norm_q(q), self.norm_k(k), self.norm_v(v)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class StateMix(nn.Module):
    """EfficientViM's hidden state ``h = x @ (a * b).T``: rows carry x's channels, columns b's."""

    def __init__(self, dim: int = 8, state: int = 6) -> None:
        super().__init__()
        self.inp, self.bproj, self.out = nn.Conv1d(dim, dim, 1), nn.Conv1d(dim, state, 1), nn.Linear(state, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x) @ self.bproj(x).softmax(-1).transpose(-2, -1)
        return self.out(h)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_one_head_attention_prunes_head_dim_exactly(capture: str) -> None:
    plan, pruned = prune_verified(OneHead(), (torch.randn(2, 5, 8),), capture)
    assert not [r for r in blocked_reasons(plan) if "index" in r]
    assert pruned.qkv.out_features < 24 and pruned.proj.in_features < 8
    head_dim = [g for g in plan.groups if g.removed and any(m.target == "qkv.weight" for m in g.params)]
    assert head_dim and all(g.exact for g in head_dim)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_one_head_attention_with_norms_is_unblocked_but_approximate(capture: str) -> None:
    model, x = OneHead(norms=True).double(), torch.randn(2, 5, 8, dtype=torch.float64)
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5), (x,), capture=capture)
    assert not [r for r in blocked_reasons(plan) if "index" in r]
    head_dim = [g for g in plan.groups if any(m.target == "qkv.weight" for m in g.params) and g.size == 8]
    assert head_dim and not any(g.exact for g in head_dim)
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5, exact_only=True), (x,), capture=capture)
    check = fxprune.verify(pruned, inputs=(x,))
    assert check.ok and check.compared and check.max_error < 1e-9


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_channels_on_two_output_indices_keep_one_set_whole(capture: str) -> None:
    model = StateMix()
    plan, pruned = prune_verified(model, (torch.randn(2, 8, 7),), capture)
    pinned = [why for why in plan.analysis.units.pins.values() if "two dims" in why]
    assert pinned and all("index 'j', kept in the output" in why and "index 'i'" in why for why in pinned)
    assert pruned.bproj.out_channels == 6 and pruned.out.in_features == 6  # the state columns stay


class LinearAttention(nn.Module):
    """EfficientViT's ReLU linear attention: ``q @ (k.T @ v)`` over heads, v padded with a ones
    column whose sum normalises the result."""

    def __init__(self, dim: int = 16, heads: int = 2, head_dim: int = 8, scale_after_kv: bool = False) -> None:
        super().__init__()
        self.head_dim, self.scale_after_kv = head_dim, scale_after_kv
        self.qkv = nn.Conv2d(dim, 3 * heads * head_dim, 1)
        self.proj = nn.Conv2d(heads * head_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        qkv = self.qkv(x).reshape(b, -1, 3 * self.head_dim, h * w).transpose(-1, -2)
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = torch.relu(q), torch.relu(k)
        v = F.pad(v, (0, 1), mode="constant", value=1.0)
        kv = k.transpose(-1, -2) @ v
        if self.scale_after_kv:  # not a contraction: k's and v's channels cannot both stay tracked
            kv = kv * 0.5
        out = q @ kv
        out = out[..., :-1] / (out[..., -1:] + 1e-5)
        return self.proj(out.transpose(-1, -2).reshape(b, -1, h, w))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_linear_attention_prunes_query_key_pairs_and_values_exactly(capture: str) -> None:
    torch.manual_seed(0)
    plan, pruned = prune_verified(LinearAttention(), (torch.randn(2, 16, 5, 5),), capture,
                                  exact_only=True, max_error=1e-12)
    assert not [why for why in plan.analysis.units.pins.values() if "two dims" in why]
    assert not plan.analysis.deferred  # every second channel dim was settled
    assert pruned.proj.in_channels < 16  # v's channels (the values each head returns) were pruned
    assert pruned.qkv.out_channels < 48
    (kv,) = [n for n in pruned.graph.nodes if n.name in plan.analysis.second_dims]
    rows, columns = kv.meta["fxprune"]["shape"][-2:]
    assert rows < 8 and columns < 9  # k's kept channels by v's kept ones and the ones column


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_second_channel_dim_read_by_another_op_first_stays_whole(capture: str) -> None:
    torch.manual_seed(0)
    model = LinearAttention(scale_after_kv=True)
    plan, pruned = prune_verified(model, (torch.randn(2, 16, 5, 5),), capture, max_error=1e-12)
    pinned = [why for why in plan.analysis.units.pins.values() if "two dims" in why]
    assert pinned and not plan.analysis.deferred and not plan.analysis.second_dims
    assert pruned.proj.in_channels == 16  # v's channels stay whole, with the reason


def test_timm_lite_mla_is_unblocked() -> None:
    """timm's LiteMLA (EfficientViT) with its multi-scale aggregation; its attention runs in
    float32 by design (``.float()``), so the float64 oracle holds to float32 rounding."""
    pytest.importorskip("timm")
    from timm.models.efficientvit_mit import LiteMLA
    torch.manual_seed(0)
    model, x = LiteMLA(32, 32, dim=8, scales=(5,)).double().eval(), torch.randn(2, 32, 7, 7, dtype=torch.float64)
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5, exact_only=True), (x,))
    pruned = fxprune.apply(plan)
    check = fxprune.verify(pruned, inputs=(x,), tolerance=1e-6)
    assert check.ok and check.compared and check.exact
    assert not [why for why in plan.analysis.units.pins.values() if "two dims" in why]
    assert pruned.proj.conv.in_channels < model.proj.conv.in_channels  # v was pruned


class StateTimesWeight(nn.Module):
    """``(k.T @ v) @ w``: the next contraction sums v's channels with a parameter's rows, which
    carry no tracked channels, so v's channels stay whole; k's pass to the output."""

    def __init__(self) -> None:
        super().__init__()
        self.k, self.v = nn.Linear(8, 6), nn.Linear(8, 5)
        self.w = nn.Parameter(torch.randn(5, 3))
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.k(x).transpose(-1, -2) @ self.v(x)) @ self.w).sum(1)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_second_channel_dim_summed_with_a_parameter_stays_whole(capture: str) -> None:
    torch.manual_seed(0)
    plan, pruned = prune_verified(StateTimesWeight(), (torch.randn(2, 7, 8),), capture, max_error=1e-12)
    assert pruned.v.out_features == 5 and pruned.k.out_features == 3
    assert not plan.analysis.deferred
    assert any("index 'k', summed over" in why for why in plan.analysis.units.pins.values())
