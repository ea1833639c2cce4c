"""Rewrite patterns that used to fail fxprune's own post-rewrite shape check (and were blamed on
the user's inputs): a blur pool's depthwise ``F.conv2d`` on a per-channel filter buffer (timm's
``densenetblur121d``) and a reshape that reuses a channel count read from another tensor
(timm's ``pvt_v2``). A failure of that check is a ``StageError`` naming the node."""
import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.errors import InputError, StageError


def _prune(model, inputs, fresh, policy=None):
    pruned = fxprune.transform(model, policy or fxprune.Policy(ratio=0.5), inputs)
    result = fxprune.verify(pruned, inputs=fresh)
    assert result.ok and result.exact, result
    with torch.no_grad():
        assert pruned(*fresh).shape == model(*fresh).shape
    return pruned


class BlurPool(nn.Module):
    """timm's BlurPool2d: a fixed binomial filter per channel, ``groups`` = the channel count
    (a literal from the constructor, or read from the input)."""

    def __init__(self, channels, literal=True):
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("filt", ((k[:, None] * k[None, :]) / 16).repeat(channels, 1, 1, 1),
                             persistent=False)
        self.channels, self.literal = channels, literal

    def forward(self, x):
        x = F.pad(x, [1, 1, 1, 1], mode="reflect")
        groups = self.channels if self.literal else x.shape[1]
        return F.conv2d(x, self.filt, stride=2, groups=groups)


class BlurNet(nn.Module):
    def __init__(self, literal=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.pool = BlurPool(16, literal)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.pool(torch.relu(self.bn(self.conv(x)))))


@pytest.mark.parametrize("literal", [True, False], ids=["groups-literal", "groups-from-input"])
def test_blur_pool_prunes_exactly(literal):
    torch.manual_seed(0)
    model = BlurNet(literal).eval()
    pruned = _prune(model, (torch.randn(1, 3, 8, 8),), (torch.randn(2, 3, 8, 8),))
    assert pruned.get_submodule("pool").filt.shape == (8, 1, 3, 3)
    assert pruned.get_submodule("conv").out_channels == 8


class SRAttention(nn.Module):
    """pvt_v2's attention with spatial reduction: ``B, N, C = x.shape`` of the (pruned) input is
    reused to reshape the attention output, whose channels stay."""

    def __init__(self, dim, heads=1):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.sr = nn.Conv2d(dim, dim, 2, stride=2)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, hw):
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.heads, -1).permute(0, 2, 1, 3)
        x = x.permute(0, 2, 1).reshape(B, C, hw[0], hw[1])
        x = self.sr(x).reshape(B, C, -1).permute(0, 2, 1)
        kv = self.kv(x).reshape(B, -1, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class PvtLike(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.attn = SRAttention(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = x + self.attn(x, (H, W))
        return self.head(x)


def test_reshape_reusing_a_pruned_channel_count_prunes_exactly():
    torch.manual_seed(0)
    model = PvtLike().eval()
    pruned = _prune(model, (torch.randn(1, 3, 16, 16),), (torch.randn(2, 3, 16, 16),))
    assert pruned.get_submodule("embed").out_channels == 8
    # the sequence length still follows the input: another resolution runs
    with torch.no_grad():
        assert pruned(torch.randn(1, 3, 24, 24)).shape == model(torch.randn(1, 3, 24, 24)).shape


def test_failed_shape_recheck_is_a_stage_error_naming_the_node(monkeypatch):
    """A rewrite that breaks the module is fxprune's failure, not the user's inputs."""
    apply_module = importlib.import_module("fxprune.rewrite.apply")
    rewrite = apply_module._rewrite_literals

    def broken(gm, plan, kept):  # forget to shrink the head's input: it no longer fits
        touched = rewrite(gm, plan, kept)
        head = gm.get_submodule("head")
        head.weight = nn.Parameter(torch.zeros(4, 16, 1, 1))
        return touched

    monkeypatch.setattr(apply_module, "_rewrite_literals", broken)
    with pytest.raises(StageError) as caught:
        fxprune.transform(BlurNet().eval(), fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 8, 8),))
    assert not isinstance(caught.value, InputError)
    assert caught.value.stage == "rewrite" and caught.value.node == "head"
    assert "head" in str(caught.value)


@pytest.mark.parametrize("name", ["densenetblur121d", "pvt_v2_b0"])
def test_timm_models_prune_exactly(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x, fresh = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5), (x,))  # approximate groups too
    with torch.no_grad():
        assert pruned(fresh).shape == model(fresh).shape
    pruned = _prune(model, (x,), (fresh,), fxprune.Policy(ratio=0.5, exact_only=True))
    assert any(g.removed for g in pruned.meta["fxprune"].groups)
