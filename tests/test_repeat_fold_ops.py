"""``repeat_interleave`` (timm GCViT's global query, spread over the windows), ``F.fold`` /
``nn.Fold`` (VOLO's outlook attention), ``torch.rsub`` (ConViT's ``1.0 - sigmoid(gating)``
through torch.export) and a permuted parameter table (NaFlexViT's factorized position
embedding), through torch.fx and torch.export, checked by the mask oracle in float64 with
``exact_only=True``; and the reasons of the cases that block."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from oracle_helpers import blocked_reasons

CAPTURES = ["fx", "export"]
IMAGE = (torch.randn(2, 3, 4, 4),)


def _prune(model, inputs, capture):
    """``(plan, pruned)`` in float64 at ``Policy(ratio=0.5, exact_only=True)``; the oracle holds."""
    model = model.double().eval()
    inputs = tuple(t.double() for t in inputs)
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5, exact_only=True), inputs, capture=capture)
    pruned = fxprune.apply(plan)
    check = fxprune.verify(pruned, inputs=inputs)
    assert check.ok and check.compared and check.max_error < 1e-9, check
    return plan, pruned


def _plan(model, inputs, capture):
    return fxprune.plan(model, fxprune.Policy(ratio=0.5), inputs, capture=capture)


# -- repeat_interleave ---------------------------------------------------------------------
class RepeatChannels(nn.Module):
    """Each channel twice in a row along the channel dim (method form), then a conv over them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(12, 2, 1)

    def forward(self, x):
        return self.b(self.a(x).repeat_interleave(2, dim=1))


class RepeatOutputSize(nn.Module):
    """``torch.repeat_interleave`` with ``output_size`` (a literal that follows the kept width),
    added to another producer's channels and a negative dim."""

    def __init__(self):
        super().__init__()
        self.a, self.c, self.b = nn.Linear(3, 4), nn.Linear(3, 12), nn.Linear(12, 2)

    def forward(self, x):
        y = torch.repeat_interleave(self.a(x), 3, dim=-1, output_size=12)
        return self.b(torch.relu(y + self.c(x)))


