"""The ``bench``, ``report`` and ``demo`` commands and policy files, run as a user runs them."""
import json
import subprocess
import sys

import pytest
import torch

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "fxprune", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def test_bench_json_file_has_one_record_per_batch_size_and_the_table_is_printed(tmp_path):
    out = tmp_path / "bench.json"
    res = run("bench", "resnet18", "--ratio", "0.5", "--input-size", "32", "--runs", "3", "--warmup", "1",
              "--threads", "1", "--batch-sizes", "1", "2", "--json", str(out))
    assert res.returncode == 0, res.stderr
    assert "speedup" in res.stdout and "efficiency" in res.stdout and "ideal (MACs)" in res.stdout
    doc = json.loads(out.read_text())
    assert doc["schema"] == "fxprune.bench" and doc["model"] == "resnet18"
    assert doc["policy"]["ratio"] == 0.5
    assert [r["original"]["batch"] for r in doc["records"]] == [1, 2]
    for record in doc["records"]:
        assert record["original"]["runs"] == record["pruned"]["runs"] == 3
        assert record["original"]["threads"] == 1
        assert record["pruned_macs"] < record["original_macs"]
        assert record["ideal_speedup"] == pytest.approx(record["original_macs"] / record["pruned_macs"])
        assert record["efficiency"] == pytest.approx(record["speedup"] / record["ideal_speedup"])


def test_bench_on_a_saved_pruned_model_prints_json_to_stdout(tmp_path):
    import fxprune
    import torchvision
    saved = tmp_path / "pruned.pt"
    fxprune.save(fxprune.transform(torchvision.models.resnet18(), fxprune.Policy(ratio=0.5),
                                   (torch.randn(1, 3, 32, 32),)), saved)
    res = run("bench", "resnet18", "--pruned", str(saved), "--input-size", "32", "--runs", "2",  # no --trusted:
              "--warmup", "0", "--threads", "1", "--json")  # the graph format runs no code from the file
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["pruned_file"] == str(saved) and doc["policy"] is None
    assert doc["records"][0]["pruned_params"] < doc["records"][0]["original_params"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_bench_on_cuda_without_a_gpu_exits_2_with_a_clear_message(capsys):
    from fxprune.cli import main
    assert main(["bench", "resnet18", "--input-size", "32", "--device", "cuda", "--runs", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("fxprune: error: device 'cuda' requested but CUDA is unavailable")
    assert "--device cpu" in captured.err and captured.out == ""


def test_report_writes_widths_and_accuracy_pngs(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(
        [{"method": m, "macs_kept": k, "accuracy": a} for m, k, a in
         [("l1", 1.0, 0.95), ("l1", 0.5, 0.93), ("l1", 0.25, 0.88), ("random", 0.5, 0.9), ("random", 0.25, 0.8)]]))
    out_dir = tmp_path / "figures"
    res = run("report", "resnet18", "--ratio", "0.5", "--input-size", "32", "--out-dir", str(out_dir),
              "--results", str(results))
    assert res.returncode == 0, res.stderr
    widths, accuracy = out_dir / "resnet18_widths.png", out_dir / "accuracy_vs_macs.png"
    for png in (widths, accuracy):
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert str(png) in res.stdout
    res = run("report", "--results", str(results), "--out-dir", str(tmp_path / "only"), "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["results"]["methods"] == ["l1", "random"] and doc["results"]["records"] == 5
    assert list(doc["files"]) == ["accuracy"]
    assert open(doc["files"]["accuracy"], "rb").read(8) == PNG_MAGIC


def test_report_rejects_results_without_the_needed_keys(tmp_path, capsys):
    from fxprune.cli import main
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"method": "l1", "accuracy": 0.9}]))
    assert main(["report", "--results", str(results), "--out-dir", str(tmp_path)]) == 2
    assert "record 0 lacks macs_kept" in capsys.readouterr().err
    assert main(["report", "--out-dir", str(tmp_path)]) == 2
    assert "give a MODEL" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_demo_fast_prints_every_criterion_row(tmp_path):
    from fxprune.demo import CRITERIA
    from fxprune.importance import available
    expected = ["original"] + [c for c in CRITERIA if c in available()]
    assert {"l1", "l2", "random"} <= set(expected)
    out = tmp_path / "demo.json"
    res = run("demo", "--fast", "--json", str(out), timeout=180)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("criterion"))
    rows = [line.split()[0] for line in lines[header + 2: header + 2 + len(expected)]]
    assert rows == expected
    for column in ("acc. pruned", "+fine-tune", "params", "MACs", "CPU ms", "torchscript", "onnx"):
        assert column in lines[header]
    doc = json.loads(out.read_text())
    assert [r["criterion"] for r in doc["rows"]] == expected
    original = doc["rows"][0]
    assert original["accuracy_pruned"] > 0.8  # a trained model, not chance (0.1)
    for row in doc["rows"][1:]:
        assert row["macs"] < original["macs"] and row["params"] < original["params"]
        assert 0.0 <= row["accuracy_finetuned"] <= 1.0 and row["latency_ms"] > 0
        assert row["torchscript"] == "ok" and row["onnx"] in ("ok", "skipped")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_prune_with_a_policy_file_and_flags_that_override_it(tmp_path, suffix):
    policy = {"importance": "l2", "flops": 0.6, "round_to": 8, "ignore": ["fc"],
              "overrides": {"layer4.*": 0.25}}
    path = tmp_path / f"policy{suffix}"
    if suffix == ".yaml":
        yaml = pytest.importorskip("yaml")
        path.write_text(yaml.safe_dump(policy))
    else:
        path.write_text(json.dumps(policy))
    res = run("prune", "resnet18", "--input-size", "32", "--policy", str(path), "--min-channels", "4", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["policy"]["importance"] == "l2" and report["policy"]["flops"] == 0.6
    assert report["policy"]["round_to"] == 8 and report["policy"]["min_channels"] == 4
    assert report["policy"]["ignore"] == ["fc"] and report["policy"]["overrides"] == [["layer4.*", 0.25]]
    assert report["macs"]["after"] / report["macs"]["before"] == pytest.approx(0.6, abs=0.03)
    assert all(g["after"] % 8 == 0 or g["after"] == g["before"] for g in report["groups"])


def test_policy_flags_override_the_file(tmp_path):
    from fxprune.cli import parser, policy_from_args
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"importance": "l2", "flops": 0.6, "round_to": 8, "scope": "global"}))
    policy = policy_from_args(parser().parse_args(["prune", "m", "--policy", str(path), "--ratio", "0.25",
                                                   "--round-to", "4"]))
    assert (policy.ratio, policy.flops, policy.round_to) == (0.25, None, 4)  # a ratio flag drops the file's budget
    assert (policy.importance, policy.scope) == ("l2", "global")             # the rest of the file stays
    policy = policy_from_args(parser().parse_args(["bench", "m", "--policy", str(path), "--params", "0.5"]))
    assert (policy.flops, policy.params) == (None, 0.5)
    policy = policy_from_args(parser().parse_args(["prune", "m", "--policy", str(path)]))
    assert policy.budget == ("macs", 0.6)


