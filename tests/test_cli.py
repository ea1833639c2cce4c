"""The main job on the command line, as a user runs it."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fxprune", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_prune_prints_table_and_saves_the_safe_graph_format(tmp_path):
    out = tmp_path / "pruned.pt"
    res = run("prune", "resnet18", "--ratio", "0.5", "--input-size", "64", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "width before" in res.stdout and "macs" in res.stdout and "params" in res.stdout
    assert "oracle" in res.stdout and out.exists()
    assert res.stdout.splitlines()[0] == "captured with torch.fx: torch.fx traced the model (the fast path)"
    assert f"fxprune.load({str(out)!r})" in res.stdout and "trusted" not in res.stdout
    # plain data: torch.load(weights_only=True) reads it, so no pickled code can run while loading
    code = ("import torch, fxprune; "
            f"record = torch.load({str(out)!r}, weights_only=True); assert record['format'] == 'fxprune.module'; "
            f"m = fxprune.load({str(out)!r}); print(tuple(m(torch.randn(3, 3, 64, 64)).shape))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "(3, 1000)"  # the batch stays dynamic


def test_prune_format_pickle_writes_a_pickled_module_that_needs_trust(tmp_path):
    out = tmp_path / "pruned.pt"
    res = run("prune", "squeezenet1_1", "--input-size", "64", "--out", str(out), "--format", "pickle")
    assert res.returncode == 0, res.stderr
    assert "pickled GraphModule" in res.stdout and "trusted=True" in res.stdout
    code = ("import sys; sys.modules['fxprune'] = None; import torch; "
            f"m = torch.load({str(out)!r}, weights_only=False); print(tuple(m(torch.randn(1, 3, 64, 64)).shape))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert loaded.returncode == 0, loaded.stderr  # loads without fxprune, for those who need a pickle
    assert loaded.stdout.strip() == "(1, 1000)"
    import fxprune
    with pytest.raises(fxprune.LoadError, match="trusted=True"):
        fxprune.load(out)
    assert type(fxprune.load(out, trusted=True)).__name__ == "GraphModule"


def test_format_without_out_is_an_error(capsys):
    from fxprune.cli import main
    assert main(["prune", "resnet18", "--format", "pickle"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "fxprune: error: --format pickle: says how to save the pruned model; give --out FILE too"]


def test_capture_export_is_passed_through_and_reported(capsys):
    from fxprune.cli import main
    assert main(["prune", "resnet18", "--input-size", "32", "--capture", "export", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["capture"]["frontend"] == "export" and report["capture"]["requested"] == "export"
    assert report["oracle"]["ok"] is True and report["params"]["after"] < report["params"]["before"]
    assert main(["prune", "resnet18", "--input-size", "32", "--capture", "export"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "captured with torch.export: capture='export' was asked for"


@pytest.mark.parametrize("command", ["prune", "bench", "report"])
def test_capture_choices_are_checked_by_argparse(command, capsys):
    from fxprune.cli import main, parser
    from fxprune.capture import CAPTURE_MODES
    assert parser().parse_args([command, "resnet18"]).capture == "auto"
    action = next(a for a in parser()._subparsers._group_actions[0].choices[command]._actions
                  if a.dest == "capture")
    assert tuple(action.choices) == CAPTURE_MODES
    with pytest.raises(SystemExit) as info:
        main([command, "resnet18", "--capture", "bogus"])
    assert info.value.code == 2
    assert "argument --capture: invalid choice: 'bogus'" in capsys.readouterr().err


def test_prune_json_report():
    res = run("prune", "squeezenet1_1", "--ratio", "0.5", "--input-size", "64", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["params"]["after"] < report["params"]["before"]
    assert report["macs"]["after"] < report["macs"]["before"]
    assert report["oracle"]["ok"] is True
    assert all(g["after"] <= g["before"] for g in report["groups"])


def test_unknown_model_and_bad_policy_fail_cleanly():
    res = run("prune", "no_such_net")
    assert res.returncode != 0 and "unknown model" in res.stderr
    res = run("prune", "resnet18", "--ratio", "2", "--input-size", "32")
    assert res.returncode == 2 and "ratio must be in [0, 1]" in res.stderr


# --- model and weights given on the command line --------------------------------------------

NETS = """
import torch.nn as nn

def small(width=8):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))

def wide():
    return small(16)

def not_a_model():
    return 42
