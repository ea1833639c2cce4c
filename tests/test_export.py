"""Deployment: every export format round-trips, ONNX matches onnxruntime, saved modules reload
without their defining code, and bad files give a LoadError that names the path."""
import importlib
import importlib.util
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from model_state import assert_unchanged, snapshot
from fxprune.exporters import (FORMATS, ExportError, LoadError, check_onnx, export, load, save)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))) + x)


class TupleAndDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        features = self.conv(x)
        pooled = features.mean((2, 3))
        return {"features": features, "logits": self.head(pooled)}, pooled * 2


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _case(name, traced):
    torch.manual_seed(0)
    model, x = {
        "conv_bn_relu": (ConvBnRelu(), torch.randn(2, 3, 8, 8)),
        "residual": (Residual(), torch.randn(2, 8, 8, 8)),
        "tuple_and_dict": (TupleAndDict(), torch.randn(2, 3, 8, 8)),
    }[name]
    model = _randomise_bn(model).eval()
    return (fx.symbolic_trace(model) if traced else model), (x,)


CASES = [(name, traced) for name in ("conv_bn_relu", "residual", "tuple_and_dict")
         for traced in (False, True)]
IDS = [f"{name}-{'fx' if traced else 'eager'}" for name, traced in CASES]


def _leaves(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _leaves(v)]
    return [t for v in value for t in _leaves(v)]


def _assert_same_outputs(got, expected, atol=0.0, rtol=0.0):
    got, expected = _leaves(got), _leaves(expected)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=atol, rtol=rtol)


@pytest.mark.parametrize("fmt", ["torchscript-trace", "torchscript-script"])
@pytest.mark.parametrize("name,traced", CASES, ids=IDS)
def test_torchscript_round_trip_gives_equal_outputs(tmp_path, fmt, name, traced):
    model, inputs = _case(name, traced)
    path = export(model, tmp_path / "model.pt", inputs, format=fmt)
    assert path.is_file()
    with torch.no_grad():
        _assert_same_outputs(torch.jit.load(str(path))(*inputs), model(*inputs))


@pytest.mark.parametrize("name,traced", CASES, ids=IDS)
def test_onnx_matches_onnxruntime_within_1e4(tmp_path, name, traced):
    model, inputs = _case(name, traced)
    path = export(model, tmp_path / "model.onnx", inputs, format="onnx")
    assert check_onnx(path, model, inputs, rtol=1e-4) <= 1e-4


