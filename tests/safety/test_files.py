"""Files are safe: writes are atomic (an interrupted or failed write keeps the previous file and
leaves no temporary file), a full disk is a clear error, and loading never runs code a file names."""
import errno
import os
import threading

import pytest

from fxprune.atomic import DiskFullError, atomic_write, write_bytes, write_text
from fxprune.errors import FxPruneError


def _folder_names(path):
    return sorted(os.listdir(path.parent))


# --- atomic writes -------------------------------------------------------------------------

def test_atomic_write_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "out.bin"
    write_bytes(path, b"old")
    write_bytes(path, b"new content")
    assert path.read_bytes() == b"new content"
    assert _folder_names(path) == ["out.bin"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, RuntimeError])
def test_interrupted_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, exc):
    path = tmp_path / "out.bin"
    write_bytes(path, b"the good file")
    with pytest.raises(exc):
        with atomic_write(path) as f:
            f.write(b"half of a new fi")
            f.flush()
            raise exc()
    assert path.read_bytes() == b"the good file"
    assert _folder_names(path) == ["out.bin"]


@pytest.mark.parametrize("code", [errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)])
def test_disk_full_is_a_clear_error_and_the_old_file_is_unchanged(tmp_path, code):
    path = tmp_path / "out.json"
    write_text(path, "{}")
    with pytest.raises(DiskFullError) as info:
        with atomic_write(path, "w") as f:
            f.write("{\"a\": ")
            raise OSError(code, os.strerror(code))
    err = info.value
    assert isinstance(err, FxPruneError) and isinstance(err, OSError) and err.errno == code
    assert str(err) == f"disk full while writing {str(path)!r}; the previous file is unchanged " \
                       "(free some space or write elsewhere)"
    assert isinstance(err.__cause__, OSError)
    assert path.read_text() == "{}" and _folder_names(path) == ["out.json"]


def test_other_os_errors_pass_through_unchanged(tmp_path):
    path = tmp_path / "out.bin"
    with pytest.raises(PermissionError):
        with atomic_write(path) as f:
            raise PermissionError(errno.EACCES, "no")
    assert _folder_names(path) == []


