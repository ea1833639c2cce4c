"""timm's layers under FX: those timm registers as not traceable (Conv2dSame, BatchNormAct2d,
MaxPool2dSame, ...) and fxprune has a row for are kept whole from the start; where one is not
(``no_default_leaves``: a layer outside that set), FX failing inside it is retried with it kept
whole before torch.export."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.capture import CaptureInfo, capture, timm_leaf_retry
from fxprune.errors import FxPruneError, TraceError
from oracle_helpers import prune_verified

timm = pytest.importorskip("timm")
import timm.layers as tl  # noqa: E402
from timm.layers.pool2d_same import MaxPool2dSame  # noqa: E402

from fxprune.coupling.timm_rules import leaf_types  # noqa: E402

X = (torch.randn(1, 3, 16, 16),)
EXACT = dict(exact_only=True, max_error=1e-9)  # float64, exact groups only, oracle within 1e-9


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


@pytest.fixture
def no_default_leaves(monkeypatch):
    """FX traces through every timm layer first, as it does for a layer not kept whole by
    default: the retry below is what then keeps it whole."""
    import fxprune.capture as capture_module
    monkeypatch.setattr(capture_module, "_default_timm_leaves", lambda model, leaf_modules: ((), ()))


def test_timm_registered_layers_are_kept_whole_from_the_start():
    plan = fxprune.plan(_net(), fxprune.Policy(ratio=0.5), X)
    info = plan.capture
    assert info["frontend"] == "fx" and info["fx_error"] is None
    assert info["timm_leaves"] == ["Conv2dSame", "BatchNormAct2d", "MaxPool2dSame"]
    assert info["reason"] == ("torch.fx traced the model (the fast path) with timm's leaf layers (Conv2dSame, "
                              "BatchNormAct2d, MaxPool2dSame) kept whole, as timm registers them for torch.fx")
    calls = [n.target for n in plan.traced.graph.nodes if n.op == "call_module"]
    assert calls == ["conv", "bn", "pool", "eca", "head"]  # eca: an nn.Identity here
    pruned = fxprune.apply(plan)
    assert pruned.conv.out_channels == 4 and pruned.bn.num_features == 4 and pruned.head.in_channels == 4
    assert fxprune.verify(pruned).ok
    assert prune_verified(_net(), X, **EXACT)[1].bn.weight.shape == (4,)


def test_kept_whole_prunes_what_tracing_through_prunes(monkeypatch):
    """BatchNormAct2d kept whole or traced through: the same channels go, the same outputs."""
    import fxprune.capture as capture_module
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), tl.BatchNormAct2d(8), nn.Conv2d(8, 8, 3, groups=8),
                          tl.BatchNormAct2d(8, act_layer=nn.SiLU), nn.Conv2d(8, 4, 1)).eval()
    for bn in (model[1], model[3]):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    whole = fxprune.apply(fxprune.plan(model, fxprune.Policy(ratio=0.5), X))
    assert whole.meta["fxprune"].capture["timm_leaves"] == ["BatchNormAct2d"]
    monkeypatch.setattr(capture_module, "_default_timm_leaves", lambda model, leaf_modules: ((), ()))
    through = fxprune.apply(fxprune.plan(model, fxprune.Policy(ratio=0.5), X))
    assert through.meta["fxprune"].capture["timm_leaves"] == []
    assert not any(n.op == "call_module" and n.target == "1" for n in through.graph.nodes)
    assert {k: v.shape for k, v in whole.named_parameters()} == {k: v.shape for k, v in through.named_parameters()}
    assert torch.equal(whole(*X), through(*X))


@pytest.mark.parametrize("fmt", ["torchscript-script", "onnx"])
def test_a_pruned_model_with_timm_leaves_exports(tmp_path, fmt):
    """The leaves stay timm's own modules in the pruned GraphModule (Conv2dSame's padding is
    computed from the input at run time): TorchScript scripts them, ONNX exports them, and both
    give the pruned module's outputs."""
    from fxprune.exporters import check_onnx, export
    pruned = fxprune.transform(_net(), fxprune.Policy(ratio=0.5), X)
    assert isinstance(pruned.conv, tl.Conv2dSame) and isinstance(pruned.pool, MaxPool2dSame)
    scripted = None if fmt == "onnx" else torch.jit.load(str(export(pruned, tmp_path / "m.pt", X, format=fmt)))
    for size in (16, 19):  # a second size: the same-padding is not baked for the example input
        x = (torch.randn(1, 3, size, size),)
        if scripted is None:  # ONNX: one file per input size
            path = export(pruned, tmp_path / f"m{size}.onnx", x, format="onnx")
            assert check_onnx(path, pruned, x, rtol=1e-4) <= 1e-4
        else:
            with torch.no_grad():
                assert torch.allclose(scripted(*x), pruned.eval()(*x), atol=1e-5)


