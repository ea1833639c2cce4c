"""The two front ends: what each captures, what auto picks and records, and what the export
front end's graph keeps of the model (names, modules, modes, buffers, output structure)."""
import collections

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.capture import capture
from fxprune.errors import FxPruneError, TraceError

X = (torch.randn(2, 3, 16, 16),)


class ShapeChecked(nn.Module):
    """Python control flow on a shape: symbolic_trace fails, torch.export specialises it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        if x.shape[-1] % 2:
            raise ValueError("even widths only")
        y = F.relu(self.bn(self.conv1(x)))
        a, b = list(y.chunk(2, 1))
        return self.conv2(torch.cat([a, b], 1))


class ValueBranch(nn.Module):
    """A branch on tensor values: neither front end can capture it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y if y.sum() > 0 else -y


Pair = collections.namedtuple("Pair", "features logits")


class Structured(nn.Module):
    """Non-tensor output structure (dict, namedtuple, list) and a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 2, 1)
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError("NCHW")
        f = F.relu(self.bn(self.conv(x))) * self.scale
        h = self.head(f)
        return {"out": [h], "pair": (h.mean((2, 3)), h.sum())}


def _net():
    torch.manual_seed(0)
    return ShapeChecked().eval()


def test_auto_uses_fx_when_it_traces():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    plan = fxprune.plan(m, fxprune.Policy(ratio=0.5), X)
    assert plan.capture["frontend"] == "fx" and plan.capture["fx_error"] is None
    assert "Captured with torch.fx" in fxprune.explain(plan)


def test_auto_falls_back_to_export_and_says_why():
    pruned = fxprune.transform(_net(), fxprune.Policy(ratio=0.5), X)
    info = pruned.meta["fxprune"].capture
    assert info["frontend"] == "export" and info["requested"] == "auto"
    assert "symbolically traced variables cannot be used as inputs to control flow" in info["fx_error"]
    text = fxprune.explain(pruned.meta["fxprune"])
    assert "Captured with torch.export: torch.fx failed" in text
    assert fxprune.verify(pruned).ok
    assert pruned.conv1.out_channels == 4  # pruned, through the chunk + cat


def test_export_graph_keeps_modules_names_and_modes():
    model = _net()
    gm, info = capture(model, X, how="export")
    assert info.frontend == "export"
    assert isinstance(gm.get_submodule("bn"), nn.BatchNorm2d)  # lifted back, not F.batch_norm
    assert {n.op for n in gm.graph.nodes} <= {"placeholder", "get_attr", "call_module", "call_function",
                                              "call_method", "output"}
    assert not any(str(n.target).startswith("aten.") for n in gm.graph.nodes)
    assert sorted(gm.state_dict()) == sorted(model.state_dict())
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5), X, capture="export")
    assert sorted(pruned.state_dict()) == sorted(model.state_dict())
    before = pruned.bn.running_mean.clone()
    pruned.train()
    pruned(*X)  # BatchNorm follows .train() like the original: statistics move
    assert not torch.equal(before, pruned.bn.running_mean)
    assert int(pruned.bn.num_batches_tracked) == 1  # counted once, by the module


def test_model_in_train_mode_is_captured_in_train_mode():
    model = _net().train()
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5), X, capture="export")
    assert pruned.training and pruned.bn.training
    assert model.bn.num_batches_tracked == 0  # the user's model is never touched


def test_output_structure_and_buffer_kinds_are_kept():
    torch.manual_seed(0)
    model = Structured().eval()
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5), X, capture="export")
    out, ref = pruned(*X), model(*X)
    assert isinstance(out, dict) and isinstance(out["out"], list) and isinstance(out["pair"], tuple)
    assert out["out"][0].shape == ref["out"][0].shape
    assert "scale" not in pruned.state_dict() and sorted(pruned.state_dict()) == sorted(model.state_dict())
    assert pruned.conv.out_channels == 4
    assert fxprune.verify(pruned).ok


def test_custom_pytree_output_is_rebuilt():
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            f = self.a(x)
            return Pair(f, self.b(f))

    pruned = fxprune.transform(Named().eval(), fxprune.Policy(ratio=0.5), X, capture="export")
    out = pruned(*X)
    assert type(out) is Pair and out.logits.shape == (2, 4, 14, 14)


def test_neither_front_end_is_one_error_with_both_reasons():
    with pytest.raises(TraceError) as err:
        fxprune.plan(ValueBranch().eval(), fxprune.Policy(ratio=0.5), X)
    text = str(err.value)
    assert "torch.fx:" in text and "torch.export:" in text and "fix:" in text
    assert "ValueBranch" in text


def test_capture_fx_does_not_fall_back():
    with pytest.raises(TraceError, match="torch.fx could not trace ShapeChecked"):
        fxprune.plan(_net(), fxprune.Policy(ratio=0.5), X, capture="fx")


@pytest.mark.parametrize("bad", ["torchscript", None, 1])
def test_unknown_capture_mode_is_refused(bad):
    with pytest.raises(FxPruneError, match="is not a capture mode"):
        fxprune.plan(_net(), fxprune.Policy(ratio=0.5), X, capture=bad)


def test_export_front_end_results_match_fx_on_a_traceable_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    by_fx = fxprune.transform(m, fxprune.Policy(ratio=0.5), X, capture="fx")
    by_export = fxprune.transform(m, fxprune.Policy(ratio=0.5), X, capture="export")
    assert {k: v.shape for k, v in by_fx.state_dict().items()} == {k: v.shape for k, v in by_export.state_dict().items()}
    torch.testing.assert_close(by_fx(*X), by_export(*X))
