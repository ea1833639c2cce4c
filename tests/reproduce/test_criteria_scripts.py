"""The criteria reproduction scripts run end to end in their fast modes and write sane JSON records.

LeNet-5 uses the cached baseline checkpoint when it is there; on a fresh clone (no cache) it is
trained for one epoch into a temporary folder. ResNet-20 always gets the fast mode's throw-away
baseline (one epoch on 1000 images), so the file stays well under a minute of CPU time. A missing
data set skips its test with the install hint.
"""
import json

import pytest

from benchmarks.reproduce import criteria_lenet_mnist, criteria_resnet20_fmnist
from benchmarks.reproduce.common import cached_checkpoint
from benchmarks.reproduce.datasets import DatasetUnavailableError
from benchmarks.reproduce.train_baselines import CACHE_DIR, RECIPES, checkpoint_path


def run(script, argv):
    try:
        return script.main(argv)
    except DatasetUnavailableError as error:
        pytest.skip(str(error))


def check_common(payload, path):
    assert path.is_file() and path.with_suffix(".png").is_file()
    assert json.loads(path.read_text()) == json.loads(json.dumps(payload))
    assert payload["records"] and 0.0 <= payload["unpruned_accuracy"] <= 1.0
    for record in payload["records"]:
        assert 0.0 < record["macs_kept"] <= 1.0 and 0.0 < record["params_kept"] <= 1.0


def test_lenet_script_fast(tmp_path, capsys):
    out = tmp_path / "lenet.json"
    argv = ["--fast", "--out", str(out)]
    lenet = checkpoint_path("lenet5", "mnist", 0, CACHE_DIR)
    if cached_checkpoint(lenet, 3, 0, RECIPES["lenet5"]) is None:  # never retrain into the real cache
        argv += ["--cache-dir", str(tmp_path / "cache"), "--baseline-epochs", "1"]
    payload = run(criteria_lenet_mnist, argv)
    check_common(payload, out)
    assert payload["unpruned_accuracy"] > 0.9
    assert {r["method"] for r in payload["records"]} == {"scp", "random"}
    for record in payload["records"]:
        assert set(record) >= {"method", "removed", "macs_kept", "params_kept", "accuracy"}
        assert 0.0 <= record["accuracy"] <= 1.0 and record["removed"] in (0.3, 0.6)
    kept = {(r["method"], r["removed"]): r["macs_kept"] for r in payload["records"]}
    assert kept["scp", 0.6] < kept["scp", 0.3] < 1.0  # more removed, fewer MACs
    randoms = [r for r in payload["records"] if r["method"] == "random"]
    assert sorted({r["seed"] for r in randoms}) == [0, 1]
    scp_30 = next(r["accuracy"] for r in payload["records"] if (r["method"], r["removed"]) == ("scp", 0.3))
    assert scp_30 > 0.5  # a mild data-free prune keeps most of a trained LeNet-5's accuracy
    assert "random" in capsys.readouterr().out


def test_resnet_script_fast(tmp_path, capsys):
    out = tmp_path / "resnet.json"
    # An empty cache: the throw-away baseline (what a fresh clone gets), so this is the same everywhere.
    payload = run(criteria_resnet20_fmnist, ["--fast", "--criteria", "l1", "random", "no_such_criterion",
                                             "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    check_common(payload, out)
    assert payload["baseline"].startswith("tiny")
    assert {r["method"] for r in payload["records"]} == {"l1", "random"}
    for record in payload["records"]:
        assert record["budget"] == 0.5 and abs(record["macs_kept"] - 0.5) <= 0.01
        for key in ("accuracy_pruned", "accuracy_recalibrated"):
            assert 0.0 <= record[key] <= 1.0
        assert set(record["accuracy_finetuned"]) == {"1"}
        assert 0.0 <= record["accuracy_finetuned"]["1"] <= 1.0
    # A criterion that fails is skipped with its reason, not fatal.
    assert [s["method"] for s in payload["skipped"]] == ["no_such_criterion"]
    assert "unknown importance" in payload["skipped"][0]["reason"]
    assert "skipped no_such_criterion" in capsys.readouterr().out
