"""Convolution-family patterns: grouped convs, norms, channel shuffles, channels-last blocks,
reductions over channels, decoders and multi-output heads (float64 in tests).

``EXACT`` nets must satisfy the mask oracle with any policy; ``APPROXIMATE`` nets contain an op
that mixes channels, so their groups are marked inexact and only ``exact_only=True`` is exact.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo import cbr

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
INORM = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


class Grouped(nn.Module):
    """groups=3 then groups=4 (different block widths in and out), a residual across a grouped
    conv, and a grouped transposed conv, in 1-D, 2-D or 3-D."""

    def __init__(self, dims: int = 2):
        super().__init__()
        conv, convt = CONV[dims], CONVT[dims]
        self.stem = cbr(3, 12, dims=dims)
        self.g3 = conv(12, 12, 3, padding=1, groups=3)
        self.g4 = conv(12, 8, 3, padding=1, groups=4, bias=False)
        self.res = conv(8, 8, 1, groups=2)
        self.up = convt(8, 12, 2, stride=2, groups=4)
        self.head = conv(12, 2, 1)

    def forward(self, x):
        x = F.relu(self.g3(self.stem(x)))
        y = torch.tanh(self.g4(x))
        y = y + self.res(y)
        return self.head(F.relu(self.up(y)))


class GroupedFunctional(nn.Module):
    """F.conv2d / F.conv_transpose2d with groups on get_attr weights."""

    def __init__(self):
        super().__init__()
        self.w0 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.w1 = nn.Parameter(torch.randn(8, 4, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.w2 = nn.Parameter(torch.randn(8, 3, 2, 2) * 0.3)   # transposed: (in, out/g, k, k)
        self.w3 = nn.Parameter(torch.randn(2, 6, 1, 1) * 0.3)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w0, padding=1))
        x = F.relu(F.conv2d(x, self.w1, self.b1, 1, 1, 1, 2))
        x = F.relu(F.conv_transpose2d(x, self.w2, None, 2, 0, 0, 2))
        return F.conv2d(x, self.w3)


class GroupNorms(nn.Module):
    """GroupNorm with affine, without affine, per-channel groups and functional group_norm."""

    def __init__(self):
        super().__init__()
        self.a, self.gn1 = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.b, self.gn2 = nn.Conv2d(16, 12, 3, padding=1), nn.GroupNorm(3, 12, affine=False)
        self.c, self.gn3 = nn.Conv2d(12, 8, 1), nn.GroupNorm(8, 8)
        self.d = nn.Conv2d(8, 8, 1)
        self.gw, self.gb = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8) * 0.1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = F.relu(self.gn1(self.a(x)))
        x = F.silu(self.gn2(self.b(x)))
        x = F.relu(self.gn3(self.c(x)))
        x = F.group_norm(self.d(x), 4, self.gw, self.gb)
        return self.head(F.relu(x))


class Shuffle(nn.Module):
    """ShuffleNetV2-style units: chunk, branch, concat, channel shuffle, in several spellings."""

    def __init__(self, style: str = "literal"):
        super().__init__()
        self.style = style
        self.stem = cbr(3, 12)
        self.b1 = nn.Sequential(nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.mod_shuffle = nn.ModuleDict({"2": nn.ChannelShuffle(2), "3": nn.ChannelShuffle(3)})
        self.head = nn.Conv2d(12, 2, 1)

    def shuffle(self, x, g):
        n, c, h, w = x.shape
        if self.style == "literal":
            return x.view(2, g, 12 // g, 8, 8).transpose(1, 2).contiguous().view(2, 12, 8, 8)
        if self.style == "dynamic":
            return x.view(n, g, c // g, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        if self.style == "permute":
            return x.reshape(n, g, -1, h, w).permute(0, 2, 1, 3, 4).reshape(n, -1, h, w)
        if self.style == "function":
            return torch.channel_shuffle(x, g)
        return self.mod_shuffle[str(g)](x)

    def forward(self, x):
        x = self.stem(x)
        for branch in (self.b1, self.b2):
            x1, x2 = x.chunk(2, dim=1)
            x = self.shuffle(torch.cat((x1, branch(x2)), dim=1), 2)
        return self.head(self.shuffle(x, 3))


class Unflatten(nn.Module):
    """flatten(1) then a view back to (n, C, h, w): the inverse stride map, nothing coupled."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        f = torch.flatten(F.relu(self.a(x)), 1) * 2.0
        return self.b(f.view(2, 8, 8, 8))


class ChannelsLast(nn.Module):
    """A ConvNeXt block: depthwise conv, permute to NHWC, LayerNorm, Linear-GELU-Linear,
    layer scale, permute back, residual; plus a LayerNorm without affine."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.norm = nn.LayerNorm(8, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.layer_scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.norm2 = nn.LayerNorm(8, elementwise_affine=False)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))).permute(0, 3, 1, 2)
        x = x + self.layer_scale * y
        x = self.norm2(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(x)


class Reductions(nn.Module):
    """Exact reductions over the channel dim: sum, mean (rescaled by the pass), F.normalize;
    max/min over spatial dims."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 1), nn.Conv2d(6, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a = self.a(x)
        gate = torch.sigmoid(a.mean(1, keepdim=True) + torch.mean(a, dim=(1, 2, 3), keepdim=True))
        b = self.b(F.relu(a) * gate)
        b = b + torch.max(b, dim=3, keepdim=True)[0] - b.min(2, keepdim=True)[0]
        c = self.c(F.normalize(b, dim=1) + b.sum(1, keepdim=True))
        return self.head(c)


