"""timm patterns: gMLP's spatial gating (a Linear over tokens passes the channels through),
standardised convolution weights (NFNet's ScaledStdConv2d: a weight computed row by row), and
timm's layers kept whole with ``leaf_modules=[...]``; through torch.fx and torch.export, checked
by the mask oracle in float64."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from oracle_helpers import prune_verified

timm = pytest.importorskip("timm")
import timm.layers as tl  # noqa: E402

CAPTURES = ["fx", "export"]


def _owners(group):
    return {p.owner for p in group.producers}


def _group(plan, owner):
    return next(g for g in plan.groups if owner in _owners(g))


# -- gMLP spatial gating ----------------------------------------------------------------------
class Gating(nn.Module):
    """timm's SpatialGatingUnit inside a GatedMlp: ``proj`` maps tokens, channels are a batch dim."""

    def __init__(self, dim=8, hidden=12, tokens=5, norm=False, functional=False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden // 2, dim)
        self.norm = nn.LayerNorm(hidden // 2) if norm else nn.Identity()
        self.proj = nn.Linear(tokens, tokens)
        self.functional = functional

    def forward(self, x):
        u, v = F.gelu(self.fc1(x)).chunk(2, dim=-1)
        v = self.norm(v).transpose(-1, -2)
        v = F.linear(v, self.proj.weight, self.proj.bias) if self.functional else self.proj(v)
        return self.fc2(u * v.transpose(-1, -2))


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("functional", [False, True])
def test_linear_over_tokens_passes_channels_exactly(capture, functional):
    model = Gating(functional=functional)
    original = model.proj.weight.detach().double().clone()
    plan, pruned = prune_verified(model, (torch.randn(2, 5, 8),), capture, exact_only=True)
    g = _group(plan, "fc1")
    assert g.size == 6 and g.exact and not g.blocked and len(g.removed) == 3
    assert not any(p.target.startswith("proj") for grp in plan.groups for p in grp.params)
    weights = {n: t for n, t in pruned.named_parameters()}
    assert torch.equal(weights["proj.weight"], original)
    assert weights["fc1.weight"].shape == (6, 8) and weights["fc2.weight"].shape == (8, 3)


def test_addmm_over_a_batch_dim_passes_channels():
    class Rows(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv1d(3, 8, 1), nn.Conv1d(8, 2, 1)
            self.w, self.bias = nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(4))

        def forward(self, x):  # x: (1, 3, 5); addmm maps the 5 positions of each channel to 4
            return self.b(torch.addmm(self.bias, self.a(x).squeeze(0), self.w).unsqueeze(0))

    plan, pruned = prune_verified(Rows(), (torch.randn(1, 3, 5),), "fx", exact_only=True)
    assert len(_group(plan, "a").removed) == 4 and tuple(pruned.w.shape) == (5, 4)


def test_layer_norm_in_the_gate_is_approximate():
    plan = fxprune.plan(Gating(norm=True), fxprune.Policy(ratio=0.5), (torch.randn(2, 5, 8),))
    g = _group(plan, "fc1")
    assert not g.blocked and not g.exact
    assert "normalises over the channel dim" in " ".join(g.inexact.values())
    pruned = fxprune.apply(plan)
    assert pruned(torch.randn(2, 5, 8)).shape == (2, 5, 8)
    assert pruned.proj.weight.shape == (5, 5) and pruned.norm.normalized_shape == (3,)


def test_linear_on_a_model_input_still_makes_channels():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    plan, _ = prune_verified(model, (torch.randn(1, 5, 4),), "fx", exact_only=True)
    assert len(_group(plan, "0").removed) == 3


def test_a_linear_used_over_a_batch_dim_keeps_its_weight_everywhere():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.proj, self.out = nn.Linear(4, 6), nn.Linear(5, 5), nn.Linear(6, 3)
            self.out2 = nn.Linear(5, 2)

        def forward(self, x, t):
            y = self.proj(self.fc(x).transpose(1, 2)).transpose(1, 2)
            return self.out(y), self.out2(self.proj(t))  # the second call contracts t's last dim

    plan = fxprune.plan(Shared(), fxprune.Policy(ratio=0.5), (torch.randn(1, 5, 4), torch.randn(1, 3, 5)))
    assert _group(plan, "fc").removed
    g = _group(plan, "proj")
    assert g.blocked and "keeps its shape" in " ".join(g.pinned.values())


# -- standardised convolution weights (NFNet) --------------------------------------------------
class StdDepthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = tl.ScaledStdConv2d(3, 8, 3, padding=1)
        self.dw = tl.ScaledStdConv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(F.silu(self.dw(F.silu(self.stem(x)))))


class StdConsumers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = tl.StdConv2d(3, 8, 1), tl.ScaledStdConv2d(8, 8, 3, padding=1, groups=2)
        self.c = tl.ScaledStdConv2d(8, 4, 1)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


@pytest.mark.parametrize("capture", CAPTURES)
def test_standardised_weight_rows_are_output_channels(capture):
    plan, pruned = prune_verified(StdDepthwise(), (torch.randn(1, 3, 6, 6),), capture, exact_only=True)
    g = _group(plan, "stem.weight")
    assert g.exact and len(g.removed) == 4
    assert {p.target for p in g.params} >= {"stem.weight", "stem.gain", "stem.bias", "dw.weight", "dw.gain"}
    shapes = {n: tuple(t.shape) for n, t in pruned.named_parameters()}
    assert shapes["stem.weight"] == (4, 3, 3, 3) and shapes["stem.gain"] == (4, 1, 1, 1)
    assert shapes["dw.weight"] == (4, 1, 3, 3) and shapes["head.weight"] == (4, 4, 1, 1)
    assert not plan.blocked_ops


@pytest.mark.parametrize("capture", CAPTURES)
def test_channels_a_standardised_conv_consumes_are_approximate(capture):
    plan = fxprune.plan(StdConsumers(), fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 6, 6),), capture=capture)
    for owner in ("a.weight", "b.weight"):
        g = _group(plan, owner)
        assert not g.blocked and not g.exact and g.removed
        assert "standardises each weight row over its input channels" in " ".join(g.inexact.values())
    assert _group(plan, "b.weight").size == 4  # 2 blocks of 4 positions
    pruned = fxprune.apply(plan)
    assert pruned(torch.randn(1, 3, 6, 6)).shape == (1, 4, 6, 6)
    assert {n: tuple(t.shape) for n, t in pruned.named_parameters()}["b.weight"] == (4, 2, 3, 3)


