"""Norms, sliding-window unfolds and ``*_as`` views against the mask oracle (float64, 1e-9), with
both front ends: vector/matrix norms over spatial dims (channels pass through) and over the
channel dim (exact for p >= 0, inexact for -inf and p < 0), ``F.unfold``/``nn.Unfold`` (stride
map), ``Tensor.unfold``, ``reshape_as``/``view_as``/``expand_as`` coupled with the other tensor,
ConvNeXt-V2's global response norm, and timm's convnextv2_atto and levit_128s."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.capture.aten_twins import twin_of
from fxprune.coupling import reduce_rules as RR
from fxprune.coupling.ops import FUNCTION_RULES, METHOD_RULES

CAPTURES = ["fx", "export"]
INF = float("inf")


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _prune(model, x, capture, ratio=0.5, exact_only=False):
    """Transform in float64, check the oracle on fresh inputs and the output shape."""
    torch.manual_seed(0)
    model = model.double().eval()
    pruned = fxprune.transform(model, fxprune.Policy(ratio=ratio, exact_only=exact_only), (x,), capture=capture)
    fresh = torch.randn_like(x)
    result = fxprune.verify(pruned, inputs=(fresh,))
    assert result.ok and result.max_error <= 1e-9, result
    with torch.no_grad():
        assert pruned(fresh).shape == model(fresh).shape
    return pruned, pruned.meta["fxprune"]


def _group_of(plan, target):
    """The group whose channels ``target`` produces (or carries, for a parameter of no layer)."""
    return next(g for g in plan.groups if any(p.target == target and p.role != "consumer" for p in g.params))


class SpatialNorm(nn.Module):
    """A norm over the spatial dims scales each channel (a GRN-like gate): channels pass through."""

    def __init__(self, norm):
        super().__init__()
        self.a, self.b, self.norm = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1), norm

    def forward(self, x):
        y = self.a(x)
        return self.b(y * self.norm(y))


SPATIAL = {
    "method-p2": lambda y: y.norm(p=2, dim=(2, 3), keepdim=True),
    "method-fro": lambda y: y.norm(dim=(2, 3), keepdim=True),
    "torch-p1": lambda y: torch.norm(y, p=1, dim=[2, 3], keepdim=True),
    "vector-inf": lambda y: torch.linalg.vector_norm(y, ord=INF, dim=(-2, -1), keepdim=True),
    "vector-nokeep": lambda y: torch.linalg.vector_norm(y, 3, (2, 3))[:, :, None, None],
    "linalg-dim": lambda y: torch.linalg.norm(y, dim=3, keepdim=True),
    "linalg-matrix": lambda y: torch.linalg.norm(y, dim=(2, 3))[..., None, None],
    "matrix-nuc": lambda y: torch.linalg.matrix_norm(y, ord="nuc", keepdim=True),
    "torch-nuc": lambda y: torch.norm(y, p="nuc", dim=(2, 3), keepdim=True),
}


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("form", sorted(SPATIAL))
def test_norm_over_spatial_dims_passes_channels_through(form, capture):
    _, plan = _prune(SpatialNorm(SPATIAL[form]), _x(1, 3, 4, 4), capture)
    group = _group_of(plan, "a.weight")
    assert group.exact and group.size == 8 and group.kept == 4
    assert not plan.blocked_ops


class ChannelNorm(nn.Module):
    """A norm over the channel dim: its output carries no channels."""

    def __init__(self, norm):
        super().__init__()
        self.a, self.b, self.norm = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1), norm

    def forward(self, x):
        y = self.a(x)
        return self.b(y) * self.norm(y)


def _vector_over_channels(p, keepdim):
    if keepdim:
        return lambda y: y.norm(p=p, dim=1, keepdim=True)
    return lambda y: torch.linalg.vector_norm(y, p, 1).unsqueeze(1)


# every order with the FX front end; the export one (aten.linalg_vector_norm) on a few
_OVER_CHANNELS = [(p, keep, "fx") for p in (2, 1, 3, 0, INF) for keep in (True, False)] + [
    (2, True, "export"), (0, False, "export"), (INF, True, "export")]


@pytest.mark.parametrize("p, keepdim, capture", _OVER_CHANNELS)
def test_norm_over_channels_is_exact_for_p_at_least_zero(p, keepdim, capture):
    _, plan = _prune(ChannelNorm(_vector_over_channels(p, keepdim)), _x(1, 3, 4, 4), capture)
    group = _group_of(plan, "a.weight")
    assert group.exact and group.kept == 4


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("p", [-INF, -1])
def test_norm_over_channels_takes_a_zero_for_negative_p(p, capture):
    model = ChannelNorm(_vector_over_channels(p, True)).double()
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5), (_x(1, 3, 4, 4),), capture=capture)
    group = _group_of(plan, "a.weight")
    assert not group.exact and "over the channel dim" in " ".join(group.inexact.values())
    exact = fxprune.plan(model, fxprune.Policy(ratio=0.5, exact_only=True), (_x(1, 3, 4, 4),), capture=capture)
    assert not _group_of(exact, "a.weight").removed


MATRIX = {  # ord -> exact when one of the two dims is the channel dim
    "fro": True, "nuc": True, 2: True, 1: True, INF: True, -2: False, -1: False, -INF: False,
}


@pytest.mark.parametrize("order, capture", [(o, "fx") for o in MATRIX] + [("nuc", "export"), (-2, "export")],
                         ids=str)
def test_matrix_norm_over_the_channel_dim(order, capture):
    model = ChannelNorm(lambda y: torch.linalg.matrix_norm(y, ord=order, dim=(1, 2), keepdim=True))
    if MATRIX[order]:
        _, plan = _prune(model, _x(1, 3, 4, 4), capture)
        assert _group_of(plan, "a.weight").kept == 4
    else:
        plan = fxprune.plan(model.double(), fxprune.Policy(ratio=0.5), (_x(1, 3, 4, 4),), capture=capture)
        assert not _group_of(plan, "a.weight").exact


def test_norm_table_is_the_rules_docstring():
    assert RR.MATRIX_EXACT == MATRIX
    assert [RR.vector_norm_exact(p) for p in (0, 0.5, INF, -INF, -0.5)] == [True, True, True, False, False]


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's global response norm, as timm writes it: a norm over the spatial dims, its mean
    over the channels, and ``addcmul`` of per-channel parameters viewed to broadcast."""

    def __init__(self, dim, channels_last):
        super().__init__()
        self.spatial_dim, self.channel_dim = ((1, 2), -1) if channels_last else ((2, 3), 1)
        self.wb_shape = (1, 1, 1, -1) if channels_last else (1, -1, 1, 1)
        self.weight, self.bias = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))

    def forward(self, x):
        x_g = x.norm(p=2, dim=self.spatial_dim, keepdim=True)
        x_n = x_g / (x_g.mean(dim=self.channel_dim, keepdim=True) + 1e-6)
        return x + torch.addcmul(self.bias.view(self.wb_shape), self.weight.view(self.wb_shape), x * x_n)


