"""capture="auto": FX failing inside timm's layers that compute "same" padding in Python
(Conv2dSame, MaxPool2dSame, ...) is retried with those layers kept whole before torch.export."""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.capture import CaptureInfo, capture, timm_leaf_retry
from fxprune.errors import FxPruneError, TraceError

timm = pytest.importorskip("timm")
import timm.layers as tl  # noqa: E402
from timm.layers.pool2d_same import MaxPool2dSame  # noqa: E402

from fxprune.coupling.timm_rules import leaf_types  # noqa: E402

X = (torch.randn(1, 3, 16, 16),)


class SameNet(nn.Module):
    """Conv2dSame and MaxPool2dSame (both fail FX), a BatchNormAct2d (FX traces it), an EcaModule
    (no leaf: its channels are blocked by its own rule whatever the capture)."""

    def __init__(self, eca=False):
        super().__init__()
        self.conv = tl.Conv2dSame(3, 8, 3, stride=2)
        self.bn = tl.BatchNormAct2d(8)
        self.pool = MaxPool2dSame(3, stride=2)
        self.eca = tl.EcaModule(8) if eca else nn.Identity()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.eca(self.pool(self.bn(self.conv(x)))))


def _net(**kw):
    torch.manual_seed(0)
    return SameNet(**kw).eval()


def _exact_in_float64(model, inputs):
    pruned = fxprune.transform(copy.deepcopy(model).double(), fxprune.Policy(ratio=0.5, exact_only=True),
                               tuple(t.double() for t in inputs))
    result = fxprune.verify(pruned)
    assert result.ok and result.max_error <= 1e-9
    return pruned


def test_fx_fails_inside_conv2d_same_and_is_retried_with_timm_leaves():
    plan = fxprune.plan(_net(), fxprune.Policy(ratio=0.5), X)
    info = plan.capture
    assert info["frontend"] == "fx" and info["requested"] == "auto"
    # the retry that kept Conv2dSame whole failed next inside MaxPool2dSame, which was added;
    # BatchNormAct2d, traced through, stays traced through
    assert info["timm_leaves"] == ["Conv2dSame", "MaxPool2dSame"]
    assert "cannot be used as inputs to control flow" in info["fx_error"]
    assert info["reason"].startswith("torch.fx with timm's leaf layers (Conv2dSame, MaxPool2dSame) kept whole")
    assert "Captured with torch.fx: torch.fx with timm's leaf layers" in fxprune.explain(plan)
    assert type(plan.traced.get_submodule("conv")) is tl.Conv2dSame  # a leaf, not traced through
    assert not plan.blocked_ops
    pruned = fxprune.apply(plan)
    assert pruned.conv.out_channels == 4 and pruned.bn.weight.shape == (4,)  # traced through
    assert fxprune.verify(pruned).ok
    pruned64 = _exact_in_float64(_net(), X)
    assert pruned64.meta["fxprune"].capture["frontend"] == "fx" and pruned64.head.in_channels == 4


def test_timm_model_with_same_padding_stays_on_fx():
    torch.manual_seed(0)
    model = timm.create_model("tf_mobilenetv3_small_minimal_100", pretrained=False, num_classes=10).eval()
    inputs = (torch.randn(1, 3, 64, 64),)
    pruned = _exact_in_float64(model, inputs)
    info = pruned.meta["fxprune"].capture
    assert info["frontend"] == "fx" and info["timm_leaves"] == ["Conv2dSame"]
    assert pruned.meta["fxprune"].removed_channels()  # it pruned


def test_a_layer_without_a_rule_or_not_registered_by_timm_is_never_a_leaf():
    assert leaf_types(_net(eca=True)) == (tl.Conv2dSame, tl.BatchNormAct2d, MaxPool2dSame)
    assert leaf_types(nn.Sequential(tl.EcaModule(8), tl.LayerNorm2d(8), tl.Swish())) == ()
    assert leaf_types(nn.Sequential(nn.Conv2d(3, 8, 3))) == ()


def test_leaves_the_user_gave_are_not_listed_again():
    plan = fxprune.plan(_net(), fxprune.Policy(ratio=0.5), X, leaf_modules=[tl.Conv2dSame])
    assert plan.capture["frontend"] == "fx" and plan.capture["timm_leaves"] == ["MaxPool2dSame"]


