"""Real models nobody here wrote, one or more per library (the full sweep is
benchmarks/zoo_coverage.py): captured (mostly by torch.export), pruned, exact under the mask
oracle in float64, same output structure and parameter names, runnable and exportable."""
import copy

import pytest
import torch
import torch.utils._pytree as pytree

import fxprune
from fxprune import model_zoo
from fxprune.cost import count

pytestmark = pytest.mark.filterwarnings("ignore")


def _structure(out):
    return pytree.tree_map(lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else t,
                           out, is_leaf=lambda t: isinstance(t, torch.Tensor))


def _tensors_anywhere(module: torch.nn.Module) -> list[str]:
    """Meta or fake tensors left in any module attribute (cached anchors included)."""
    bad = []
    for name, mod in module.named_modules():
        for key, value in vars(mod).items():
            for t in pytree.tree_leaves(value):
                if isinstance(t, torch.Tensor) and (t.is_meta or "Fake" in type(t).__name__):
                    bad.append(f"{name}.{key}")
    return bad


def _exact_in_float64(model, inputs, frontend):
    m64 = copy.deepcopy(model).double()
    x64 = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    pruned = fxprune.transform(m64, fxprune.Policy(ratio=0.5, exact_only=True), x64, capture=frontend)
    # HF's RMSNorm computes in float32 whatever the model's dtype: float32 rounding, not pruning error
    tolerance = 1e-6 if any("RMSNorm" in type(m).__name__ for m in model.modules()) else None
    result = fxprune.verify(pruned, inputs=x64, tolerance=tolerance)
    assert result.ok and result.compared >= 1, result
    return pruned


def _prune_and_check(model, inputs, frontend="export"):
    with torch.no_grad():
        expected = model(*inputs)
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5), inputs)
    plan = pruned.meta["fxprune"]
    assert plan.capture["frontend"] == frontend, plan.capture
    assert sorted(pruned.state_dict()) == sorted(model.state_dict())
    pruned.train(model.training)
    with torch.no_grad():
        got = pruned(*inputs)
    assert type(got) is type(expected) and _structure(got) == _structure(expected)
    assert not _tensors_anywhere(pruned)
    assert count(pruned)["params"] < count(plan.traced)["params"]
    _exact_in_float64(model, inputs, frontend)
    return pruned


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_transformers(name):
    pytest.importorskip("transformers")
    model, inputs = model_zoo.transformers_model(name)
    pruned = _prune_and_check(model, inputs)
    widths = [m.out_features for n, m in pruned.named_modules()
              if n.endswith(("intermediate.dense", "mlp.up_proj"))]
    assert widths and all(w == 64 for w in widths), widths  # MLP widths halved (128 -> 64)
    kinds = {g.kind for g in pruned.meta["fxprune"].groups if g.removed}
    assert {"mlp", "head" if name == "bert" else "kv-group"} <= kinds, kinds
    if name == "llama":  # the hidden size goes too: embedding columns, every RMSNorm, q/k/v/gate/up inputs
        assert "hidden" in kinds and pruned.get_submodule("model.embed_tokens").embedding_dim == 32


def test_ultralytics_yolo_eval_and_train():
    pytest.importorskip("ultralytics")
    model, inputs = model_zoo.ultralytics_model("yolov8n")
    pruned = _prune_and_check(model, inputs)
    plan = pruned.meta["fxprune"]
    assert count(pruned)["macs"] <= 0.6 * count(plan.traced)["macs"]
    model.train()
    trained = fxprune.transform(model, fxprune.Policy(ratio=0.5), inputs)
    out, ref = trained(*inputs), model(*inputs)
    assert trained.training and _structure(out) == _structure(ref)
    trained.eval()
    assert _structure(trained(*inputs))  # runs in the other mode too


def test_smp_fpn_without_switching_off_its_input_check():
    pytest.importorskip("segmentation_models_pytorch")
    model, inputs = model_zoo.smp_model("FPN")
    pruned = _prune_and_check(model, inputs)
    with pytest.raises(RuntimeError):  # its input check is still there for the original
        model(torch.randn(1, 3, 60, 60))
    assert pruned(*inputs).shape == (1, 1, 64, 64)


def test_timm_model_that_fx_cannot_trace():
    pytest.importorskip("timm")
    import timm
    torch.manual_seed(0)
    model = timm.create_model("mobilevit_xxs", pretrained=False).eval()
    inputs = (torch.randn(1, 3, 64, 64),)
    pruned = _prune_and_check(model, inputs)
    assert "torch.fx failed" in pruned.meta["fxprune"].capture["reason"]


def test_timm_model_that_fx_traces_stays_on_fx():
    pytest.importorskip("timm")
    import timm
    model = timm.create_model("resnet10t", pretrained=False).eval()
    _prune_and_check(model, (torch.randn(1, 3, 64, 64),), frontend="fx")


def test_export_captured_pruned_model_exports_and_saves(tmp_path):
    pytest.importorskip("segmentation_models_pytorch")
    pytest.importorskip("onnxruntime")
    model, inputs = model_zoo.smp_model("DeepLabV3Plus")
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5), inputs)
    assert pruned.meta["fxprune"].capture["frontend"] == "export"
    path = fxprune.exporters.export(pruned, tmp_path / "m.onnx", inputs, format="onnx")
    assert fxprune.exporters.check_onnx(path, pruned, inputs) < 1e-4
    program = torch.export.export(pruned, inputs, strict=False)
    torch.testing.assert_close(program.module()(*inputs), pruned(*inputs))
    fxprune.save(pruned, tmp_path / "m.pt", inputs)
    torch.testing.assert_close(fxprune.load(tmp_path / "m.pt")(*inputs), pruned(*inputs))


def test_timm_volo_reshape_from_a_shrinking_width_keeps_its_traced_size():
    """VOLO reshapes qkv to (B, N, 3, heads, C // heads) with C read from the pruned stream: the
    computed entry keeps its traced size instead of following the stream's new width."""
    pytest.importorskip("timm")
    import timm
    torch.manual_seed(0)
    model = timm.create_model("volo_d1_224", pretrained=False).eval()
    inputs = (torch.randn(1, 3, 224, 224),)
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5, exact_only=True), inputs)
    assert fxprune.verify(pruned).ok
    assert count(pruned)["params"] < count(pruned.meta["fxprune"].traced)["params"]
