"""Plan files are checked before use: every malformed field is an error naming the field and what
is expected, a plan that leaves out a group is refused, and plans of weight-editing criteria
(SCP, CPMC) rebuild the pruned model."""
import copy
import json
import warnings

import pytest
import torch

import fxprune
from fxprune.serialize import (EditedWeightsWarning, PlanFormatError, PlanMismatchError, check_plan,
                               load_plan, plan_to_dict, rebuild, save_plan)
from zoo import build


@pytest.fixture(scope="module")
def chain():
    """A conv chain pruned by half: its plan has three groups, the last one reaching the output."""
    model, x = build("conv_chain_2d")
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5), x)
    return model, x, pruned, plan_to_dict(pruned.meta["fxprune"])


def _set(path, value):
    def edit(plan):
        *parents, last = path
        target = plan
        for key in parents:
            target = target[key]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return edit


# (edit of a valid plan, field named in the error, words in the error)
BAD_FIELDS = {
    "removes_every_channel": (lambda p: p["groups"][0].update(removed=list(range(p["groups"][0]["size"]))),
                              "groups[0].removed", "removes all 8 channels"),
    "float_index": (_set(("groups", 0, "removed"), [1.5]), "groups[0].removed[0]", "got 1.5 (float)"),
    "string_index": (_set(("groups", 0, "removed"), ["1"]), "groups[0].removed[0]", 'got "1" (str)'),
    "bool_index": (_set(("groups", 0, "removed"), [True]), "groups[0].removed[0]", "got true (bool)"),
    "null_index": (_set(("groups", 0, "removed"), [None]), "groups[0].removed[0]", "got null"),
    "negative_index": (_set(("groups", 0, "removed"), [-1]), "groups[0].removed[0]", "expected an integer"),
    "null_removed": (_set(("groups", 0, "removed"), None), "groups[0].removed", "got null"),
    "out_of_range": (_set(("groups", 0, "removed"), [8]), "groups[0].removed", "out of range"),
    "repeated_index": (_set(("groups", 0, "removed"), [1, 1]), "groups[0].removed", "twice"),
    "missing_signature": (_set(("groups", 1, "signature"), KeyError), "groups[1].signature", "missing"),
    "empty_signature": (_set(("groups", 1, "signature"), []), "groups[1].signature", "non-empty list"),
    "string_size": (_set(("groups", 0, "size"), "8"), "groups[0].size", 'got "8" (str)'),
    "bool_size": (_set(("groups", 0, "size"), True), "groups[0].size", "got true (bool)"),
    "float_id": (_set(("groups", 0, "id"), 0.0), "groups[0].id", "got 0.0 (float)"),
    "repeated_signature": (lambda p: p["groups"][1].update(signature=p["groups"][0]["signature"]),
                           "groups[1].signature", "repeats groups[0].signature"),
    "repeated_id": (_set(("groups", 1, "id"), 0), "groups[1].id", "repeats groups[0].id"),
    "string_version": (_set(("version",), "1"), "version", 'got "1" (str)'),
    "bool_version": (_set(("version",), True), "version", "got true (bool)"),
    "missing_version": (_set(("version",), KeyError), "version", "missing"),
    "groups_not_a_list": (_set(("groups",), {"0": {}}), "groups", "expected a list of group objects"),
    "group_not_an_object": (_set(("groups",), [[1, 2]]), "groups", "expected a list of group objects"),
    "bad_input_shapes": (_set(("input_shapes",), [[1, "3", 8]]), "input_shapes", "non-negative integers"),
    "bad_edited": (_set(("edited",), [3]), "edited", "parameter names"),
    "policy_not_an_object": (_set(("policy",), "l1"), "policy", "an object"),
}


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
def test_malformed_field_is_an_error_naming_the_field(chain, tmp_path, case):
    model, x, _, good = chain
    edit, field, words = BAD_FIELDS[case]
    plan = copy.deepcopy(good)
    edit(plan)
    with pytest.raises(PlanFormatError) as info:
        check_plan(plan)
    assert info.value.field == field and words in str(info.value), str(info.value)
    assert "fxprune.save_plan" in str(info.value)  # says what to do

    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    with pytest.raises(PlanFormatError) as info:  # a LoadError naming the file
        load_plan(path)
    assert str(path) in str(info.value) and f"field {field!r}" in str(info.value)
    assert isinstance(info.value, fxprune.LoadError)
    with pytest.raises(PlanFormatError):  # never a rebuilt model
        rebuild(model, plan, x)
    with pytest.raises(PlanFormatError):
        rebuild(model, path, x)


