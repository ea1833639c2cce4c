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


class AutocastOn(NoGrad):
    """An enabled autocast region around a conv (NoGrad's layers): it changes dtypes, so it stays whole."""

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


def _dtypes_under_autocast(module, x, names):
    """Output dtype of each named submodule when ``module`` runs under an enabled bfloat16 autocast."""
    seen = {}
    hooks = [module.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.dtype))
             for n in names]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(*x)
    finally:
        for h in hooks:
            h.remove()
    return seen, out


class AutocastOffFloat(AutocastOff):
    """timm LiteMLA's full pattern: the region casts its input to float32 first."""

    def forward(self, x):
        y = self.stem(x)
        with torch.autocast("cpu", enabled=False):
            y = self.mid(y.float()).relu()
            z = self.fc(y.mean((2, 3)))
        return self.head(z)


def test_inlined_disabled_autocast_still_keeps_its_ops_out_of_a_callers_autocast():
    """The region's ops are bracketed by _enter_autocast/_exit_autocast nodes: under a caller's
    bfloat16 autocast, the pruned module runs them in float32 as the original does, and the
    brackets survive the rewrite and a re-export."""
    torch.manual_seed(0)
    model = AutocastOffFloat().eval()
    x = (torch.randn(2, 3, 8, 8),)
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5), x, capture="export")
    targets = [n.target for n in pruned.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.amp._enter_autocast) == 1 and targets.count(torch.amp._exit_autocast) == 1
    order = [n.target for n in pruned.graph.nodes if n.op == "call_module" or
             n.target in (torch.amp._enter_autocast, torch.amp._exit_autocast)]
    assert order == ["stem", torch.amp._enter_autocast, "mid", "fc", torch.amp._exit_autocast, "head"]
    original, out = _dtypes_under_autocast(model, x, ["stem", "mid", "fc", "head"])
    kept, pruned_out = _dtypes_under_autocast(pruned, x, ["stem", "mid", "fc", "head"])
    assert original == kept == {"stem": torch.bfloat16, "mid": torch.float32, "fc": torch.float32,
                                "head": torch.bfloat16}
    assert pruned_out.dtype == out.dtype
    assert not torch.is_autocast_enabled("cpu")  # every region entered was left
    assert fxprune.verify(pruned, x).ok
    again = torch.export.export(pruned, x, strict=False).module()
    torch.testing.assert_close(again(*x), pruned(*x))