class WSConv(nn.Conv2d):
    """Weight standardisation written with mean/std over each row (no reshape)."""

    def forward(self, x):
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        w = w / torch.sqrt(w.var(dim=[1, 2, 3], keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, padding=1)


@pytest.mark.parametrize("capture", CAPTURES)
def test_weight_standardised_by_reductions(capture):
    model = nn.Sequential(WSConv(3, 8, 3), nn.ReLU(), WSConv(8, 6, 3), nn.ReLU(), nn.Conv2d(6, 2, 1))
    plan, _ = prune_verified(model, (torch.randn(1, 3, 6, 6),), capture, exact_only=True)
    assert len(_group(plan, "2.weight").removed) == 3 and not _group(plan, "0.weight").exact


def test_weight_norm_through_export_slices_its_rows():
    from torch.nn.utils.parametrizations import weight_norm
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), weight_norm(nn.Conv2d(8, 6, 3)), nn.ReLU(),
                          nn.Conv2d(6, 2, 1))
    plan, _ = prune_verified(model, (torch.randn(1, 3, 6, 6),), "export", exact_only=True)
    g = _group(plan, "2.parametrizations.weight.original1")
    assert g.exact and len(g.removed) == 3 and "2.parametrizations.weight.original0" in {p.target for p in g.params}
    consumed = _group(plan, "0")  # the norm runs over these columns
    assert not consumed.exact and not consumed.removed and "by its norm" in " ".join(consumed.inexact.values())


def test_a_weight_chain_read_elsewhere_blocks_the_conv_precisely():
    class Leaky(tl.StdConv2d):
        def forward(self, x):
            w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                             momentum=0.0).reshape_as(self.weight)
            return F.conv2d(x, w, self.bias) + w.sum()

    model = nn.Sequential(Leaky(3, 8, 1), nn.Conv2d(8, 2, 1))
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 4, 4),))
    assert any(node == "conv2d" and "computed from one row by row" in why for node, why in plan.blocked_ops)
    assert not any(g.removed for g in plan.groups)


