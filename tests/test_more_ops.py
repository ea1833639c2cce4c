"""Writes into a slice of the channel dim (FasterNet's ``x[:, :c] = conv(x[:, :c])``, ``copy_``,
``slice_scatter``), constant padding of the channel dim (EfficientViT's linear attention), literal
list indices (CSATv2's zigzag permutation) and parameter tables (Hiera's interpolated and tiled
position embeddings, LeViT's ``attention_biases[:, idxs]``), through torch.fx and torch.export,
checked by the mask oracle in float64."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from oracle_helpers import blocked_reasons, prune_verified

CAPTURES = ["fx", "export"]
IMAGE = (torch.randn(2, 3, 6, 6),)


_prune = prune_verified
_blocked = blocked_reasons


def _owners(plan, owner):
    """Producers of the group that ``owner``'s output rows belong to."""
    group = next(g for g in plan.groups if owner in {p.owner for p in g.producers})
    return {p.owner for p in group.producers}


class PartialConv(nn.Module):
    """FasterNet's PConv (forward_slicing): a 3x3 conv rewrites the first ``c`` channels in place."""

    def __init__(self, dim=8, c=2):
        super().__init__()
        self.c = c
        self.a = nn.Conv2d(3, dim, 1)
        self.p = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.mlp = nn.Sequential(nn.Conv2d(dim, 16, 1), nn.ReLU(), nn.Conv2d(16, dim, 1))
        self.head = nn.Conv2d(dim, 4, 1)

    def forward(self, x):
        y = self.a(x)
        z = y.clone()
        z[:, :self.c, :, :] = self.p(z[:, :self.c, :, :])
        return self.head(y + self.mlp(z))


class CopyInto(nn.Module):
    """``x[:, a:b].copy_(y)`` and an in-place add into another slice, spelled so torch.fx traces them."""

    def __init__(self):
        super().__init__()
        self.a, self.p, self.q = nn.Conv2d(3, 10, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 3, 1)
        self.head = nn.Conv2d(10, 4, 1)

    def forward(self, x):
        y = self.a(x).clone()
        y[:, 2:6].copy_(self.p(x))
        y[:, 7:].add_(self.q(x)).add_(0.5)  # a constant written in place: removed channels stay zero
        return self.head(y)


class Scatter(nn.Module):
    """``torch.slice_scatter`` (the functional form of a slice write) on the channel dim and on a spatial dim."""

    def __init__(self):
        super().__init__()
        self.a, self.p, self.q = nn.Conv2d(3, 10, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 10, 1)
        self.head = nn.Conv2d(10, 4, 1)

    def forward(self, x):
        y = torch.slice_scatter(self.a(x), self.p(x), 1, 3, 7)
        y = torch.slice_scatter(y, self.q(x)[:, :, :2], 2, 0, 2)
        return self.head(y)


class LinearAttention(nn.Module):
    """EfficientViT's LiteMLA core: ``v`` padded with a column of ones, split off after the products."""

    def __init__(self, dim=8, heads=2, head_dim=4):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Conv2d(3, 3 * heads * head_dim, 1)
        self.proj = nn.Conv2d(heads * head_dim, dim, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        qkv = self.qkv(x).reshape(b, -1, 3 * self.head_dim, h * w).transpose(-1, -2)
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = F.relu(q), F.relu(k)
        v = F.pad(v, (0, 1), mode="constant", value=1.0)
        out = q @ (k.transpose(-1, -2) @ v)
        out = out[..., :-1] / (out[..., -1:] + 1e-6)
        return self.proj(out.transpose(-1, -2).reshape(b, -1, h, w))


class Zigzag(nn.Module):
    """CSATv2's stem: a list index permutes a channel dim; another permutes a spatial dim."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.a(x)[:, [5, 0, 3, 1, 4, 2]]
        return self.b(y[:, :, [2, 0, 1, 5, 4, 3]])


class PositionTables(nn.Module):
    """Hiera's ``_pos_embed``: an interpolated and a tiled parameter added to the tokens."""

    def __init__(self, dim=6):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, dim, 1), nn.Conv2d(dim, 4, 1)
        self.pos = nn.Parameter(torch.randn(1, dim, 3, 3))
        self.win = nn.Parameter(torch.randn(1, dim, 2, 2))

    def forward(self, x):
        y = self.a(x)
        win = self.win.tile([3, 3])
        pos = F.interpolate(self.pos, size=win.shape[-2:], mode="bicubic", antialias=True)
        return self.b(y + pos + win)