def test_onnx_checked_independently_with_onnxruntime(tmp_path):
    import onnxruntime

    model, (x,) = _case("residual", traced=True)
    path = export(model, tmp_path / "model.onnx", (x,), format="onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    error = (torch.from_numpy(got) - expected).abs().max() / expected.abs().max()
    assert error <= 1e-4


def test_check_onnx_raises_when_the_model_differs_from_the_file(tmp_path):
    model, inputs = _case("conv_bn_relu", traced=False)
    path = export(model, tmp_path / "model.onnx", inputs, format="onnx")
    with torch.no_grad():
        model.conv.weight.mul_(1.5)
    with pytest.raises(ExportError, match="relative error"):
        check_onnx(path, model, inputs, rtol=1e-4)


def test_onnx_dynamo_exports_or_explains_what_is_missing(tmp_path):
    model, inputs = _case("conv_bn_relu", traced=True)
    if importlib.util.find_spec("onnxscript") is None:
        with pytest.raises(ExportError, match="onnxscript"):
            export(model, tmp_path / "model.onnx", inputs, format="onnx-dynamo")
        return
    path = export(model, tmp_path / "model.onnx", inputs, format="onnx-dynamo")
    assert check_onnx(path, model, inputs, rtol=1e-4) <= 1e-4


@pytest.mark.parametrize("name,traced", CASES, ids=IDS)
def test_torch_export_round_trip_gives_equal_outputs(tmp_path, name, traced):
    model, inputs = _case(name, traced)
    path = export(model, tmp_path / "model.pt2", inputs, format="torch-export")
    reloaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        _assert_same_outputs(reloaded(*inputs), model(*inputs), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["torchscript-trace", "onnx"])
def test_export_leaves_the_callers_model_untouched_and_exports_eval_mode(tmp_path, fmt):
    model, inputs = _case("conv_bn_relu", traced=False)
    model.train()
    before = snapshot(model)
    path = export(model, tmp_path / "model.bin", inputs, format=fmt)
    assert_unchanged(model, before)
    assert model.training
    if fmt == "onnx":
        assert check_onnx(path, model, inputs) <= 1e-4  # compared against eval mode
    else:
        with torch.no_grad():
            expected = model.eval()(*inputs)
        torch.testing.assert_close(torch.jit.load(str(path))(*inputs), expected, rtol=0, atol=0)


def test_unknown_format_lists_the_valid_ones(tmp_path):
    model, inputs = _case("conv_bn_relu", traced=False)
    with pytest.raises(ExportError) as info:
        export(model, tmp_path / "m", inputs, format="tflite")
    assert all(f in str(info.value) for f in FORMATS)


def test_failed_export_names_the_format_the_cause_and_a_hint(tmp_path):
    with pytest.raises(ExportError) as info:
        export(DataDependent(), tmp_path / "m.pt2", (torch.randn(3),), format="torch-export")
    err = info.value
    assert isinstance(err, ValueError) and err.format == "torch-export"
    assert "torch-export" in str(err) and "hint" in str(err) and err.hint
    assert isinstance(err.__cause__, Exception)


# --- save / load ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, traced", CASES, ids=IDS)
def test_save_load_round_trip_gives_equal_outputs_and_original_names(tmp_path, name, traced):
    model, inputs = _case(name, traced)
    path = save(model, tmp_path / "m.pt", inputs)
    loaded = load(path)
    assert isinstance(loaded, fx.GraphModule) and not loaded.training
    assert list(loaded.state_dict()) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    other_batch = (torch.randn(5, *inputs[0].shape[1:]),)  # the batch dimension stays dynamic
    with torch.no_grad():
        for x in (inputs, other_batch):
            _assert_same_outputs(loaded(*x), model(*x))


def test_saved_module_computes_eval_mode_and_the_callers_flags_are_kept(tmp_path):
    model, (x,) = _case("conv_bn_relu", traced=False)
    model.train()
    save(model, tmp_path / "m.pt", (x,))
    assert all(m.training for m in model.modules())
    loaded = load(tmp_path / "m.pt")
    loaded.train()  # an inference graph: the flag does not change what it computes
    with torch.no_grad():
        _assert_same_outputs(loaded(x), model.eval()(x))


class MakesATensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) + torch.arange(x.shape[-1], device=x.device, dtype=x.dtype)


def test_map_location_moves_tensors_and_device_literals(tmp_path):
    path = save(MakesATensor(), tmp_path / "m.pt", torch.randn(2, 4))
    assert '"device": "cpu"' in torch.load(path, weights_only=True)["graph"]
    loaded = load(path, map_location="meta")
    out = loaded(torch.randn(3, 4, device="meta"))
    assert out.device.type == "meta" and loaded.lin.weight.device.type == "meta"


def test_save_takes_the_inputs_a_pruned_module_carries(tmp_path):
    import fxprune
    model, (x,) = _case("residual", traced=False)
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5), (x,))
    loaded = load(save(pruned, tmp_path / "p.pt"))
    assert list(loaded.state_dict()) == list(pruned.state_dict())
    with torch.no_grad():
        _assert_same_outputs(loaded(x), pruned(x))


def test_save_takes_shapes_recorded_on_placeholders(tmp_path):
    from torch.fx.passes.shape_prop import ShapeProp
    model, (x,) = _case("conv_bn_relu", traced=True)
    ShapeProp(model).propagate(x)
    with torch.no_grad():
        _assert_same_outputs(load(save(model, tmp_path / "m.pt"))(x), model(x))


def test_save_without_inputs_says_to_pass_them(tmp_path):
    from fxprune.exporters import SaveError
    with pytest.raises(SaveError, match="pass example_inputs") as info:
        save(ConvBnRelu(), tmp_path / "m.pt")
    assert str(tmp_path / "m.pt") in str(info.value)
    assert not (tmp_path / "m.pt").exists()


def test_model_export_cannot_capture_says_to_use_the_pickle_format(tmp_path):
    from fxprune.exporters import SaveError
    with pytest.raises(SaveError) as info:
        save(DataDependent(), tmp_path / "m.pt", torch.randn(2, 3))
    assert "torch.export could not capture" in str(info.value)
    assert "format='pickle'" in str(info.value) and "trusted=True" in str(info.value)
    path = save(DataDependent(), tmp_path / "m.pt", format="pickle")
    x = torch.randn(2, 3)
    assert torch.equal(load(path, trusted=True)(x), DataDependent()(x))


MODEL_SOURCE = textwrap.dedent("""
    import torch, torch.nn as nn, torch.fx as fx

    class Metadata:  # stands for planning objects that only exist in the defining package
        pass

    class CustomTracer(fx.Tracer):
        pass

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x))) + 1
""")