class BranchOnValues(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = tl.Conv2dSame(3, 8, 3)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        if x.shape[-1] > 8:  # FX fails here, outside every timm layer; export specialises it
            x = -x
        return self.head(self.conv(x))


class Branch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x) if x.shape[-1] > 2 else x


def test_a_failure_outside_timm_layers_falls_back_to_export_without_a_retry():
    with pytest.raises(TraceError) as err:
        capture(BranchOnValues(), X, how="fx")
    assert err.value.failed_inside == ()
    assert timm_leaf_retry(BranchOnValues(), (), None, err.value, err.value.failed_inside) is None
    gm, info = capture(BranchOnValues(), X)
    assert info.frontend == "export" and info.timm_leaves == ()
    assert info.reason.startswith("torch.fx failed")


def test_capture_fx_asked_for_is_retried_with_timm_leaves_and_stays_on_fx():
    gm, info = capture(_net(), X, how="fx")
    assert info.frontend == "fx" and info.requested == "fx"
    assert info.timm_leaves == ("Conv2dSame", "MaxPool2dSame")
    assert info.reason.startswith("capture='fx' was asked for; torch.fx with timm's leaf layers")
    plan = fxprune.plan(_net(), fxprune.Policy(ratio=0.5), X, capture="fx")
    assert plan.capture["requested"] == "fx" and plan.capture["timm_leaves"] == ["Conv2dSame", "MaxPool2dSame"]
    assert fxprune.verify(fxprune.apply(plan)).ok


def test_capture_fx_asked_for_still_raises_where_timm_leaves_do_not_help():
    with pytest.raises(TraceError) as err:  # through the public entry point, not only capture()
        fxprune.plan(BranchOnValues(), fxprune.Policy(ratio=0.5), X, capture="fx")
    assert err.value.failed_inside == ()  # FX failed outside every timm layer: nothing to retry


def test_shapes_failure_of_the_fx_graph_is_retried_with_timm_leaves(monkeypatch):
    """An FX graph that traced through a timm layer but does not run: the layers kept whole
    (here BatchNormAct2d, which FX traces) before torch.export is tried."""
    import fxprune.analysis as analysis
    real = analysis.propagate

    def propagate(gm, inputs):
        if not any(isinstance(m, tl.BatchNormAct2d) for m in gm.modules()):
            raise FxPruneError("the graph did not run")
        return real(gm, inputs)

    monkeypatch.setattr(analysis, "propagate", propagate)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), tl.BatchNormAct2d(8), nn.Conv2d(8, 4, 1)).eval()
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5), X)
    info = pruned.meta["fxprune"].capture
    assert info["frontend"] == "fx" and info["timm_leaves"] == ["BatchNormAct2d"]
    assert "the FX graph did not run" in info["fx_error"]
    assert fxprune.verify(pruned).ok and getattr(pruned, "1").num_features == 4


def test_capture_info_says_why():
    info = CaptureInfo("fx", "auto", "control flow", ("Conv2dSame",))
    assert info.to_dict()["timm_leaves"] == ["Conv2dSame"]
    assert CaptureInfo("fx").to_dict()["timm_leaves"] == []


def test_timm_is_not_imported_for_a_model_without_timm_layers(monkeypatch):
    """timm is imported only by timm_rules' table and timm's registry: neither is reached for a
    model without timm layers, however FX fails (inside a module, outside, or at shapes)."""
    import fxprune.coupling.timm_rules as rules

    def imports_timm(*args):
        raise AssertionError("timm's table was read for a model without timm layers")

    monkeypatch.setattr(rules, "_table", imports_timm)
    monkeypatch.setattr(rules, "_notrace_modules", imports_timm)
    m = nn.Sequential(nn.Conv2d(3, 4, 1))
    assert timm_leaf_retry(m, (), None, TraceError("x")) is None
    assert timm_leaf_retry(m, (), None, TraceError("x"), (nn.Conv2d,)) is None
    plan = fxprune.plan(Branch(), fxprune.Policy(ratio=0.5), X)
    assert plan.capture["frontend"] == "export" and plan.capture["timm_leaves"] == []


def test_importing_fxprune_does_not_import_timm():
    code = "import sys, fxprune\nassert 'timm' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