class GRN(nn.Module):
    """A ConvNeXt-V2 MLP: Linear, GELU, global response norm (channels last or first), Linear."""

    def __init__(self, channels_last=True):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 6)
        self.grn = GlobalResponseNorm(12, channels_last)
        self.channels_last = channels_last

    def forward(self, x):
        y = self.stem(x).permute(0, 2, 3, 1)
        h = F.gelu(self.fc1(y))
        h = self.grn(h) if self.channels_last else self.grn(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.fc2(h).permute(0, 3, 1, 2)


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("channels_last", [True, False])
def test_global_response_norm_prunes_exactly(channels_last, capture):
    pruned, plan = _prune(GRN(channels_last), _x(1, 3, 4, 4), capture)
    group = _group_of(plan, "fc1.weight")
    assert group.exact and group.kept == 6
    assert {"grn.weight", "grn.bias"} <= {p.target for p in group.params}
    assert tuple(pruned.grn.weight.shape) == (6,)
    assert not plan.blocked_ops


# -- unfold ----------------------------------------------------------------------------------
class Im2col(nn.Module):
    """im2col then a linear map over C * k (a convolution written by hand)."""

    def __init__(self, module):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.unfold = nn.Unfold(2, stride=2) if module else None
        self.fc = nn.Linear(4 * 4, 5)

    def forward(self, x):
        y = F.relu(self.a(x))
        cols = self.unfold(y) if self.unfold is not None else F.unfold(y, (2, 2), stride=2)
        return self.fc(cols.transpose(1, 2))


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("module", [True, False])
def test_im2col_is_a_channel_major_stride_map(module, capture):
    pruned, plan = _prune(Im2col(module), _x(1, 3, 6, 6), capture)
    group = _group_of(plan, "a.weight")
    assert group.exact and group.kept == 2
    assert tuple(pruned.fc.weight.shape) == (5, 8)  # 2 channels x 2 x 2 window entries
    kept = [c for c in range(4) if c not in group.removed]
    original = plan.traced.fc.weight.detach()
    columns = [c * 4 + j for c in kept for j in range(4)]
    assert torch.equal(pruned.fc.weight.detach(), original[:, columns])


class WindowsOnSpatial(nn.Module):
    """Halo attention's key/value windows: ``Tensor.unfold`` over H and W, then a mean per window."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = F.pad(self.a(x), [1, 1, 1, 1])
        w = y.unfold(2, 4, 2).unfold(3, 4, 2)  # (B, C, nh, nw, 4, 4)
        return self.b(w.flatten(4).amax(-1))


@pytest.mark.parametrize("capture", CAPTURES)
def test_tensor_unfold_on_spatial_dims_passes_channels_through(capture):
    _, plan = _prune(WindowsOnSpatial(), _x(1, 3, 6, 6), capture)
    assert _group_of(plan, "a.weight").kept == 3 and not plan.blocked_ops


class UnfoldChannels(nn.Module):
    def __init__(self, functional):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv1d(6 * 2, 2, 1)
        self.functional = functional

    def forward(self, x):
        y = self.a(x)
        if self.functional:  # channels on a spatial dim of im2col
            return self.b(F.unfold(y.transpose(1, 2), (1, 2)))
        return y.unfold(1, 2, 2).sum(-1)  # windows along the channel dim


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("functional", [True, False])
def test_unfold_that_mixes_channels_blocks_with_its_reason(functional, capture):
    plan = fxprune.plan(UnfoldChannels(functional), fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 6, 6),),
                        capture=capture)
    group = _group_of(plan, "a.weight")
    assert group.blocked and not group.removed
    reasons = " ".join(why for _, why in plan.blocked_ops)
    assert ("gathers sliding blocks over the channel dim" if functional else "slides windows along the channel dim") \
        in reasons, reasons


# -- views shaped like another tensor --------------------------------------------------------
class LinearNorm(nn.Module):
    """LeViT's LinearNorm: BatchNorm1d over (B * N, C), back to (B, N, C) with reshape_as/view_as."""

    def __init__(self, method):
        super().__init__()
        self.fc, self.bn, self.out = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        self.method = method
        self.bn.running_mean.normal_()

    def forward(self, x):
        y = self.fc(x)
        z = getattr(self.bn(y.flatten(0, 1)), self.method)(y)
        return self.out(F.hardswish(z))


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("method", ["reshape_as", "view_as"])
def test_reshape_as_follows_the_other_tensor(method, capture):
    pruned, plan = _prune(LinearNorm(method), _x(2, 5, 4), capture)
    group = _group_of(plan, "fc.weight")
    assert group.kept == 4 and "bn.weight" in {p.target for p in group.params}
    assert method in pruned.code  # no literal: the shape is still read from the other tensor


class ExpandAs(nn.Module):
    """A gate from another producer expanded to a feature map, then joined on the channel dim:
    the gate's channels are the map's (else the pruned expand_as would fail)."""

    def __init__(self, param):
        super().__init__()
        self.a, self.c, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(12, 2, 1)
        self.gamma = nn.Parameter(torch.randn(1, 6, 1, 1)) if param else None

    def forward(self, x):
        y = self.a(x)
        g = self.gamma if self.gamma is not None else self.c(x.mean((2, 3), keepdim=True))
        return self.b(torch.cat([y, g.expand_as(y)], 1))


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("param", [True, False])
def test_expand_as_couples_with_the_other_tensor(param, capture):
    pruned, plan = _prune(ExpandAs(param), _x(1, 3, 4, 4), capture)
    group = _group_of(plan, "a.weight")
    assert group.kept == 3
    coupled = {p.target for p in group.params}
    assert ("gamma" if param else "c.weight") in coupled


class ViewAsInput(nn.Module):
    """``y.view_as(x)`` of a model input: the input's channels stay, so y's cannot go."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.b(self.a(x).view_as(x) + 1)


@pytest.mark.parametrize("capture", CAPTURES)
def test_view_as_a_fixed_tensor_keeps_the_channels(capture):
    plan = fxprune.plan(ViewAsInput(), fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 4, 4),), capture=capture)
    assert not _group_of(plan, "a.weight").removed


def test_rows_and_twins():
    for f in (torch.norm, torch.linalg.vector_norm, torch.linalg.norm, torch.linalg.matrix_norm, F.unfold):
        assert f in FUNCTION_RULES
    for m in ("norm", "unfold", "reshape_as", "view_as", "expand_as"):
        assert m in METHOD_RULES
    aten = torch.ops.aten
    assert twin_of(aten.linalg_vector_norm.default).target is torch.linalg.vector_norm
    assert twin_of(aten.norm.ScalarOpt_dim).target == "norm"
    assert twin_of(aten.im2col.default).target is F.unfold
    assert twin_of(aten.reshape_as.default).target == "reshape_as"


# -- timm ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, size", [("convnextv2_atto", 32), ("levit_128s", 224)])
def test_timm_models_prune_exactly(name, size):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    _, plan = _prune(model, _x(1, 3, size, size), "fx", exact_only=True)
    assert sum(g.size - g.kept for g in plan.groups) > 0
    assert not any("norm" in why or "reshape_as" in why for _, why in plan.blocked_ops)


class HaloBlock(nn.Module):
    """timm's halo attention (halonet_h1's block) on a tiny map: key/value windows by
    ``Tensor.unfold`` over H and W, heads split out of the channels."""

    def __init__(self):
        super().__init__()
        from timm.layers.halo_attn import HaloAttn
        self.a, self.b = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 2, 1)
        self.attn = HaloAttn(16, 16, num_heads=2, block_size=4, halo_size=1, dim_head=4)

    def forward(self, x):
        return self.b(self.attn(self.a(x)))


@pytest.mark.parametrize("capture", CAPTURES)
def test_halo_attention_prunes_heads_and_input_channels(capture):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    _, plan = _prune(HaloBlock(), _x(1, 3, 8, 8), capture)
    assert _group_of(plan, "a.weight").kept == 8
    heads = _group_of(plan, "attn.q.weight")
    assert heads.size == 2 and heads.kept == 1 and heads.exact
    assert not any("unfold" in why for _, why in plan.blocked_ops)


class ParamViews(nn.Module):
    """Per-channel parameters viewed to broadcast, with a literal channel count, ``-1`` and
    ``torch.reshape``, and a per-token table viewed onto another dim than the channels."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)
        self.gamma, self.beta = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(8))
        self.rows = nn.Parameter(torch.randn(4))

    def forward(self, x):
        y = self.a(x) * self.gamma.view(1, 8, 1, 1) + torch.reshape(self.beta, (1, -1, 1, 1))
        return self.b(y + self.rows.view(1, 1, 4, 1))


@pytest.mark.parametrize("capture", CAPTURES)
def test_per_channel_parameter_views_follow_the_channels(capture):
    pruned, plan = _prune(ParamViews(), _x(1, 3, 4, 5), capture)
    group = _group_of(plan, "a.weight")
    assert group.kept == 4 and {"gamma", "beta"} <= {p.target for p in group.params}
    assert tuple(pruned.gamma.shape) == (4,) and tuple(pruned.rows.shape) == (4,)