@pytest.fixture
def foreign_graph_module(tmp_path, monkeypatch):
    """A GraphModule traced from a class, with a tracer and metadata, in a throwaway module."""
    module_name = f"throwaway_models_{os.getpid()}"
    source_dir = tmp_path / "src"
    source_dir.mkdir()
    (source_dir / f"{module_name}.py").write_text(MODEL_SOURCE)
    monkeypatch.syspath_prepend(str(source_dir))
    defining = importlib.import_module(module_name)
    try:
        torch.manual_seed(0)
        root = _randomise_bn(defining.Block()).eval()
        gm = fx.GraphModule(root, defining.CustomTracer().trace(root), "Block")
        gm.meta["plan"] = defining.Metadata()
        for node in gm.graph.nodes:
            node.meta["fxprune"] = defining.Metadata()
        yield gm, module_name
    finally:
        sys.modules.pop(module_name, None)


LOAD_SCRIPT = textwrap.dedent("""
    import sys, torch
    folder, module_name = sys.argv[1], sys.argv[2]
    assert module_name not in sys.modules
    data = torch.load(folder + "/model.pt", weights_only=True)  # plain data: no code, no fxprune
    assert data["format"] == "fxprune.module" and data["version"] == 2, data.keys()
    raw = torch.load(folder + "/pickled.pt", weights_only=False)  # the pickle format, no fxprune
    assert "fxprune" not in sys.modules, "loading needed fxprune"
    x, expected = torch.load(folder + "/io.pt")
    assert torch.equal(raw["module"](x), expected) and raw["module"].meta == {}
    from fxprune.exporters import load, LoadError
    for name, trusted in (("model.pt", False), ("pickled.pt", True)):
        loaded = load(folder + "/" + name, trusted=trusted)
        assert torch.equal(loaded(x), expected) and not loaded.training
    try:
        load(folder + "/unstripped.pt", trusted=True)
    except LoadError as err:
        assert module_name in str(err) and "unstripped.pt" in str(err), str(err)
    else:
        raise AssertionError("a module pickled with its tracer and metadata should not load")
    assert module_name not in sys.modules
    print("subprocess-ok")
""")


def test_saved_graph_module_reloads_without_its_defining_module(tmp_path, foreign_graph_module):
    gm, module_name = foreign_graph_module
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = gm(x)
    save(gm, tmp_path / "model.pt", (x,))
    save(gm, tmp_path / "pickled.pt", format="pickle")
    torch.save(gm, tmp_path / "unstripped.pt")  # control: plain pickling keeps the references
    torch.save((x, expected), tmp_path / "io.pt")
    assert "plan" in gm.meta and gm._tracer_cls.__name__ == "CustomTracer"  # caller untouched

    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(tmp_path), module_name],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "subprocess-ok" in done.stdout


class KeepGraphModules(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, fx.GraphModule) or super().is_leaf_module(m, qualname)


@pytest.mark.parametrize("fmt", ["graph", "pickle"])
def test_save_of_nested_graph_modules_leaves_them_untouched(tmp_path, fmt):
    inner = fx.symbolic_trace(ConvBnRelu().eval())
    inner.meta["fxprune"] = {"plan": lambda: None}  # not picklable: saving must leave it out
    root = nn.Sequential(inner, nn.Flatten())
    outer = fx.GraphModule(root, KeepGraphModules().trace(root))
    outer.meta["fxprune"] = "plan"
    x = torch.randn(1, 3, 8, 8)
    save(outer, tmp_path / "m.pt", (x,), format=fmt)
    loaded = load(tmp_path / "m.pt", trusted=fmt == "pickle")
    if fmt == "pickle":
        assert loaded.meta == {} and loaded.get_submodule("0").meta == {}
    assert list(loaded.state_dict()) == list(outer.state_dict())
    assert outer.meta == {"fxprune": "plan"} and "fxprune" in inner.meta
    with torch.no_grad():
        assert torch.equal(loaded(x), outer(x))


def test_save_writes_versioned_records(tmp_path):
    model = ConvBnRelu().eval()
    x = torch.randn(1, 3, 8, 8)
    record = torch.load(save(model, tmp_path / "a.pt", x), weights_only=True)
    assert record["format"] == "fxprune.module" and record["version"] == 2
    assert isinstance(record["graph"], str) and set(record["parameters"]) == {
        "conv.weight", "conv.bias", "bn.weight", "bn.bias"}
    record = torch.load(save(model, tmp_path / "b.pt", format="pickle"), weights_only=False)
    assert record["format"] == "fxprune.module" and record["version"] == 1
    assert isinstance(record["module"], ConvBnRelu)


