"""Slicing of the channel dim (offset map): ``x[:, :c]``, ``x[:, c:]``, negative bounds, steps,
``x[..., :c]`` on channel-last tensors, ``narrow``, integer indices; through torch.fx and
torch.export (ATen ``slice``/``narrow``/``select`` reach the same rule), checked by the mask oracle."""
import pytest
import torch
import torch.nn as nn

import fxprune
from oracle_helpers import blocked_reasons, prune_verified

CAPTURES = ["fx", "export"]


class DualPath(nn.Module):
    """DPN block: one conv feeds a residual part (first ``c`` channels) and a dense part (the rest)."""

    def __init__(self, c=6, dense=4):
        super().__init__()
        self.c = c
        self.proj = nn.Conv2d(3, c + dense, 1)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, c + 3, 1))
        self.head = nn.Conv2d(c + dense + 3, 5, 1)

    def forward(self, x):
        s = self.proj(x)
        s1, s2 = s[:, :self.c], s[:, self.c:]
        y = self.body(x)
        return self.head(torch.cat([s1 + y[:, :self.c], s2, y[:, self.c:]], dim=1))


class Ghost(nn.Module):
    """Ghost module: a primary conv, a cheap depthwise conv of it, both joined and cut to ``oup``."""

    def __init__(self, oup=7):
        super().__init__()
        self.oup = oup
        self.primary = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Conv2d(oup, 5, 1)

    def forward(self, x):
        x1 = self.primary(x)
        out = torch.cat([x1, self.cheap(x1)], dim=1)
        return self.head(out[:, :self.oup, :, :])


class Narrowed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1)
        self.b, self.c, self.d = nn.Conv2d(4, 5, 1), nn.Conv2d(3, 5, 1), nn.Conv2d(2, 5, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(torch.narrow(y, 1, 2, 4)) + self.c(y.narrow(1, -3, 3)) + self.d(y.narrow(-3, 8, 2))


class NegativeBounds(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 10, 1)
        self.b, self.c, self.d = nn.Conv2d(6, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(y[:, 1:-3]) + self.c(y[:, -3:]) + self.d(y[:, -9:100][:, 2:6])


class ChannelLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 10)
        self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6)
        self.conv = nn.Conv2d(3, 8, 1)
        self.e = nn.Linear(5, 6)

    def forward(self, x):
        y = self.a(x)  # (B, N, 10): channels last
        z = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.b(y[..., :4]) + self.c(y[..., 4:]) + self.e(z[:, :, :, 3:])