"""


def _write_nets(folder, package):
    (folder / package).mkdir()
    (folder / package / "__init__.py").write_text("")
    (folder / package / "nets.py").write_text(NETS)


@pytest.fixture
def nets(tmp_path, monkeypatch):
    """``clinets/nets.py`` in a fresh current folder; sys.path and sys.modules restored after."""
    _write_nets(tmp_path, "clinets")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    for name in ("clinets.nets", "clinets"):
        sys.modules.pop(name, None)


def test_a_factory_in_the_current_folder_works_with_the_installed_script(tmp_path):
    script = Path(sys.executable).with_name("fxprune")
    if not script.exists():
        pytest.skip(f"no installed fxprune script next to {sys.executable}")
    _write_nets(tmp_path, "scriptnets")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([str(script), "prune", "scriptnets.nets:small", "--input-size", "16", "--json"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["model"] == "scriptnets.nets:small"


def test_a_factory_that_cannot_be_found_is_one_clear_line(nets, capsys):
    from fxprune.cli import main
    assert main(["prune", "nosuchpkg.nets:small"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"fxprune: error: MODEL 'nosuchpkg.nets:small': no module named 'nosuchpkg' in "
                                f"the current folder ({nets}) or on sys.path; run fxprune from the folder that "
                                "holds it, or add its folder to PYTHONPATH"]
    assert main(["prune", "clinets.nets:nope"]) == 2
    assert "module 'clinets.nets'" in (err := capsys.readouterr().err) and "has no attribute 'nope'" in err
    assert main(["prune", "clinets.nets:not_a_model"]) == 2
    assert "not_a_model() returned int, not a torch.nn.Module" in capsys.readouterr().err


def test_state_dict_of_the_right_architecture_is_loaded(nets, capsys):
    import torch
    from fxprune.cli import main
    from fxprune.cli_model import load_model
    weights = nets / "small.pt"
    from fxprune.cli_model import build_model
    source = build_model("clinets.nets:small")
    torch.save(source.state_dict(), weights)
    args = argparse.Namespace(model="clinets.nets:small", state_dict=str(weights), input_size=16,
                              input_shape=None, batch=1)
    model, _ = load_model(args)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    torch.save({"epoch": 3, "state_dict": source.state_dict()}, weights)  # a training checkpoint
    assert main(["prune", "clinets.nets:small", "--input-size", "16", "--state-dict", str(weights)]) == 0


def test_state_dict_of_another_architecture_names_the_keys_and_what_to_do(nets, capsys):
    import torch
    import torchvision
    from fxprune.cli import main
    from fxprune.cli_model import build_model
    wide = nets / "wide.pt"
    torch.save(build_model("clinets.nets:wide").state_dict(), wide)
    assert main(["prune", "clinets.nets:small", "--input-size", "16", "--state-dict", str(wide)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"--state-dict {wide} does not fit MODEL 'clinets.nets:small'" in err
    assert "0.weight (16, 3, 3, 3) vs (8, 3, 3, 3)" in err and "with another shape" in err
    assert "give the MODEL they were trained for" in err

    other = nets / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), other)
    assert main(["prune", "clinets.nets:small", "--input-size", "16", "--state-dict", str(other)]) == 2
    err = capsys.readouterr().err
    assert "missing: 0.weight, 0.bias, 1.weight, 1.bias and" in err
    assert "unexpected: conv1.weight, bn1.weight, bn1.bias, bn1.running_mean and" in err

    ddp = nets / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in build_model("clinets.nets:small").state_dict().items()}, ddp)
    assert main(["prune", "clinets.nets:small", "--input-size", "16", "--state-dict", str(ddp)]) == 2
    assert "strip that prefix" in capsys.readouterr().err


class _RunsCode:
    """Unpickling this runs ``os.mkdir(marker)``: what a hostile weights file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_state_dict_is_read_with_weights_only_so_no_pickled_code_runs(nets, capsys):
    import torch
    from fxprune.cli import main
    marker, hostile = nets / "code_ran", nets / "hostile.pt"
    torch.save({"0.weight": _RunsCode(marker)}, hostile)
    assert main(["prune", "clinets.nets:small", "--input-size", "16", "--state-dict", str(hostile)]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert err.startswith(f"fxprune: error: --state-dict {hostile}: cannot be read as weights only")
    assert "posix.mkdir would be imported and run" in err or "os.mkdir would be imported" in err
    assert "torch.save(model.state_dict(), path)" in err and len(err.splitlines()) == 1
    truncated = nets / "truncated.pt"
    torch.save(torch.nn.Linear(64, 64).state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    assert main(["prune", "clinets.nets:small", "--state-dict", str(truncated)]) == 2
    assert "(the file is truncated or corrupt); copy or save it again" in capsys.readouterr().err
    assert main(["prune", "clinets.nets:small", "--state-dict", str(nets / "missing.pt")]) == 2
    assert f"--state-dict {nets / 'missing.pt'}: the file does not exist" in capsys.readouterr().err


def test_state_dict_is_loaded_with_weights_only_true(nets, monkeypatch):
    import torch
    from fxprune.cli_model import read_state_dict
    torch.save(torch.nn.Linear(2, 1).state_dict(), nets / "w.pt")
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    read_state_dict(str(nets / "w.pt"))
    assert calls and calls[0]["weights_only"] is True