class RepeatTokens(nn.Module):
    """Repeats along the token dim and the batch dim: the channels (last dim) pass through."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x):
        y = self.a(x).repeat_interleave(2, dim=1)
        return self.b(torch.repeat_interleave(y, 3, 0))


class GlobalQuery(nn.Module):
    """GCViT's global attention: one query per image, repeated over its windows along the batch
    dim by a count computed from the shapes (``B // q_global.shape[0]``)."""

    def __init__(self, dim=6, heads=2):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.inp, self.out = nn.Linear(3, dim), nn.Linear(dim, 2)

    def forward(self, x):
        x = self.inp(x)
        B, N, C = x.shape
        g = self.q(x.mean(0, keepdim=True))
        kv = self.kv(x).reshape(B, N, 2, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        q = g.repeat_interleave(B // g.shape[0], dim=0)
        q = q.reshape(B, N, self.heads, self.hd).permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.out(self.proj(y) + x)


@pytest.mark.parametrize("capture", CAPTURES)
def test_repeat_interleave_channel_dim(capture):
    plan, pruned = _prune(RepeatChannels(), IMAGE, capture)
    assert (pruned.a.out_channels, pruned.b.in_channels) == (3, 6)
    (dim, removed), = [v for k, v in plan.removed_channels().items() if "repeat" in k]
    kept_a = [c for c in range(6) if c not in plan.removed_channels()["a"][1]]
    assert dim == 1 and [c for c in range(12) if c not in removed] == [2 * c + i for c in kept_a for i in (0, 1)]


@pytest.mark.parametrize("capture", CAPTURES)
def test_repeat_interleave_output_size_follows_the_kept_width(capture):
    _, pruned = _prune(RepeatOutputSize(), (torch.randn(2, 5, 3),), capture)
    assert (pruned.a.out_features, pruned.b.in_features) == (2, 6)
    sizes = [n.kwargs.get("output_size") for n in pruned.graph.nodes if "repeat_interleave" in str(n.target)]
    assert sizes == [6]


@pytest.mark.parametrize("capture", CAPTURES)
def test_repeat_interleave_other_dims_pass_channels(capture):
    _, pruned = _prune(RepeatTokens(), (torch.randn(2, 5, 3),), capture)
    assert (pruned.a.out_features, pruned.b.in_features) == (3, 3)


@pytest.mark.parametrize("capture", CAPTURES)
def test_global_query_repeated_over_windows(capture):
    plan, pruned = _prune(GlobalQuery(), (torch.randn(4, 5, 3),), capture)
    assert not plan.blocked_ops
    assert pruned.q.out_features < 6 and pruned.kv.out_features < 12


class RepeatScale(nn.Module):
    """A per-channel scale vector repeated to the width of a wider layer (each entry over a block
    of that layer's outputs): the blocks go whole, with their scale entry."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 12), nn.Linear(12, 2)
        self.scale = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return self.b(self.a(x) * self.scale.repeat_interleave(3))


@pytest.mark.parametrize("capture", CAPTURES)
def test_repeat_interleave_of_a_parameter_vector(capture):
    plan, pruned = _prune(RepeatScale(), (torch.randn(2, 3),), capture)
    assert tuple(pruned.scale.shape) == (2,) and pruned.a.out_features == 6
    removed = plan.removed_channels()["a"][1]
    assert all({3 * (r // 3) + i for i in range(3)} <= set(removed) for r in removed)


class RepeatBy(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 1)
        self.register_buffer("counts", torch.tensor([1, 2, 1, 2]))

    def forward(self, x):
        y = self.a(x)
        if self.how == "tensor":
            y = y.repeat_interleave(self.counts, dim=1)
        elif self.how == "computed":
            y = y.repeat_interleave(y.shape[0], dim=1)
        else:
            y = y.repeat_interleave(2)
        return self.b(x), y.sum()


@pytest.mark.parametrize("how, captures, why", [
    ("tensor", CAPTURES, "repeats along the channel dim 1, but repeats is a tensor"),
    ("computed", ["fx"], "repeats along the channel dim 1, but repeats is computed at run time"),
    ("none", CAPTURES, "has no dim: it flattens the input first"),
])
def test_repeat_interleave_blocks(how, captures, why):
    for capture in captures:
        plan = _plan(RepeatBy(how), IMAGE, capture)
        assert any(why in r and "repeat_interleave" in r for r in blocked_reasons(plan)), blocked_reasons(plan)
        assert all("a" not in {p.owner for p in g.producers} for g in plan.groups if g.removed)


# -- fold ----------------------------------------------------------------------------------
class Outlook(nn.Module):
    """VOLO's outlook attention, reduced: unfold 2x2 windows, weight each window entry per
    position (a softmax over the entries, shared by the channels), fold them back (overlapping
    windows summed), then a conv."""

    def __init__(self, module=False):
        super().__init__()
        self.a, self.w, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 1, 1), nn.Conv2d(4, 2, 1)
        self.fold = nn.Fold((4, 4), 2, padding=1) if module else None

    def forward(self, x):
        cols = F.unfold(self.a(x), 2, padding=1)                     # (B, 4 * 4, 25)
        w = F.unfold(self.w(x), 2, padding=1).softmax(1)             # (B, 4, 25)
        B, CK, L = cols.shape
        cols = (cols.view(B, 4, 4, L) * w.view(B, 1, 4, L)).view(B, CK, L)
        y = self.fold(cols) if self.fold is not None else F.fold(cols, (4, 4), 2, padding=1)
        return self.b(y)


class FoldRows(nn.Module):
    """A 1x1 Conv1d makes ``C * k`` rows, each its own channel: fold couples each block of ``k``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv1d(3, 8 * 4, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.b(F.fold(self.a(x), (3, 3), 2, stride=1))


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("module", [False, True])
def test_fold_after_unfold(capture, module):
    _, pruned = _prune(Outlook(module), IMAGE, capture)
    assert (pruned.a.out_channels, pruned.b.in_channels) == (2, 2)


@pytest.mark.parametrize("capture", CAPTURES)
def test_fold_couples_each_block_of_rows(capture):
    plan, pruned = _prune(FoldRows(), (torch.randn(2, 3, 4),), capture)
    assert (pruned.a.out_channels, pruned.b.in_channels) == (16, 4)
    removed = plan.removed_channels()["a"][1]
    assert {r // 4 for r in removed} == {r for r in range(8) if 4 * r in removed}
    assert len(removed) == 16 and all(all(4 * (r // 4) + i in removed for i in range(4)) for r in removed)


class FoldPositions(nn.Module):
    """Channels made on the block-position dim ``L`` of fold's input: summed over windows."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 9)

    def forward(self, x):
        return F.fold(self.a(x), (4, 4), 2)


@pytest.mark.parametrize("capture", CAPTURES)
def test_fold_blocks_channels_on_positions(capture):
    plan = _plan(FoldPositions(), (torch.randn(2, 8, 3),), capture)
    assert any("sums sliding blocks whose positions lie on the channel dim 2" in r for r in blocked_reasons(plan))


# -- rsub ----------------------------------------------------------------------------------
class Gate(nn.Module):
    """ConViT's gating ``(1. - sigmoid(g)) * a + sigmoid(g) * b``, and ``torch.rsub`` spelled out."""

    def __init__(self):
        super().__init__()
        self.a, self.g, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y, g = self.a(x), torch.sigmoid(self.g(x))
        z = (1. - g) * y + g * torch.rsub(y, 2.0)
        return self.b(z)


@pytest.mark.parametrize("capture", CAPTURES)
def test_rsub_is_elementwise(capture):
    plan, pruned = _prune(Gate(), IMAGE, capture)
    assert not plan.blocked_ops
    assert (pruned.a.out_channels, pruned.g.out_channels, pruned.b.in_channels) == (3, 3, 3)


# -- permute of a parameter table ----------------------------------------------------------
class FactorizedPos(nn.Module):
    """NaFlexViT's factorized position embedding: tables ``(1, L, C)`` permuted, resampled along
    ``L``, permuted back, broadcast over a grid and added to the patch embedding."""

    def __init__(self, dim=6):
        super().__init__()
        self.a, self.b = nn.Linear(3, dim), nn.Linear(dim, 2)
        self.pos_y, self.pos_x = nn.Parameter(torch.randn(1, 3, dim)), nn.Parameter(torch.randn(1, 2, dim))

    def forward(self, x):
        def resample(t, n):
            return F.interpolate(t.permute(0, 2, 1).float(), size=n, mode="linear").permute(0, 2, 1)
        pos = (resample(self.pos_y, 4).unsqueeze(2) + resample(self.pos_x, 4).unsqueeze(1)).flatten(1, 2)
        return self.b(self.a(x) + pos.to(x.dtype))


class PermutedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.w = nn.Linear(3, 4), nn.Parameter(torch.randn(5, 4))

    def forward(self, x):
        return self.a(x) @ self.w.permute(1, 0)


@pytest.mark.parametrize("capture", CAPTURES)
def test_permuted_position_table(capture):
    plan, pruned = _prune(FactorizedPos(), (torch.randn(2, 16, 3),), capture)
    assert not plan.blocked_ops
    assert tuple(pruned.pos_y.shape) == (1, 3, 3) and tuple(pruned.pos_x.shape) == (1, 2, 3)


@pytest.mark.parametrize("capture", CAPTURES)
def test_permuted_parameter_without_channel_reader_blocks(capture):
    plan = _plan(PermutedWeight(), (torch.randn(2, 3),), capture)
    assert any("permutes parameter 'w' of shape (5, 4): no later op shows which of its dims carries channels" in r
               for r in blocked_reasons(plan)), blocked_reasons(plan)