def test_new_file_gets_normal_permissions_and_keeps_the_old_ones(tmp_path):
    path = tmp_path / "out.bin"
    write_bytes(path, b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    os.chmod(path, 0o640)
    write_bytes(path, b"y")
    assert path.stat().st_mode & 0o777 == 0o640


def test_concurrent_writers_leave_one_complete_file(tmp_path):
    path = tmp_path / "out.bin"
    payloads = [bytes([i]) * (200_000 + i) for i in range(8)]
    errors = []

    def writer(data):
        try:
            for _ in range(5):
                write_bytes(path, data)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert path.read_bytes() in payloads
    assert _folder_names(path) == ["out.bin"]


# --- loading never runs code a file names ---------------------------------------------------

import json  # noqa: E402
import pickle  # noqa: E402

import torch  # noqa: E402

from fxprune.exporters import LoadError, SaveError, load, save  # noqa: E402
from fxprune.serialize import load_plan, save_plan  # noqa: E402


class Payload:
    """Unpickling this creates the marker file: proof that the file's code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


PAYLOAD_FILES = {
    "torch_save": lambda p, m: torch.save(Payload(m), p),
    "torch_save_legacy": lambda p, m: torch.save(Payload(m), p, _use_new_zipfile_serialization=False),
    "pickle_dump": lambda p, m: p.write_bytes(pickle.dumps(Payload(m))),
    "pickle_protocol_0": lambda p, m: p.write_bytes(pickle.dumps(Payload(m), protocol=0)),
    "old_fxprune_record": lambda p, m: torch.save({"format": "fxprune.module", "version": 1,
                                                   "module": Payload(m)}, p),
    "inside_a_graph_record": lambda p, m: torch.save({"format": "fxprune.module", "version": 2, "graph": "{}",
                                                      "parameters": {"w": Payload(m)}}, p),
}


@pytest.mark.parametrize("kind", sorted(PAYLOAD_FILES))
def test_crafted_pickle_is_refused_without_running_it(tmp_path, kind):
    path, marker = tmp_path / "model.pt", tmp_path / "marker"
    PAYLOAD_FILES[kind](path, marker)
    with pytest.raises(LoadError) as info:
        load(path)
    message = str(info.value)
    assert not marker.exists(), "loading ran the code in the file"
    assert str(path) in message and "trusted=True" in message and "open" in message, message
    assert "runs" in message or "run " in message  # says why

    # control: the payload is live, and trusted=True runs it (then finds no module)
    with pytest.raises(LoadError):
        load(path, trusted=True)
    assert marker.exists()


def _graph_file(tmp_path, edit):
    """A file saved by fxprune.save, its graph record changed by ``edit(record, graph)``."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    path = save(model, tmp_path / "model.pt", torch.randn(1, 3, 8, 8))
    record = torch.load(path, weights_only=True)
    graph = json.loads(record["graph"])
    edit(record, graph)
    record["graph"] = json.dumps(graph)
    torch.save(record, path)
    return path


def _call(graph, target):
    graph["nodes"][3][1] = target


def _rename_param(record, graph, name):
    record["parameters"][name] = record["parameters"].pop("0.weight")
    graph["nodes"][0][1] = name


INJECT = 'x"); open("{m}", "w"); ("'
HOSTILE_GRAPHS = {
    "python_builtin": lambda r, g, m: _call(g, "builtins.open"),
    "os_system": lambda r, g, m: _call(g, "os.system"),
    "torch_module_attribute": lambda r, g, m: _call(g, "torch.os.system"),
    "dunder_walk": lambda r, g, m: _call(g, "aten.__class__.__init__"),
    "file_writing_aten_op": lambda r, g, m: _call(g, "aten.save.default"),
    "file_reading_aten_op": lambda r, g, m: _call(g, "aten.from_file.default"),
    "unknown_namespace": lambda r, g, m: _call(g, "torchvision.nms.default"),
    "quote_in_tensor_name": lambda r, g, m: _rename_param(r, g, INJECT.format(m=m)),
    "dunder_tensor_name": lambda r, g, m: _rename_param(r, g, "__class__"),
    "attribute_not_in_file": lambda r, g, m: g["nodes"][0].__setitem__(1, "training"),
    "code_in_input_name": lambda r, g, m: g.__setitem__("inputs", [f"x=open('{m}', 'w')"]),
    "code_in_placeholder": lambda r, g, m: g["nodes"][2].__setitem__(1, f"x=open('{m}','w')"),
    "code_in_kwarg_name": lambda r, g, m: g["nodes"][4].__setitem__(3, {f"x=open('{m}','w')": 1}),
    "dtype_by_name": lambda r, g, m: g["nodes"][4][2].append({"dtype": "__builtins__"}),
    "device_with_code": lambda r, g, m: g["nodes"][4][2].append({"device": f"cpu'); open('{m}', 'w"}),
    "node_from_the_future": lambda r, g, m: g["nodes"][3][2].__setitem__(0, {"node": 5}),
    "foreign_structure": lambda r, g, m: g.__setitem__("out_spec", {"kind": "defaultdict", "children": []}),
    "structure_leaf_mismatch": lambda r, g, m: g.__setitem__("in_spec", "*"),
    "not_a_tensor_table": lambda r, g, m: r.__setitem__("buffers", [1, 2]),
    "node_not_a_list": lambda r, g, m: g["nodes"].append("import os"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_GRAPHS))
def test_hostile_graph_record_is_a_load_error_and_runs_nothing(tmp_path, kind):
    marker = tmp_path / "marker"
    path = _graph_file(tmp_path, lambda r, g: HOSTILE_GRAPHS[kind](r, g, marker))
    with pytest.raises(LoadError) as info:
        load(path)
    assert str(path) in str(info.value) and "malformed" in str(info.value), str(info.value)
    assert not marker.exists()


def test_damaged_graph_files_load_or_raise_load_error_only(tmp_path):
    path = save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)),
                tmp_path / "m.pt", torch.randn(1, 3, 8, 8))
    good = path.read_bytes()
    generator = torch.Generator().manual_seed(0)
    damaged = [good[:n] for n in (1, 100, len(good) // 3, len(good) - 1)]
    for _ in range(40):
        at = torch.randint(len(good), (3,), generator=generator).tolist()
        data = bytearray(good)
        for i in at:
            data[i] ^= 0xFF
        damaged.append(bytes(data))
    for data in damaged:
        path.write_bytes(data)
        try:
            module = load(path)
        except LoadError as err:
            assert str(path) in str(err)
        else:  # a flip inside tensor data changes weights, not the structure
            assert isinstance(module, torch.nn.Module)


# --- saving is atomic -----------------------------------------------------------------------

def _small(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()


X = torch.randn(1, 3, 8, 8)


@pytest.mark.parametrize("fmt", ["graph", "pickle"])
def test_save_interrupted_midway_keeps_the_old_file(tmp_path, monkeypatch, fmt):
    path = tmp_path / "m.pt"
    old = _small(0)
    save(old, path, X, format=fmt)
    before = path.read_bytes()
    real_save = torch.save

    def half_then_interrupt(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save(_small(1), path, X, format=fmt)
    monkeypatch.undo()
    assert path.read_bytes() == before and _folder_names(path) == ["m.pt"]
    with torch.no_grad():
        assert torch.equal(load(path, trusted=fmt == "pickle")(X), old(X))


def test_save_plan_interrupted_or_disk_full_keeps_the_old_file(tmp_path, monkeypatch):
    import fxprune
    plan = fxprune.plan(_small(0), fxprune.Policy(ratio=0.5), (X,))
    path = save_plan(plan, tmp_path / "plan.json")
    before = path.read_text()
    for failure in (KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")):
        def fail(fd, failure=failure):
            raise failure
        monkeypatch.setattr(os, "fsync", fail)  # the new text is written, not yet in place
        with pytest.raises((KeyboardInterrupt, DiskFullError)) as info:
            save_plan(fxprune.plan(_small(1), fxprune.Policy(ratio=0.25), (X,)), path)
        monkeypatch.undo()
        if isinstance(failure, OSError):
            assert info.type is DiskFullError and "previous file is unchanged" in str(info.value)
        assert path.read_text() == before and _folder_names(path) == ["plan.json"]
        load_plan(path)


def test_save_on_a_full_disk_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    save(_small(0), path, X)
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(DiskFullError, match="disk full while writing .*m.pt.*previous file is unchanged"):
        save(_small(1), path, X)
    assert path.read_bytes() == before and _folder_names(path) == ["m.pt"]


@pytest.mark.parametrize("fmt", ["graph", "pickle"])
def test_concurrent_saves_to_one_path_leave_a_valid_file(tmp_path, fmt):
    path = tmp_path / "m.pt"
    models = [_small(seed) for seed in range(4)]
    errors = []

    def saver(model):
        try:
            for _ in range(2):
                save(model, path, X, format=fmt)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=saver, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with torch.no_grad():
        out = load(path, trusted=fmt == "pickle")(X)
        assert any(torch.equal(out, m(X)) for m in models)
    assert _folder_names(path) == ["m.pt"]


def test_save_error_leaves_no_file(tmp_path):
    with pytest.raises(SaveError):
        save(_small(0), tmp_path / "m.pt")  # no inputs, none recorded
    assert not (tmp_path / "m.pt").exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_export_interrupted_or_failing_midway_keeps_the_old_file(tmp_path, monkeypatch, exc):
    from fxprune.exporters import ExportError, export
    path = tmp_path / "m.pt"
    export(_small(0), path, X, format="torchscript-trace")
    before = path.read_bytes()

    def half_then_fail(module, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(before[: len(before) // 2])
        with open(str(f) + ".data", "wb") as side:  # a side file, like ONNX external data
            side.write(b"partial")
        raise exc("stopped")

    monkeypatch.setattr(torch.jit, "save", half_then_fail)
    with pytest.raises(KeyboardInterrupt if exc is KeyboardInterrupt else ExportError):
        export(_small(1), path, X, format="torchscript-trace")
    assert path.read_bytes() == before and _folder_names(path) == ["m.pt"]


def test_atomic_path_moves_side_files_and_cleans_up_on_failure(tmp_path):
    from fxprune.atomic import atomic_path
    path = tmp_path / "model.onnx"
    with atomic_path(path) as tmp:
        assert tmp.name == "model.onnx" and tmp.parent.parent == tmp_path
        tmp.write_bytes(b"graph")
        (tmp.parent / "model.onnx.data").write_bytes(b"weights")
    assert _folder_names(path) == ["model.onnx", "model.onnx.data"]
    with pytest.raises(DiskFullError):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"new graph")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert path.read_bytes() == b"graph"
    assert _folder_names(path) == ["model.onnx", "model.onnx.data"]


def test_concurrent_plan_saves_leave_a_valid_file(tmp_path):
    import fxprune
    plans = [fxprune.plan(_small(s), fxprune.Policy(ratio=r), (X,)) for s, r in ((0, 0.25), (1, 0.5), (2, 0.75))]
    path = tmp_path / "plan.json"
    expected = [json.loads(json.dumps(fxprune.serialize.plan_to_dict(p))) for p in plans]
    threads = [threading.Thread(target=lambda p=p: [save_plan(p, path) for _ in range(20)]) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert load_plan(path) in expected and _folder_names(path) == ["plan.json"]


def test_code_in_a_string_argument_stays_a_string(tmp_path):
    marker = tmp_path / "marker"
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU(approximate="tanh"))
    path = save(model, tmp_path / "m.pt", torch.randn(2, 4))
    record = torch.load(path, weights_only=True)
    assert '"tanh"' in record["graph"]
    record["graph"] = record["graph"].replace('"tanh"', json.dumps(f"tanh'); open('{marker}', 'w'); ('"))
    torch.save(record, path)
    loaded = load(path)  # a string is a value: it is written into the code as a literal
    with pytest.raises(RuntimeError):  # and aten rejects it as an argument
        loaded(torch.randn(2, 4))
    assert not marker.exists()


def test_output_structure_must_match_the_outputs(tmp_path):
    path = _graph_file(tmp_path, lambda r, g: g.__setitem__("out_spec", {"kind": "tuple", "children": ["*", "*"]}))
    with pytest.raises(LoadError, match="output structure"):
        load(path)