class BiasTable(nn.Module):
    """LeViT's attention: a per-head bias table gathered by an index buffer, added to the scores."""

    def __init__(self, heads=4, key_dim=3, n=9):
        super().__init__()
        self.heads, self.key_dim = heads, key_dim
        self.qkv = nn.Linear(3, 3 * heads * key_dim)
        self.proj = nn.Linear(heads * key_dim, 3)
        self.attention_biases = nn.Parameter(torch.randn(heads, n))
        self.register_buffer("idxs", torch.randint(0, n, (n, n)))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.heads, -1).split([self.key_dim] * 3, dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
        attn = (q @ k * 0.5 + self.attention_biases[:, self.idxs]).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


def test_partial_conv_slice_write_prunes_both_parts_through_export():
    plan, pruned = _prune(PartialConv(), IMAGE, "export")
    assert not _blocked(plan)
    assert _owners(plan, "a") >= {"a", "p"}
    assert pruned.a.out_channels == pruned.head.in_channels < 8


@pytest.mark.parametrize("capture", CAPTURES)
def test_copy_and_add_into_slices_are_exact(capture):
    plan, pruned = _prune(CopyInto(), IMAGE, capture)
    assert not _blocked(plan)
    assert _owners(plan, "a") == {"a", "p", "q"}
    assert pruned.a.out_channels == pruned.head.in_channels < 10


@pytest.mark.parametrize("capture", CAPTURES)
def test_slice_scatter_is_an_offset_map(capture):
    plan, pruned = _prune(Scatter(), IMAGE, capture)
    assert not _blocked(plan)
    assert _owners(plan, "a") == {"a", "p", "q"}
    assert pruned.a.out_channels == pruned.q.out_channels == pruned.head.in_channels < 10


@pytest.mark.parametrize("capture", CAPTURES)
def test_constant_pad_of_the_channel_dim_is_an_offset_map(capture):
    plan, pruned = _prune(LinearAttention(), (torch.randn(2, 3, 4, 4),), capture)
    assert not _blocked(plan)
    assert pruned.qkv.out_channels < 24


def test_reflect_pad_of_the_channel_dim_blocks_naming_the_node():
    class Reflect(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 6), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(F.pad(self.a(x), (1, 1), mode="reflect"))

    plan = fxprune.plan(Reflect(), fxprune.Policy(ratio=0.5), (torch.randn(2, 4, 3),), capture="fx")
    why = " ".join(_blocked(plan))
    assert "pad" in why and "'reflect'" in why and "node 'pad'" in why


@pytest.mark.parametrize("capture", CAPTURES)
def test_list_index_is_a_gather_map(capture):
    plan, pruned = _prune(Zigzag(), IMAGE, capture)
    assert not _blocked(plan)
    assert pruned.a.out_channels == pruned.b.in_channels == 3


def test_list_index_beside_an_integer_index_blocks():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 1), nn.Linear(2, 2)

        def forward(self, x):
            return self.b(self.a(x)[0, [1, 2]].permute(1, 2, 0))

    plan = fxprune.plan(Mixed(), fxprune.Policy(ratio=0.5), IMAGE, capture="fx")
    assert any("advanced indexing" in why for why in _blocked(plan))


@pytest.mark.parametrize("capture", CAPTURES)
def test_interpolated_and_tiled_parameters_are_per_channel_tables(capture):
    plan, pruned = _prune(PositionTables(), IMAGE, capture)
    assert not _blocked(plan)
    assert pruned.pos.shape[1] == pruned.win.shape[1] == pruned.a.out_channels == 3


@pytest.mark.parametrize("capture", CAPTURES)
def test_bias_table_gathered_by_index_follows_the_heads(capture):
    plan, pruned = _prune(BiasTable(), (torch.randn(2, 9, 3),), capture)
    assert not _blocked(plan)
    assert 0 < pruned.attention_biases.shape[0] < 4
    assert pruned.qkv.out_features == 3 * 3 * pruned.attention_biases.shape[0]


class SlicedPositionTable(nn.Module):
    """A ViT's position table ``(1, 1 + N, C)``: the class token's row and the patch rows are
    sliced apart (the patch rows resized through a (1, C, h, w) view, as timm's dynamic image
    size does), joined again and added to the tokens; the hidden width C is pruned."""

    def __init__(self, dim=8):
        super().__init__()
        self.embed = nn.Linear(3, dim)
        self.pos = nn.Parameter(torch.randn(1, 1 + 9, dim))
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.mlp = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, dim))
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        tokens = self.embed(x.flatten(2).transpose(1, 2))  # (B, 9, C)
        grid = self.pos[:, 1:].reshape(1, 3, 3, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(3, 3), mode="bilinear", align_corners=False)
        pos = torch.cat([self.pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 9, -1)], dim=1)
        y = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + pos
        y = y + self.mlp(y)
        return self.head(y[:, 0])


@pytest.mark.parametrize("capture", CAPTURES)
def test_a_sliced_position_table_is_a_per_channel_table_on_its_last_dim(capture):
    plan, pruned = _prune(SlicedPositionTable(), (torch.randn(2, 3, 3, 3),), capture, ratio=0.5)
    assert not _blocked(plan)
    hidden = pruned.embed.out_features
    assert hidden < 8 and pruned.pos.shape == (1, 10, hidden) and pruned.cls.shape == (1, 1, hidden)
