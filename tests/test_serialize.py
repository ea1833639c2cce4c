"""Plans as JSON; rebuilding the pruned architecture so a pruned state_dict loads."""
import json

import pytest
import torch
import torchvision

import fxprune
from fxprune.serialize import PlanMismatchError, load_plan, rebuild, save_plan
from zoo import build


@pytest.mark.parametrize("name", ["concat", "flatten_heads", "split_chunk", "depthwise"])
def test_rebuild_then_load_pruned_state_dict(name, tmp_path):
    model, x = build(name)
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5), x)
    path = save_plan(pruned.meta["fxprune"], tmp_path / "plan.json")
    assert path.stat().st_size < 20_000
    fresh, _ = build(name, seed=7)  # same architecture, other weights
    again = rebuild(fresh, path, x)
    again.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        a, b = again(*x), pruned(*x)
    flat = lambda o: [o] if isinstance(o, torch.Tensor) else [t for v in (o.values() if isinstance(o, dict) else o) for t in flat(v)]
    assert all(torch.equal(u, v) for u, v in zip(flat(a), flat(b)))


def test_plain_load_state_dict_fails_but_rebuild_works(tmp_path):
    model = torchvision.models.resnet18()
    x = (torch.randn(1, 3, 64, 64),)
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5), x)
    with pytest.raises(RuntimeError, match="size mismatch"):
        torchvision.models.resnet18().load_state_dict(pruned.state_dict())
    save_plan(pruned.meta["fxprune"], tmp_path / "p.json")
    again = rebuild(torchvision.models.resnet18(), tmp_path / "p.json", x)
    again.load_state_dict(pruned.state_dict())


def test_mismatched_plan_is_refused(tmp_path):
    x = (torch.randn(1, 3, 64, 64),)
    pruned = fxprune.transform(torchvision.models.resnet18(), fxprune.Policy(ratio=0.5), x)
    save_plan(pruned.meta["fxprune"], tmp_path / "p.json")
    with pytest.raises(PlanMismatchError, match="another architecture"):
        rebuild(torchvision.models.resnet34(), tmp_path / "p.json", x)


@pytest.mark.parametrize("content, words", [
    (b"{not json", "not a JSON plan file"),
    (json.dumps({"format": "other"}).encode(), "not an fxprune plan"),
    (json.dumps({"format": "fxprune.plan", "version": 99, "groups": []}).encode(), "newer"),
    (b"\x80\x81\x82", "not a JSON plan file"),
])
def test_corrupt_plan_files(tmp_path, content, words):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(fxprune.LoadError) as info:
        load_plan(path)
    assert words in str(info.value) and str(path) in str(info.value)


def test_missing_plan_file(tmp_path):
    with pytest.raises(fxprune.LoadError, match="no such file"):
        load_plan(tmp_path / "nope.json")


def test_truncated_or_unreadable_plan_file_names_the_path(tmp_path):
    model, x = build("concat")
    path = save_plan(fxprune.plan(model, fxprune.Policy(ratio=0.5), x), tmp_path / "plan.json")
    text = path.read_text()
    for cut in (1, len(text) // 2, len(text) - 2):
        path.write_text(text[:cut])
        with pytest.raises(fxprune.LoadError, match="not a JSON plan file") as info:
            load_plan(path)
        assert str(path) in str(info.value)
    with pytest.raises(fxprune.LoadError, match="cannot read the file") as info:
        load_plan(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_rebuild_with_state_dict_gives_the_pruned_model(tmp_path):
    model, x = build("residual")
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5), x)
    path = save_plan(pruned.meta["fxprune"], tmp_path / "plan.json")
    again = rebuild(build("residual", seed=5)[0], path, x, state_dict=pruned.state_dict())
    assert list(again.state_dict()) == list(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(again(*x), pruned(*x))