def test_a_norm_whose_act_its_row_would_block_is_traced_through():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), tl.BatchNormAct2d(8), tl.BatchNormAct2d(8, act_layer=nn.Softmax2d),
                          nn.Conv2d(8, 4, 1)).eval()
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5), X)
    modules = {n.target for n in plan.traced.graph.nodes if n.op == "call_module"}
    assert "1" in modules and "2" not in modules and "2.act" in modules  # its softmax is traced as what it is
    assert plan.capture["timm_leaves"] == ["BatchNormAct2d"]


def test_fx_fails_inside_conv2d_same_and_is_retried_with_timm_leaves(no_default_leaves):
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
    _, pruned64 = prune_verified(_net(), X, **EXACT)
    assert pruned64.meta["fxprune"].capture["frontend"] == "fx" and pruned64.head.in_channels == 4


def test_timm_model_with_same_padding_stays_on_fx():
    """Kept whole from the start: FX never fails inside them."""
    torch.manual_seed(0)
    model = timm.create_model("tf_mobilenetv3_small_minimal_100", pretrained=False, num_classes=10).eval()
    inputs = (torch.randn(1, 3, 64, 64),)
    _, pruned = prune_verified(model, inputs, **EXACT)
    info = pruned.meta["fxprune"].capture
    assert info["frontend"] == "fx" and info["fx_error"] is None
    assert info["timm_leaves"] == ["Conv2dSame", "BatchNormAct2d"]
    assert pruned.meta["fxprune"].removed_channels()  # it pruned


def test_a_layer_without_a_rule_or_not_registered_by_timm_is_never_a_leaf():
    assert leaf_types(_net(eca=True)) == (tl.Conv2dSame, tl.BatchNormAct2d, MaxPool2dSame)
    assert leaf_types(nn.Sequential(tl.EcaModule(8), tl.LayerNorm2d(8), tl.Swish())) == ()
    assert leaf_types(nn.Sequential(nn.Conv2d(3, 8, 3))) == ()


def test_leaves_the_user_gave_are_not_listed_again(no_default_leaves):
    plan = fxprune.plan(_net(), fxprune.Policy(ratio=0.5), X, leaf_modules=[tl.Conv2dSame])
    assert plan.capture["frontend"] == "fx" and plan.capture["timm_leaves"] == ["MaxPool2dSame"]


def test_leaves_the_user_gave_are_not_listed_as_default_leaves():
    plan = fxprune.plan(_net(), fxprune.Policy(ratio=0.5), X, leaf_modules=[tl.Conv2dSame])
    assert plan.capture["timm_leaves"] == ["BatchNormAct2d", "MaxPool2dSame"]


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


def test_capture_fx_asked_for_is_retried_with_timm_leaves_and_stays_on_fx(no_default_leaves):
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


def test_shapes_failure_of_the_fx_graph_is_retried_with_timm_leaves(monkeypatch, no_default_leaves):
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
