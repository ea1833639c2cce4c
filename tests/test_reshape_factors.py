"""Views that split the channel dim into factors, merge it back, or re-lay it out with its
neighbours (``fxprune.coupling.regrid``), against the mask oracle in float64, with both front ends."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune

CAPTURES = ["fx", "export"]


class Unflatten(nn.Module):
    """Torch-Pruning's test_reshape: Linear (B, 64) -> view (B, 16, 2, 2) -> BN -> conv."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.conv = nn.Linear(8, 64), nn.BatchNorm2d(16), nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.bn(self.fc(x).view(-1, 16, 2, 2))))


class TPReshape(nn.Module):
    """The model of Torch-Pruning's tests/test_reshape.py at its sizes: Linear (B, 4096) ->
    view(-1, 256, 4, 4) -> two transposed convs -> flatten -> Linear."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(512, 4096)
        self.up1 = nn.ConvTranspose2d(256, 128, kernel_size=4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(128, 64, kernel_size=4, stride=2, padding=1)
        self.head = nn.Linear(16384, 10)

    def forward(self, x):
        x = F.relu(self.fc(x)).view(-1, self.up1.in_channels, 4, 4)
        return self.head(torch.flatten(F.relu(self.up2(F.relu(self.up1(x)))), 1))


class RadixSplit(nn.Module):
    """ResNeSt's split attention, radix 2: (B, radix * C, H, W) -> (B, radix, C, H, W), summed over
    radix; the attention goes through the radix softmax ``view(B, 1, radix, -1).transpose(1, 2)``."""

    def __init__(self, c=6, radix=2):
        super().__init__()
        self.radix = radix
        self.conv, self.bn0 = nn.Conv2d(3, c * radix, 3, padding=1), nn.BatchNorm2d(c * radix)
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c * radix, 1)
        self.out = nn.Conv2d(c, 5, 1)

    def forward(self, x):
        x = torch.relu(self.bn0(self.conv(x)))
        B, RC, H, W = x.shape
        x = x.reshape((B, self.radix, RC // self.radix, H, W))
        gap = x.sum(dim=1).mean((2, 3), keepdim=True)
        attn = self.fc2(torch.relu(self.fc1(gap)))
        attn = torch.softmax(attn.view(B, 1, self.radix, -1).transpose(1, 2), dim=1).reshape(B, -1)
        attn = attn.view(B, -1, 1, 1).reshape((B, self.radix, RC // self.radix, 1, 1))
        return self.out((x * attn).sum(dim=1).contiguous())


class ConvHeads(nn.Module):
    """Visformer's attention: a 1x1 conv makes q, k, v; (B, 3C, H, W) -> (B, 3, heads, d, H*W);
    the result (B, heads, d, N) is merged back into (B, C, H, W)."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads, self.d = heads, dim // heads
        self.stem, self.qkv, self.proj = nn.Conv2d(3, dim, 1), nn.Conv2d(dim, 3 * dim, 1), nn.Conv2d(dim, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        B, C, H, W = x.shape
        qkv = self.qkv(x).reshape(B, 3, self.heads, self.d, -1).permute(1, 0, 2, 4, 3)
        q, k, v = qkv.unbind(0)
        a = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
        return self.proj(a.permute(0, 1, 3, 2).reshape(B, -1, H, W))


class WindowHeads(nn.Module):
    """Twins / SAM2 Hiera: channels-last windows (B, H, W, 3C) -> (B, H*W, 3, heads, d), the
    dims before the channel dim re-laid out too; merged back into (B, H, W, C)."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(a.transpose(1, 2).reshape(B, H, W, -1))


class SplitSum(nn.Module):
    """(B, 12, H, W) -> (B, 3, 2, 2, H, W) summed over the inner factors: the first carries the
    channels (the sum reads dims 2 and 3), each block of 4 channels goes whole."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 12, 1), nn.Conv2d(3, 2, 1)

    def forward(self, x):
        y = self.a(x)
        B, _, H, W = y.shape
        return self.b(y.view(B, 3, 2, 2, H, W).sum((2, 3)))


def _prepared(model):
    model = model.double().eval()
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model


def _transform(model, x, capture, ratio=0.5):
    model = _prepared(model)
    pruned = fxprune.transform(model, fxprune.Policy(ratio=ratio), (x,), capture=capture)
    fresh = torch.randn_like(x)
    check = fxprune.verify(pruned, inputs=(fresh,))
    assert check.exact and check.max_error <= 1e-9, check.max_error
    with torch.no_grad():
        assert pruned(fresh).shape == model(fresh).shape
    return pruned, pruned.meta["fxprune"]


def _pruned_groups(plan):
    return sorted((g.size, g.kept) for g in plan.groups if g.removed)


@pytest.mark.parametrize("capture", CAPTURES)
def test_unflatten_view_gives_each_conv_channel_its_block_of_features(capture):
    pruned, plan = _transform(Unflatten(), torch.randn(2, 8, dtype=torch.float64), capture)
    assert _pruned_groups(plan) == [(16, 8)]
    assert pruned.fc.out_features == 32 and pruned.conv.in_channels == 8
    fc = next(v for k, v in plan.removed_channels().items() if k.startswith("fc") or "linear" in k)
    blocks = {i // 4 for i in fc[1]}
    assert sorted(fc[1]) == sorted(4 * b + j for b in blocks for j in range(4))  # whole blocks of 4


@pytest.mark.parametrize("capture", CAPTURES)
def test_torch_pruning_reshape_model(capture):
    pruned, plan = _transform(TPReshape(), torch.randn(1, 512, dtype=torch.float64), capture)
    assert _pruned_groups(plan) == [(64, 32), (128, 64), (256, 128)]
    shapes = [tuple(pruned.get_parameter(f"{m}.weight").shape) for m in ("fc", "up1", "head")]
    assert shapes == [(2048, 512), (128, 64, 4, 4), (10, 8192)]


@pytest.mark.parametrize("capture", CAPTURES)
def test_radix_split_removes_the_same_channels_from_every_slice(capture):
    pruned, plan = _transform(RadixSplit(), torch.randn(2, 3, 5, 5, dtype=torch.float64), capture)
    assert (6, 3) in _pruned_groups(plan)
    assert pruned.conv.out_channels == 6 and pruned.out.in_channels == 3
    removed = plan.removed_channels()
    conv = next(v for k, v in removed.items() if k == "conv" or k.startswith("conv2d"))[1]
    first = [i for i in conv if i < 6]
    assert conv == first + [i + 6 for i in first]  # radix slice 1 loses what slice 0 loses


@pytest.mark.parametrize("capture", CAPTURES)
def test_conv_qkv_split_into_heads_and_merged_back(capture):
    pruned, plan = _transform(ConvHeads(), torch.randn(1, 3, 3, 3, dtype=torch.float64), capture)
    assert (2, 1) in _pruned_groups(plan)  # one of 2 heads
    assert pruned.qkv.out_channels == 12 and pruned.proj.in_channels == 4


@pytest.mark.parametrize("capture", CAPTURES)
def test_channels_last_window_heads_with_the_leading_dims_re_laid_out(capture):
    _, plan = _transform(WindowHeads(), torch.randn(2, 2, 3, 8, dtype=torch.float64), capture)
    assert (2, 1) in _pruned_groups(plan)


@pytest.mark.parametrize("capture", CAPTURES)
def test_split_whose_inner_factor_is_summed_keeps_whole_outer_blocks(capture):
    pruned, plan = _transform(SplitSum(), torch.randn(1, 3, 2, 2, dtype=torch.float64), capture)
    assert _pruned_groups(plan) == [(3, 2)]  # ratio 0.5 of 3 blocks
    assert pruned.a.out_channels == 8 and pruned.b.in_channels == 2


class Unflattens(nn.Module):
    """nn.Unflatten and Tensor.unflatten (with -1) splitting a Linear's features into conv channels."""

    def __init__(self):
        super().__init__()
        self.fc, self.up = nn.Linear(8, 64), nn.Unflatten(1, (16, 2, 2))
        self.a, self.b = nn.Conv2d(16, 8, 1), nn.Conv2d(2, 3, 1)

    def forward(self, x):
        y = self.a(self.up(self.fc(x)))               # (B, 8, 2, 2)
        return self.b(y.flatten(1).unflatten(1, (-1, 2, 2, 2)).sum(1))  # (B, 4, 2, 2, 2) summed over dim 1


@pytest.mark.parametrize("capture", CAPTURES)
def test_unflatten_module_and_method_write_the_kept_width(capture):
    pruned, plan = _transform(Unflattens(), torch.randn(2, 8, dtype=torch.float64), capture)
    # a's channel 2i + j lands at (i, j) of the (4, 2) factors; the sum goes over i and b reads j:
    # j carries the channels, each a block of 4 of a's channels
    assert _pruned_groups(plan) == [(2, 1), (16, 8)]
    assert pruned.fc.out_features == 32 and pruned.a.in_channels == 8 and pruned.a.out_channels == 4
    assert pruned.b.in_channels == 1
    if capture == "fx":
        assert "unflatten(1, (8, 2, 2))" in pruned.code


def test_single_channel_dim_is_blocked_with_the_reason():
    class Spread(nn.Module):  # ECA-style: a 1-channel conv1d output laid out as 8 channels
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Conv1d(1, 1, 3, padding=1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.c(self.a(x).view(1, 8, 1, 1))

    plan = fxprune.plan(Spread(), fxprune.Policy(ratio=0.5), (torch.randn(1, 1, 8),))
    notes = [g.note for g in plan.groups if g.blocked]
    assert any("view" in n and "single channel" in n for n in notes), notes


def test_reshape_grid_blocks():
    from fxprune.coupling.regrid import channel_block
    assert channel_block((1, 1024, 1, 1), (1, 1, 2, 512), 1) == (1, 2, 2, 4)
    assert channel_block((16, 14, 14, 2304), (16, 196, 3, 8, 96), 3) == (3, 4, 2, 5)
    assert channel_block((1, 1, 256, 49), (1, 256, 7, 7), 2) == (2, 3, 1, 2)
    assert channel_block((1, 6, 4), (1, 3, 8), 1) == (1, 3, 1, 3)
    assert channel_block((1, 1, 8), (1, 8, 1, 1), 1) is None


@pytest.mark.parametrize("name,size", [("resnest14d", 64), ("visformer_tiny", 64)])
def test_timm_models_prune_through_their_channel_splits(name, size):
    timm = pytest.importorskip("timm")
    kwargs = {"img_size": size} if name.startswith("visformer") else {}
    model = timm.create_model(name, pretrained=False, num_classes=4, **kwargs).double().eval()
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5, exact_only=True), (x,), capture="fx")
    blocked = [g.note for g in plan.groups if g.blocked and "model output" not in (g.note or "")]
    assert not any("reshapes the channel dim" in n for n in blocked), blocked
    pruned = fxprune.apply(plan)
    check = fxprune.verify(pruned, inputs=(x,))
    assert check.max_error <= 1e-9 and any(g.removed for g in plan.groups)
