"""Policies are checked: every field's type and value when built, names against the model when planned."""
import json

import pytest
import torch
from torch import nn

import fxprune
from fxprune.errors import PolicyError, PolicyNameError


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(Block(), Block()), nn.Conv2d(4, 2, 1))


X = (torch.randn(1, 3, 6, 6),)


# --- 1. names and patterns must name modules of the model ---------------------------------

def test_a_typo_in_ignore_is_an_error_suggesting_the_real_name():
    with pytest.raises(PolicyNameError) as info:
        fxprune.plan(_net(), fxprune.Policy(ignore=("1.0.conv_1",)), X)
    msg = str(info.value)
    assert "'1.0.conv_1'" in msg and "no module of the model" in msg and "did you mean '1.0.conv1'" in msg
    assert isinstance(info.value, PolicyError)
    assert "1.0.conv1" in info.value.problems["1.0.conv_1"]


def test_the_real_name_is_kept_whole():
    plan = fxprune.plan(_net(), fxprune.Policy(ignore=("1.0.conv1",)), X)
    owners = {p.owner: g for g in plan.groups for p in g.producers}
    assert owners["1.0.conv1"].removed == () and owners["1.1.conv1"].removed != ()


@pytest.mark.parametrize("overrides, words", [
    ({"1.0.conv9": 0.0}, "'1.0.conv9' is no module of the model; did you mean '1.0.conv2' or '1.0.conv1'"),
    ({"2.*": 0.0}, "pattern '2.*' matches no module of the model"),
    ({"blocks.*.conv1": 0.1}, "pattern 'blocks.*.conv1' matches no module of the model"),
])
def test_override_names_and_patterns_matching_nothing_are_errors(overrides, words):
    with pytest.raises(PolicyNameError) as info:
        fxprune.plan(_net(), fxprune.Policy(overrides=overrides), X)
    assert words in str(info.value)


def test_every_offending_entry_is_listed_at_once():
    with pytest.raises(PolicyNameError) as info:
        fxprune.plan(_net(), fxprune.Policy(ignore=("O",), overrides={"1.1.conv3": 0.2}), X)
    assert set(info.value.problems) == {"O", "1.1.conv3"}
    assert "ignore: 'O'" in str(info.value) and "overrides: '1.1.conv3'" in str(info.value)


def test_a_container_name_reaches_nothing_and_says_what_to_write():
    with pytest.raises(PolicyNameError, match=r"'1\.0' is a Block that owns no weight.*use the pattern '1\.0\.\*'"):
        fxprune.plan(_net(), fxprune.Policy(overrides={"1.0": 0.0}), X)
    with pytest.raises(PolicyNameError, match=r"ignore: '1' is a Sequential.*'1\.0\.conv1'"):
        fxprune.plan(_net(), fxprune.Policy(ignore="1"), X)


def test_matching_patterns_and_unmatched_types_are_fine():
    policy = fxprune.Policy(ignore=(nn.Linear, "2"), overrides={"1.*.conv1": 0.25, nn.Linear: 0.0})
    plan = fxprune.plan(_net(), policy, X)
    assert len(plan.groups) > 0


# --- 2. every field's type ----------------------------------------------------------------

@pytest.mark.parametrize("field, value, words", [
    ("exact_only", "no", "exact_only must be True or False (a bool); got 'no' (str)"),
    ("exact_only", 1, "exact_only must be True or False"),
    ("round_to", True, "round_to must be None or an integer >= 1 (an int, not a bool); got True (bool)"),
    ("round_to", 8.0, "round_to must be None or an integer"),
    ("min_channels", True, "min_channels must be an integer >= 1"),
    ("min_channels", 2.5, "min_channels must be an integer >= 1"),
    ("ratio", True, "ratio must be a number"),
    ("ratio", None, "ratio must be a number"),
    ("ratio", float("nan"), "ratio must be in [0, 1]"),
    ("ignore", None, "ignore must be a module name, a torch.nn.Module subclass or a tuple/list"),
    ("ignore", {"fc": 1}, "ignore must be a module name"),
    ("ignore", nn.Conv2d(1, 1, 1), "ignore must be a module name"),
    ("ignore", ("fc", None), "ignore entries must be module names"),
    ("overrides", None, "overrides must be a dict"),
    ("overrides", ["layer4.*", "fc"], "overrides must be a dict"),
    ("overrides", [("fc", 0.5, 1)], "overrides must be a dict"),
    ("overrides", {"fc": "0.5"}, "override ratio for 'fc' in overrides must be a number in [0, 1]; got '0.5' (str)"),
    ("overrides", {"fc": None}, "override ratio for 'fc'"),
    ("overrides", {"fc": True}, "override ratio for 'fc'"),
    ("overrides", {"fc": -0.1}, "override ratio for 'fc'"),
    ("overrides", {"fc": 1.5}, "override ratio for 'fc'"),
    ("overrides", {3: 0.5}, "override keys are module names"),
    ("scope", None, "scope must be one of local, global; got None"),
    ("scope", ["local"], "scope must be one of local, global"),
    ("normalize", 0, "normalize must be one of mean, max, lamp, none"),
    ("allocation", None, "allocation must be one of uniform, cost"),
    ("flops", "0.5", "flops is the fraction to keep, in (0, 1], or None; got '0.5' (str)"),
    ("params", True, "params is the fraction to keep"),
    ("latency", 0, "latency is the fraction to keep"),
    ("device", None, "device must be a device name"),
    ("device", "", "device must be a device name"),
    ("importance", None, "importance must be a registered name (str) or a callable"),
    ("importance", 3, "importance must be a registered name"),
])
def test_every_field_is_checked_with_a_message_naming_field_value_and_expectation(field, value, words):
    with pytest.raises(PolicyError) as info:
        fxprune.Policy(**{field: value})
    assert words in str(info.value)
    assert field in str(info.value) or field == "overrides"


@pytest.mark.parametrize("kwargs", [
    {"ignore": "fc"}, {"ignore": nn.Linear}, {"ignore": ["a", nn.Linear]}, {"ignore": {"a"}},
    {"overrides": [("fc", 0.5)]}, {"overrides": [["fc", 1]]}, {"overrides": {nn.Linear: 0}},
    {"round_to": None}, {"round_to": 8}, {"exact_only": True}, {"ratio": 0}, {"ratio": 1},
    {"flops": 1}, {"device": "cuda"},
])
def test_valid_values_still_work(kwargs):
    policy = fxprune.Policy(**kwargs)
    assert isinstance(policy.ignore, tuple) and isinstance(policy.overrides, tuple)
    json.dumps(policy.to_dict())


def test_policy_files_are_checked_the_same_way(tmp_path):
    from fxprune.policy_file import policy_from_file
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"ratio": 0.25, "round_to": 2, "exact_only": True, "ignore": ["fc"],
                                "overrides": {"layer4.*": 0.5}}))
    policy = policy_from_file(good)
    assert policy.exact_only is True and policy.overrides == (("layer4.*", 0.5),)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"exact_only": "false"}))
    with pytest.raises(PolicyError, match="exact_only must be True or False"):
        policy_from_file(bad)