class MixingReductions(nn.Module):
    """Ops that mix channels: amax/amin/max over channels (CBAM-style), softmax over channels."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 1)
        self.spatial = nn.Conv2d(3, 1, 3, padding=1)
        self.sm = nn.Softmax2d()
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        a = F.relu(self.a(x))
        pooled = torch.cat([a.amax(1, keepdim=True), torch.amin(a, 1, keepdim=True),
                            torch.max(a, dim=1, keepdim=True)[0]], dim=1)
        a = a * torch.sigmoid(self.spatial(pooled))
        b = self.b(a)
        return self.head(b * torch.softmax(b, dim=1) + self.sm(b))


class PerChannel(nn.Module):
    """PReLU (per-channel and single), F.prelu, InstanceNorm with affine and running stats."""

    def __init__(self, dims: int = 2):
        super().__init__()
        conv, inorm = CONV[dims], INORM[dims]
        self.a, self.p1 = conv(3, 8, 3, padding=1), nn.PReLU(8)
        self.in1 = inorm(8, affine=True, track_running_stats=True)
        self.b, self.p2 = conv(8, 6, 3, padding=1), nn.PReLU()
        self.in2 = inorm(6, affine=True)
        self.c, self.in3 = conv(6, 6, 1), inorm(6)
        self.pw = nn.Parameter(torch.rand(6) * 0.5)
        self.head = conv(6, 2, 1)

    def forward(self, x):
        x = self.in1(self.p1(self.a(x)))
        x = self.in2(self.p2(self.b(x)))
        x = F.prelu(self.in3(self.c(x)), self.pw)
        return self.head(x)


class UNet(nn.Module):
    """Encoder, transposed-conv decoder and skip concats."""

    def __init__(self):
        super().__init__()
        self.e1, self.e2, self.mid = cbr(3, 8), cbr(8, 12), cbr(12, 16)
        self.up2, self.d2 = nn.ConvTranspose2d(16, 12, 2, stride=2), cbr(24, 12)
        self.up1, self.d1 = nn.ConvTranspose2d(12, 8, 2, stride=2), cbr(16, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e1 = self.e1(x)
        e2 = self.e2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.d2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.d1(torch.cat([e1, self.up1(d2)], dim=1))
        return self.head(d1)


class FPN(nn.Module):
    """Backbone, lateral 1x1 convs, top-down upsample + add, dict and tuple outputs."""

    def __init__(self, as_dict: bool = True):
        super().__init__()
        self.as_dict = as_dict
        self.c2, self.c3, self.c4 = cbr(3, 8), cbr(8, 12), cbr(12, 16)
        self.l2, self.l3, self.l4 = nn.Conv2d(8, 10, 1), nn.Conv2d(12, 10, 1), nn.Conv2d(16, 10, 1)
        self.o2, self.o3, self.o4 = (nn.Conv2d(10, 4, 3, padding=1) for _ in range(3))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x):
        c2 = self.c2(x)
        c3 = self.c3(F.max_pool2d(c2, 2))
        c4 = self.c4(F.max_pool2d(c3, 2))
        p4 = self.l4(c4)
        p3 = self.l3(c3) + self.up(p4)
        p2 = self.l2(c2) + F.interpolate(p3, size=c2.shape[-2:], mode="nearest")
        outs = (self.o2(p2), self.o3(p3), self.o4(p4))
        return {"p2": outs[0], "p3": outs[1], "p4": outs[2]} if self.as_dict else outs


def _img(c=3, s=8):
    return (torch.randn(2, c, s, s),)


EXACT = {
    "grouped_1d": (lambda: Grouped(1), lambda: (torch.randn(2, 3, 8),)),
    "grouped_2d": (lambda: Grouped(2), _img),
    "grouped_3d": (lambda: Grouped(3), lambda: (torch.randn(2, 3, 4, 4, 4),)),
    "grouped_functional": (GroupedFunctional, _img),
    "group_norms": (GroupNorms, _img),
    "shuffle_literal": (lambda: Shuffle("literal"), _img),
    "shuffle_dynamic": (lambda: Shuffle("dynamic"), _img),
    "shuffle_permute": (lambda: Shuffle("permute"), _img),
    "shuffle_function": (lambda: Shuffle("function"), _img),
    "shuffle_module": (lambda: Shuffle("module"), _img),
    "unflatten": (Unflatten, _img),
    "reductions": (Reductions, _img),
    "per_channel_1d": (lambda: PerChannel(1), lambda: (torch.randn(2, 3, 8),)),
    "per_channel_2d": (lambda: PerChannel(2), _img),
    "per_channel_3d": (lambda: PerChannel(3), lambda: (torch.randn(2, 3, 4, 4, 4),)),
    "unet": (UNet, _img),
    "fpn_dict": (lambda: FPN(True), _img),
    "fpn_tuple": (lambda: FPN(False), _img),
}
APPROXIMATE = {
    "channels_last": (ChannelsLast, lambda: _img(s=16)),
    "mixing_reductions": (MixingReductions, _img),
}
ZOO = {**EXACT, **APPROXIMATE}


def build(name: str, dtype=torch.float64, seed: int = 0):
    """A model with non-trivial norm statistics and affine parameters, and its inputs."""
    torch.manual_seed(seed)
    make, inputs = ZOO[name]
    model = make()
    for m in model.modules():
        if getattr(m, "running_mean", None) is not None:
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) \
                and getattr(m, "weight", None) is not None:
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model = model.to(dtype).eval()
    return model, tuple(t.to(dtype) for t in inputs())
