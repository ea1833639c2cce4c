"""The main job on the command line, as a user runs it."""
import json
import subprocess
import sys


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fxprune", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_prune_prints_table_and_saves_a_module_that_loads_without_fxprune(tmp_path):
    out = tmp_path / "pruned.pt"
    res = run("prune", "resnet18", "--ratio", "0.5", "--input-size", "64", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "width before" in res.stdout and "macs" in res.stdout and "params" in res.stdout
    assert "oracle" in res.stdout and out.exists()
    code = ("import sys; sys.modules['fxprune'] = None; import torch; "
            f"m = torch.load({str(out)!r}, weights_only=False); print(tuple(m(torch.randn(1, 3, 64, 64)).shape))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "(1, 1000)"


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