class Stepped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1)
        self.b, self.c = nn.Conv2d(6, 4, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(y[:, ::2]) + self.c(y[:, 1:10:3])


class PickOne(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(y) * y[:, 5].unsqueeze(1) + y[:, -2].unsqueeze(1)


class RunTimeBound(nn.Module):
    """A bound read from the tensor's own size at run time (a graph node under torch.fx)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b, self.c, self.d = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.a(x)
        half = y.size(1) // 2
        return self.b(y[:, :half]) + self.c(y[:, half:]) + self.d(y.narrow(1, 2, y.size(1) - 4))


def _prune(model, inputs, capture, ratio=0.5):
    return prune_verified(model, inputs, capture, ratio, randomize_bn=True)


_blocked = blocked_reasons


def _group(plan, owner):
    return next(g for g in plan.groups if owner in {p.owner for p in g.producers})


IMAGE = (torch.randn(2, 3, 6, 6),)


@pytest.mark.parametrize("capture", CAPTURES)
def test_dual_path_split_by_slices_prunes_both_parts(capture):
    torch.manual_seed(0)
    plan, pruned = _prune(DualPath(), IMAGE, capture)
    assert not _blocked(plan)
    proj, body = _group(plan, "proj"), _group(plan, "body.3")
    assert proj is body and proj.removed  # s1 + y[:, :c] couples the first c channels of both
    assert pruned.get_submodule("proj").out_channels < 10
    assert pruned.get_submodule("body.3").out_channels < 9


@pytest.mark.parametrize("capture", CAPTURES)
def test_ghost_cut_to_oup_drops_the_unread_tail(capture):
    torch.manual_seed(0)
    plan, pruned = _prune(Ghost(), IMAGE, capture)
    assert not _blocked(plan)
    assert pruned.get_submodule("primary.0").out_channels < 4
    assert pruned.get_submodule("head").in_channels < 7


@pytest.mark.parametrize("capture", CAPTURES)
def test_narrow_is_an_offset_map(capture):
    torch.manual_seed(0)
    plan, pruned = _prune(Narrowed(), IMAGE, capture)
    assert not _blocked(plan)
    gone = set(plan.removed_channels()["a"][1])
    assert gone
    for name, read in (("b", range(2, 6)), ("c", range(9, 12)), ("d", range(8, 10))):
        assert pruned.get_submodule(name).in_channels == len(set(read) - gone)


@pytest.mark.parametrize("capture", CAPTURES)
def test_negative_and_clipped_bounds(capture):
    torch.manual_seed(0)
    plan, pruned = _prune(NegativeBounds(), IMAGE, capture)
    assert not _blocked(plan)
    assert _group(plan, "a").removed


@pytest.mark.parametrize("capture", CAPTURES)
def test_channel_last_slices_with_ellipsis(capture):
    torch.manual_seed(0)
    plan, pruned = _prune(ChannelLast(), (torch.randn(2, 4, 4, 3),), capture)
    assert not _blocked(plan)
    assert pruned.get_submodule("a").out_features < 10
    assert pruned.get_submodule("conv").out_channels < 8


@pytest.mark.parametrize("capture", CAPTURES)
def test_stepped_slice_is_exact(capture):
    torch.manual_seed(0)
    plan, pruned = _prune(Stepped(), IMAGE, capture)
    assert not _blocked(plan)
    assert pruned.get_submodule("a").out_channels < 12


@pytest.mark.parametrize("capture", CAPTURES)
def test_integer_index_pins_only_that_channel(capture):
    torch.manual_seed(0)
    plan, pruned = _prune(PickOne(), IMAGE, capture, ratio=0.75)
    g = _group(plan, "a")
    assert not g.blocked and g.removed
    assert set(g.pinned) == {5, 6}
    assert all("alone" in why for why in g.pinned.values())
    assert 5 not in g.removed and 6 not in g.removed


def test_bound_read_at_run_time_follows_the_output_size():
    torch.manual_seed(0)
    plan, pruned = _prune(RunTimeBound(), IMAGE, "fx")
    assert not _blocked(plan)
    assert pruned.get_submodule("a").out_channels < 8


def test_unknown_bounds_block_with_the_node_named():
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)

        def forward(self, x):
            y = self.a(x)
            return y[:, y.size(1) // 4: y.size(1) // 2] + y.narrow(1, y.size(1) // 4, 2)

    plan = fxprune.plan(Both(), fxprune.Policy(ratio=0.5), IMAGE, capture="fx")
    blocked = _blocked(plan)
    assert any("bounds computed at run time" in why and "'getitem'" in why for why in blocked)
    assert any("start computed at run time" in why and "'narrow'" in why for why in blocked)
    assert _group(plan, "a").blocked


def test_timm_dpn_and_ghostnet_verify():
    timm = pytest.importorskip("timm")
    from timm.models.dpn import DPN
    torch.manual_seed(0)
    dpn = DPN(k_sec=(1, 1, 1, 1), inc_sec=(4, 4, 4, 4), k_r=8, groups=4, num_init_features=8,
              small=True, b=True, num_classes=5)
    plan, pruned = _prune(dpn, (torch.randn(1, 3, 64, 64),), "fx")
    assert not _blocked(plan)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in dpn.parameters())
    ghost = timm.models.ghostnet.GhostNet([[[3, 8, 8, 0, 1]], [[3, 24, 12, 0, 2]], [[3, 36, 12, 0, 1]]],
                                          num_classes=5, width=1.0)
    plan, pruned = _prune(ghost, (torch.randn(1, 3, 64, 64),), "fx")
    assert not _blocked(plan)


def test_stepped_slice_beside_an_integer_index_blocks_with_the_reason():
    class StepInt(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)

        def forward(self, x):
            return self.a(x)[0, ::2]

    plan = fxprune.plan(StepInt(), fxprune.Policy(ratio=0.5), IMAGE, capture="fx")
    assert any("step 2 beside an integer index" in why and "'getitem'" in why for why in _blocked(plan))
