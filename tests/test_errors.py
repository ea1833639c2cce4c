"""Bad input gets a clear error, and nothing is left half-done."""
import pytest
import torch
import torch.nn as nn

import fxprune
from model_state import assert_unchanged, snapshot


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


class Flag(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x, flip=False):
        y = self.conv(x)
        if flip:
            y = -y
        return y


def test_untraceable_model_names_module_line_and_fix():
    with pytest.raises(fxprune.TraceError) as info:
        fxprune.plan(DataDependent(), fxprune.Policy(), (torch.randn(1, 3, 8, 8),))
    msg = str(info.value)
    assert "DataDependent" in msg and "if x.sum() > 0" in msg
    assert "leaf_modules=" in msg and "concrete_args=" in msg


def test_leaf_modules_make_it_traceable_and_block_the_leaf():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), Gate(), nn.Conv2d(8, 4, 1))
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 8, 8),), leaf_modules=[Gate])
    assert all(not g.removed for g in plan.groups)
    assert any("(Gate)" in why and "not in fxprune's op table" in why for _, why in plan.blocked_ops)


def test_declared_leaf_semantics_unblock_it():
    class Scale(nn.Module):
        def forward(self, x):
            return x * 2
    fxprune.register_module_rule(Scale, fxprune.coupling.rules.passthrough)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), Scale(), nn.Conv2d(8, 4, 1)).double()
    x = (torch.randn(1, 3, 8, 8, dtype=torch.float64),)
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5), x, leaf_modules=[Scale])
    assert pruned.get_submodule("0").out_channels == 4
    assert fxprune.verify(pruned).max_error < 1e-9


def test_concrete_args():
    pruned = fxprune.transform(Flag(), fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 8, 8),),
                               concrete_args={"flip": True})
    assert isinstance(pruned, torch.fx.GraphModule)


def test_rejected_inputs_fail_first_with_the_models_message():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1))
    before = snapshot(model)
    with pytest.raises(fxprune.InputError) as info:
        fxprune.plan(model, fxprune.Policy(), (torch.randn(1, 5, 8, 8),))
    assert "expected input[1, 5, 8, 8] to have 3 channels" in str(info.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize("kwargs, words", [
    ({"ratio": 1.5}, "ratio must be in [0, 1]"),
    ({"ratio": "half"}, "ratio must be a number"),
    ({"min_channels": 0}, "min_channels"),
    ({"round_to": 0}, "round_to"),
    ({"ignore": (3,)}, "ignore entries"),
    ({"importance": "no-such"}, "registered: "),
])
def test_invalid_policies(kwargs, words):
    with pytest.raises(fxprune.PolicyError) as info:
        fxprune.Policy(**kwargs)
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_importance_lists_registered_names():
    with pytest.raises(fxprune.PolicyError) as info:
        fxprune.Policy(importance="magic")
    assert "l1" in str(info.value) and "l2" in str(info.value)


def test_ratio_one_never_empties_a_group():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    pruned = fxprune.transform(model, fxprune.Policy(ratio=1.0), (torch.randn(1, 3, 8, 8),))
    assert pruned.get_submodule("0").out_channels == 1
    plan = pruned.meta["fxprune"]
    assert "min_channels" in plan.groups[0].note


def test_failing_importance_names_stage_and_group_and_leaves_model_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1))
    before = snapshot(model)
    def broken(group, ctx):
        raise RuntimeError("boom")
    with pytest.raises(fxprune.StageError) as info:
        fxprune.transform(model, fxprune.Policy(importance=broken), (torch.randn(1, 3, 8, 8),))
    assert "importance" in str(info.value) and "boom" in str(info.value)
    assert_unchanged(model, before)


def test_wrong_score_shape_is_reported():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1))
    with pytest.raises(fxprune.StageError, match="expected \\(8,\\)"):
        fxprune.plan(model, fxprune.Policy(importance=lambda g, c: torch.ones(3)), (torch.randn(1, 3, 8, 8),))


def test_train_mode_is_preserved_and_not_changed():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)).train()
    before = snapshot(model)
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5), (torch.randn(2, 3, 8, 8),))
    assert_unchanged(model, before)
    assert pruned.training


def test_the_offending_line_is_found_in_a_checkout_named_fxprune(tmp_path):
    """User code under a directory called ``fxprune`` (a clone of this repository) is still the
    user's: only torch's and fxprune's own package directories are skipped."""
    from fxprune.capture.fx_trace import _offending_frame
    user_dir = tmp_path / "fxprune" / "tests"
    user_dir.mkdir(parents=True)
    source = user_dir / "user_model.py"
    source.write_text("def forward(x):\n    if x > 0:\n        raise ValueError('data-dependent')\n")
    namespace = {}
    exec(compile(source.read_text(), str(source), "exec"), namespace)
    with pytest.raises(ValueError) as info:
        namespace["forward"](1)
    assert _offending_frame(info.value).startswith(f"{source}:3 in forward")