def test_pickled_modules_load_only_when_trusted(tmp_path):
    model = ConvBnRelu().eval()
    save(model, tmp_path / "record.pt", format="pickle")
    torch.save(model, tmp_path / "plain.pt")
    with open(tmp_path / "pickled.pkl", "wb") as f:
        pickle.dump(model, f)
    x = torch.randn(1, 3, 8, 8)
    for name in ("record.pt", "plain.pt", "pickled.pkl"):
        with pytest.raises(LoadError, match="trusted=True") as info:
            load(tmp_path / name)
        assert name in str(info.value) and "ConvBnRelu" in str(info.value)
        with torch.no_grad():
            assert torch.equal(load(tmp_path / name, trusted=True)(x), model(x))


def _truncated(path):
    save(ConvBnRelu(), path, torch.randn(1, 3, 8, 8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_FILES = {
    "truncated": _truncated,
    "random_bytes": lambda p: p.write_bytes(os.urandom(4096)),
    "empty": lambda p: p.write_bytes(b""),
    "pickled_int": lambda p: p.write_bytes(pickle.dumps(7)),
    "torch_saved_int": lambda p: torch.save(7, p),
    "state_dict": lambda p: torch.save(ConvBnRelu().state_dict(), p),
    "newer_version": lambda p: torch.save({"format": "fxprune.module", "version": 99,
                                           "module": ConvBnRelu()}, p),
    "newer_graph_version": lambda p: torch.save({"format": "fxprune.module", "version": 3}, p),
    "string_version": lambda p: torch.save({"format": "fxprune.module", "version": "2"}, p),
    "graph_not_json": lambda p: torch.save({"format": "fxprune.module", "version": 2, "graph": "{",
                                            "parameters": {}, "buffers": {}, "constants": {}}, p),
}


@pytest.mark.parametrize("trusted", [False, True], ids=["default", "trusted"])
@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_raises_load_error_naming_the_path(tmp_path, kind, trusted):
    path = tmp_path / f"bad_{kind}.pt"
    BAD_FILES[kind](path)
    with pytest.raises(LoadError) as info:
        load(path, trusted=trusted)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_state_dict_file_says_how_to_use_it(tmp_path):
    torch.save(ConvBnRelu().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(LoadError, match="fxprune.rebuild"):
        load(tmp_path / "sd.pt")


@pytest.mark.parametrize("trusted", [False, True])
def test_missing_file_raises_load_error(tmp_path, trusted):
    with pytest.raises(LoadError, match="does not exist") as info:
        load(tmp_path / "absent.pt", trusted=trusted)
    assert "absent.pt" in str(info.value)
    with pytest.raises(LoadError, match="not a regular file"):
        load(tmp_path, trusted=trusted)


# --- the public names ------------------------------------------------------------------------

PUBLIC_ERRORS = {  # name: where it is defined
    "PolicyNameError": "fxprune.errors", "BudgetWarning": "fxprune.errors", "ModelWarning": "fxprune.errors",
    "SaveError": "fxprune.saving", "LoadError": "fxprune.saving", "ExportError": "fxprune.exporters",
    "PlanFormatError": "fxprune.serialize", "EditedWeightsWarning": "fxprune.serialize",
    "check_plan": "fxprune.serialize", "DiskFullError": "fxprune.atomic",
}


@pytest.mark.parametrize("name", sorted(PUBLIC_ERRORS))
def test_public_errors_and_warnings_import_from_fxprune(name):
    import fxprune
    assert name in fxprune.__all__
    assert getattr(fxprune, name) is getattr(importlib.import_module(PUBLIC_ERRORS[name]), name)
    namespace = {}
    exec(f"from fxprune import {name}", namespace)
    assert namespace[name] is getattr(fxprune, name)


def test_exporters_keeps_its_public_names_after_the_split():
    import fxprune.exporters as exporters
    import fxprune.graph_format as graph_format
    import fxprune.saving as saving
    for name in exporters.__all__:
        assert hasattr(exporters, name), name
    assert exporters.save is saving.save and exporters.load is saving.load
    assert exporters.SAVE_FORMAT == graph_format.SAVE_FORMAT and exporters.SAVE_VERSION == graph_format.SAVE_VERSION
    assert "aten" not in " ".join(graph_format.PY_FUNCTIONS) and "save" in graph_format.DENIED_OPS