# -- timm layers kept whole -----------------------------------------------------------------------
LEAVES = [tl.Conv2dSame, tl.BatchNormAct2d, tl.BlurPool2d, tl.GroupNormAct, tl.LayerNorm2d, tl.LayerNorm,
          tl.EcaModule, tl.ScaledStdConv2d]


class TimmLayers(nn.Module):
    def __init__(self, eca=False):
        super().__init__()
        self.stem = tl.Conv2dSame(3, 8, 3, stride=2)
        self.bn = tl.BatchNormAct2d(8, act_layer=nn.SiLU)
        self.blur = tl.BlurPool2d(8, stride=1)
        self.pw = nn.Conv2d(8, 16, 1)
        self.gn = tl.GroupNormAct(16, num_groups=4, act_layer="gelu")  # timm's GELU
        self.std = tl.ScaledStdConv2d(16, 16, 3, padding=1, groups=16)  # depthwise: exact
        self.mix = nn.Conv2d(16, 8, 1)
        self.ln = tl.LayerNorm2d(8)
        self.eca = tl.EcaModule(8) if eca else nn.Identity()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.std(self.gn(self.pw(self.blur(self.bn(self.stem(x))))))
        return self.head(self.eca(self.ln(self.mix(x))))


def test_timm_leaves_prune_exactly_with_their_sizes_fixed():
    plan, pruned = prune_verified(TimmLayers(), (torch.randn(1, 3, 9, 9),), "fx", exact_only=True, leaf_modules=LEAVES)
    kinds = {type(m).__name__ for n, m in plan.traced.named_modules() if n}
    assert {"Conv2dSame", "BatchNormAct2d", "BlurPool2d", "GroupNormAct", "LayerNorm2d"} <= kinds
    stem, pw = _group(plan, "stem"), _group(plan, "pw")
    assert stem.exact and len(stem.removed) == 4 and pw.exact and pw.size == 4 and len(pw.removed) == 2
    assert not _group(plan, "mix").exact and not _group(plan, "mix").removed  # LayerNorm2d over its channels
    assert pruned.bn.num_features == 4 and pruned.blur.channels == 4 and pruned.blur.filt.shape[0] == 4
    assert (pruned.gn.num_groups, pruned.gn.num_channels) == (2, 8)
    assert (pruned.std.in_channels, pruned.std.groups, pruned.std.gain.shape[0]) == (8, 8, 8)
    assert pruned.pw.weight.shape == (8, 4, 1, 1) and pruned.stem.out_channels == 4


def test_timm_leaves_approximate_sizes_and_eca_blocks():
    model = TimmLayers(eca=True)
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 9, 9),), leaf_modules=LEAVES)
    assert any("eca (EcaModule)" in why and "conv1d across the channel dim" in why for _, why in plan.blocked_ops)
    assert _group(plan, "mix").blocked and not _group(plan, "pw").blocked
    pruned = fxprune.apply(plan)
    assert pruned(torch.randn(1, 3, 9, 9)).shape == (1, 4, 5, 5)
    norm = fxprune.plan(nn.Sequential(nn.Linear(4, 8), tl.LayerNorm(8), nn.Linear(8, 2)),
                        fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 4),), leaf_modules=[tl.LayerNorm])
    assert not _group(norm, "0").exact and getattr(fxprune.apply(norm), "1").normalized_shape == (4,)


def test_timm_layers_traced_through_by_export():
    plan, _ = prune_verified(TimmLayers(), (torch.randn(1, 3, 9, 9),), "export", exact_only=True)
    assert _group(plan, "stem.weight").removed and not plan.blocked_ops


# -- timm models ------------------------------------------------------------------------------------
def _blocked(plan):
    return [g for g in plan.groups if g.blocked and "model output" not in " ".join(g.pinned.values())]


@pytest.mark.parametrize("name, kwargs", [("gmlp_ti16_224", {"img_size": 64}),
                                          ("test_nfnet", {})])
def test_timm_models_have_no_blocked_channels(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(1, 3, 64, 64)
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5), (x,))
    assert not _blocked(plan) and sum(1 for g in plan.groups if g.removed) > 1
    assert fxprune.apply(plan)(x).shape == (1, 1000)
    if any(g.exact for g in plan.groups if g.removed):  # gMLP: every group passes a LayerNorm
        prune_verified(model, (x,), "fx", exact_only=True)