@pytest.mark.parametrize("drop", ["all", "one"])
def test_plan_leaving_out_groups_is_refused(chain, tmp_path, drop):
    model, x, _, good = chain
    plan = copy.deepcopy(good)
    plan["groups"] = [] if drop == "all" else plan["groups"][1:]
    missing = len(good["groups"]) - len(plan["groups"])
    check_plan(plan)  # well formed: whether it fits the model is rebuild's question
    path = save_json(tmp_path / "plan.json", plan)
    with pytest.raises(PlanMismatchError) as info:
        rebuild(model, path, x)
    message = str(info.value)
    assert str(path) in message and "groups" in message
    assert f"no entry for {missing} of the model's {len(good['groups'])} groups" in message


def save_json(path, data):
    path.write_text(json.dumps(data))
    return path


def test_group_of_another_size_or_a_pinned_channel_is_refused(chain):
    model, x, _, good = chain
    plan = copy.deepcopy(good)
    plan["groups"][0]["size"] += 1
    with pytest.raises(PlanMismatchError, match=r"groups\[0\].*has 8 channels here, not 9"):
        rebuild(model, plan, x)
    plan = copy.deepcopy(good)
    last = plan["groups"][-1]
    assert last["removed"] == []  # the head's channels reach the output
    last["removed"] = [0]
    with pytest.raises(PlanMismatchError, match=r"groups\[2\]\.removed: channels \[0\] cannot be removed"):
        rebuild(model, plan, x)


def test_newer_version_says_to_upgrade(chain):
    plan = dict(chain[3], version=99)
    with pytest.raises(fxprune.LoadError, match="newer than this fxprune reads"):
        check_plan(plan)


def test_valid_plan_passes_unchanged(chain):
    plan = copy.deepcopy(chain[3])
    assert check_plan(plan) == chain[3]


# --- weight-editing criteria ----------------------------------------------------------------

def _outputs_equal(a, b):
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else all(map(_outputs_equal, a, b))


@pytest.mark.parametrize("importance", ["scp", "cpmc"])
def test_rebuild_works_for_weight_editing_criteria(tmp_path, importance):
    model, x = build("conv_chain_2d")
    pruned = fxprune.transform(model, fxprune.Policy(importance=importance, ratio=0.5), x)
    path = save_plan(pruned.meta["fxprune"], tmp_path / "plan.json")
    edited = load_plan(path)["edited"]
    if importance == "scp":
        assert edited, "SCP compensation should edit consumer weights"
    fresh, _ = build("conv_chain_2d", seed=3)  # the original architecture, other weights
    again = rebuild(fresh, path, x, state_dict=pruned.state_dict())
    assert list(again.state_dict()) == list(pruned.state_dict())
    with torch.no_grad():
        assert _outputs_equal(again(*x), pruned(*x))

    # without the state_dict: the structure, the unedited weights, and a warning naming them
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        structure = rebuild(model, path, x)
    edited_warnings = [w for w in caught if issubclass(w.category, EditedWeightsWarning)]
    assert bool(edited_warnings) == bool(edited)
    if edited:
        assert edited[0] in str(edited_warnings[0].message)
        assert not all(torch.equal(structure.state_dict()[n], pruned.state_dict()[n]) for n in edited)
    assert {k: v.shape for k, v in structure.state_dict().items()} == \
           {k: v.shape for k, v in pruned.state_dict().items()}
    structure.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert _outputs_equal(structure(*x), pruned(*x))


def test_rebuild_with_a_state_dict_of_another_model_names_the_mismatch(chain):
    model, x, pruned, plan = chain
    state = dict(pruned.state_dict())
    name = next(iter(state))
    state[name] = torch.zeros(1)
    with pytest.raises(PlanMismatchError, match="does not fit the rebuilt architecture") as info:
        rebuild(model, plan, x, state_dict=state)
    assert name in str(info.value)
