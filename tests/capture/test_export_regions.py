"""Context-manager regions in forward under the export front end: ``torch.autocast(...,
enabled=False)`` and grad-mode blocks are inlined (their ops meet the op table, nothing blocks),
an enabled autocast stays one op and blocks with a reason naming it; oracle in float64."""
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.blocked import blocked_summary
from fxprune.capture.export import capture_export
from fxprune.capture.regions import AUTOCAST, SET_GRAD

POLICY = fxprune.Policy(ratio=0.5, exact_only=True)


class AutocastOff(nn.Module):
    """A conv and a linear inside ``torch.autocast("cpu", enabled=False)`` (timm LiteMLA's pattern)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        y = self.stem(x)
        with torch.autocast("cpu", enabled=False):
            y = self.mid(y).relu()
            z = self.fc(y.mean((2, 3)))
        return self.head(z)


class NoGrad(nn.Module):
    """``torch.no_grad()`` inside forward, with a disabled autocast nested in it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        with torch.no_grad():
            z = y * 2
            with torch.autocast("cpu", enabled=False):
                z = self.b(z)
        return self.c(y + z)


class AutocastOn(nn.Module):
    """An enabled autocast region around a conv: it changes dtypes, so it stays whole."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = self.b(y)
        return self.c(z.float() + y)


def _regions(gm):
    return [n for n in gm.graph.nodes if n.target in (AUTOCAST, SET_GRAD)]


@pytest.mark.parametrize("cls, modules", [(AutocastOff, {"stem", "mid", "fc", "head"}),
                                          (NoGrad, {"a", "b", "c"})])
def test_region_inlined_and_pruned_exactly(cls, modules):
    torch.manual_seed(0)
    model = cls().double().eval()
    x = (torch.randn(2, 3, 8, 8, dtype=torch.float64),)
    gm = capture_export(model, x)
    assert _regions(gm) == []
    # the region's conv/linear came back as modules with the model's parameter names
    assert {n.target for n in gm.graph.nodes if n.op == "call_module"} == modules
    assert sorted(gm.state_dict()) == sorted(model.state_dict())
    torch.testing.assert_close(gm(*x), model(*x), rtol=0, atol=0)

    plan = fxprune.plan(model, POLICY, x, capture="export")
    summary = blocked_summary(plan)
    assert summary.blocked == 0 and summary.channels > 0, summary.line()
    assert any(g.removed for g in plan.groups)
    pruned = fxprune.apply(plan)
    result = fxprune.verify(pruned, x)
    assert result.ok and result.exact, result
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_enabled_autocast_stays_and_blocks_with_its_reason():
    torch.manual_seed(0)
    model = AutocastOn().eval()
    x = (torch.randn(2, 3, 8, 8),)
    gm = capture_export(model, x)
    (region,) = _regions(gm)
    assert region.target is AUTOCAST and region.args[2] is True
    torch.testing.assert_close(gm(*x), model(*x))

    plan = fxprune.plan(model, POLICY, x, capture="export")
    summary = blocked_summary(plan)
    (cause,) = summary.causes
    assert cause.op == "wrap_with_autocast"
    assert cause.reason.startswith("autocast region (enabled) changes dtypes: "
                                   "torch.autocast('cpu', dtype=torch.bfloat16)"), cause.reason
    assert summary.blocked == 8  # the region's input and output channels (one group, y + z)
    assert fxprune.verify(fxprune.apply(plan), x).ok