def test_a_bad_policy_key_fails_with_the_valid_keys(tmp_path, capsys):
    from fxprune.cli import main
    path = tmp_path / "policy.yaml"
    path.write_text("ratoi: 0.5\nimportance: l1\n")
    assert main(["prune", "resnet18", "--input-size", "32", "--policy", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) 'ratoi'" in err
    assert "valid keys: importance, ratio" in err and "overrides" in err


def test_policy_file_errors_name_the_problem(tmp_path):
    from fxprune.policy_file import read_policy_file
    from fxprune import PolicyError
    bad = tmp_path / "types.json"
    bad.write_text(json.dumps({"overrides": [["layer4.*", 0.5]]}))
    with pytest.raises(PolicyError, match="'overrides' must map module names"):
        read_policy_file(bad)
    with pytest.raises(PolicyError, match="does not exist"):
        read_policy_file(tmp_path / "missing.yaml")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(PolicyError, match="must hold a mapping"):
        read_policy_file(tmp_path / "list.json")


def test_yaml_policy_without_pyyaml_says_what_to_install(tmp_path, monkeypatch):
    from fxprune import PolicyError
    from fxprune.policy_file import read_policy_file
    path = tmp_path / "policy.yaml"
    path.write_text("ratio: 0.5\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now fails
    with pytest.raises(PolicyError, match="needs pyyaml: pip install pyyaml"):
        read_policy_file(path)


@pytest.mark.parametrize("command", ["prune", "bench", "report", "demo"])
def test_every_command_has_help(command, capsys):
    from fxprune.cli import main
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: fxprune {command}" in text and "--json" in text and "Example" in text


class _RunsCode(torch.nn.Module):
    """A module whose unpickling runs ``os.mkdir(marker)``: what a hostile model file would do."""

    def __init__(self, marker):
        super().__init__()
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("command", ["bench", "report"])
def test_a_pruned_file_runs_no_pickled_code_without_trusted(tmp_path, capsys, command):
    from fxprune.cli import main
    marker, hostile = tmp_path / "code_ran", tmp_path / "pruned.pt"
    torch.save(_RunsCode(marker), hostile)
    extra = ["--runs", "1", "--warmup", "0"] if command == "bench" else ["--out-dir", str(tmp_path / "fig")]
    assert main([command, "resnet18", "--input-size", "32", "--pruned", str(hostile), *extra]) == 2
    err = capsys.readouterr().err
    assert not marker.exists(), "the pickled code ran"
    assert err.startswith(f"fxprune: error: ") and str(hostile) in err and "--trusted" in err
    assert len(err.splitlines()) == 1


def test_report_on_a_trusted_pruned_file(tmp_path):
    import fxprune
    import torchvision
    from fxprune.cli_io import save_module
    saved = tmp_path / "pruned.pt"  # what `fxprune prune --out FILE --format pickle` writes
    save_module(fxprune.transform(torchvision.models.resnet18(), fxprune.Policy(ratio=0.5),
                                  (torch.randn(1, 3, 32, 32),)), saved)
    res = run("report", "resnet18", "--pruned", str(saved), "--trusted", "--input-size", "32",
              "--out-dir", str(tmp_path / "fig"), "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["unit"] == "layer" and open(doc["files"]["widths"], "rb").read(8) == PNG_MAGIC
    assert any(w["after"] < w["before"] for w in doc["widths"])


def test_report_capture_export_is_passed_through_and_reported(tmp_path, capsys):
    from fxprune.cli import main
    out_dir = tmp_path / "fig"
    assert main(["report", "resnet18", "--ratio", "0.5", "--input-size", "32", "--capture", "export",
                 "--out-dir", str(out_dir), "--json", str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == "captured with torch.export: capture='export' was asked for"
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["capture"]["frontend"] == "export" and doc["unit"] == "group"


def test_bench_passes_capture_to_the_prune(monkeypatch, capsys):
    import fxprune
    from fxprune.cli import main
    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # stop before any timing
    monkeypatch.setattr(fxprune, "transform", record)
    assert main(["bench", "resnet18", "--input-size", "32", "--capture", "fx", "--runs", "1"]) == 130
    assert seen["capture"] == "fx"
