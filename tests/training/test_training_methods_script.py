"""benchmarks/reproduce/training_methods.py runs end to end in a tiny configuration and writes
its records, table and plot (digits data, a throw-away dense model, one step per method)."""
import json
import sys
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.reproduce import training_methods  # noqa: E402
from benchmarks.reproduce.datasets import DatasetUnavailableError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def test_tiny_run_writes_records_table_and_plot(tmp_path, capsys):
    out = tmp_path / "tm.json"
    argv = ["--data", "digits", "--subset", "64", "--epochs", "1", "--batch-size", "64", "--budgets", "0.6",
            "--methods", "dense", "l1+ft", "dynamic+decor", "c2s2", "slimming", "--alphas", "0.1",
            "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    try:
        payload = training_methods.main(argv)
    except DatasetUnavailableError as error:
        pytest.skip(str(error))
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    assert out.with_suffix(".png").is_file()
    records = payload["records"]
    assert {(r["method"], r["budget"]) for r in records} == {
        ("dense", 1.0), ("l1+ft", 0.6), ("dynamic+decor", 0.6), ("c2s2", 0.6), ("slimming", 0.6)}
    for r in records:
        assert set(r) >= {"method", "macs_kept", "accuracy", "seed", "budget", "alpha"}
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["macs_kept"] == 1.0 if r["method"] == "dense" else abs(r["macs_kept"] - 0.6) < 0.03
        assert r.get("verified", True)
    assert "test accuracy" in capsys.readouterr().out
    again = training_methods.main(argv)          # a rerun skips what is done
    assert again["records"] == records
