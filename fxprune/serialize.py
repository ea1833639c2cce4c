"""Plans as small JSON files, and rebuilding a pruned architecture from the original model.

The usual complaint about pruning tools is "size mismatch" when loading a pruned state_dict into
the original architecture. Save the plan, and ``rebuild`` re-creates the pruned architecture
from the original model class; then ``load_state_dict`` the pruned weights.

A plan file is data, never code, and it is checked field by field before it is used
(:func:`check_plan`): a wrong type, a missing field, a group that would lose every channel or a
group left out is an error naming the field, not a model that differs silently.

Example:
    >>> import fxprune, torch, tempfile, os
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
    >>> x = (torch.randn(1, 3, 8, 8),)
    >>> pruned = fxprune.transform(m, fxprune.Policy(ratio=0.5), x)
    >>> path = save_plan(pruned.meta["fxprune"], os.path.join(tempfile.mkdtemp(), "plan.json"))
    >>> again = rebuild(m, path, x, state_dict=pruned.state_dict())
    >>> torch.equal(again(*x), pruned(*x))
    True
"""
from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .atomic import write_text
from .errors import FxPruneError
from .exporters import LoadError
from .group_kinds import KINDS

FORMAT, VERSION = "fxprune.plan", 1
_FIX = "write the plan again with fxprune.save_plan(plan, path); plan files are not meant to be edited"


class PlanMismatchError(FxPruneError, ValueError):
    """A saved plan does not fit the model it is applied to (or the state_dict does not fit the
    rebuilt architecture); the message names the group or parameter.

    Example:
        >>> isinstance(PlanMismatchError("saved group 3 has no match"), ValueError)
        True
    """


class PlanFormatError(LoadError):
    """A plan (file or dict) does not have the plan format: ``field`` names the offending entry
    (e.g. ``groups[2].removed[0]``) and the message says what was expected and what to do.

    Example:
        >>> err = PlanFormatError("plan.json", "version", "expected an integer, got '1' (str)")
        >>> err.field, isinstance(err, LoadError)
        ('version', True)
        >>> str(err).startswith("cannot load 'plan.json': field 'version': expected an integer")
        True
    """

    def __init__(self, path: str | os.PathLike, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(path, f"field {field!r}: {problem}; {_FIX}")


class EditedWeightsWarning(UserWarning):
    """``rebuild`` of a plan whose criterion edited weights (e.g. SCP compensation) was not given
    the pruned state_dict: the edited parameters still hold the original model's values.

    Example:
        >>> issubclass(EditedWeightsWarning, UserWarning)
        True
    """


def _signature(group) -> list[str]:
    return sorted(f"{p.target}[{p.dim}]:{p.role}" for p in group.params)


def plan_to_dict(plan) -> dict:
    """A JSON-friendly description: the policy and, per group, its signature, kind
    (``fxprune.group_kinds``) and removed channels. ``kind`` is informational: plans written
    before it existed load and rebuild the same.

    ``edited`` lists the parameters the importance criterion edited before slicing (SCP's
    compensation, for one); their edited values are in the pruned model's state_dict, not here.

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
        >>> d = plan_to_dict(fxprune.plan(m, fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 8, 8),)))
        >>> d["groups"][0]["size"], d["groups"][0]["kind"], len(d["groups"][0]["removed"])
        (8, 'channel', 4)
    """
    return {
        "format": FORMAT, "version": VERSION, "model": type(plan.traced).__name__,
        "policy": plan.policy.to_dict(),
        "input_shapes": [list(t.shape) for t in plan.example_inputs if isinstance(t, torch.Tensor)],
        "groups": [{"id": g.id, "size": g.size, "kind": getattr(g, "kind", "channel"), "signature": _signature(g),
                    "removed": list(g.removed)} for g in plan.groups],
        "edited": sorted(plan.edits),
    }


def save_plan(plan, path: str | os.PathLike) -> Path:
    """Write ``plan_to_dict(plan)`` as JSON (a few KB) and return the path.

    The file is replaced atomically (:func:`fxprune.atomic.atomic_write`): an interrupted or
    failed save leaves the previous file as it was.

    Example:
        >>> import fxprune, torch, tempfile, os
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
        >>> p = fxprune.plan(m, fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 8, 8),))
        >>> path = save_plan(p, os.path.join(tempfile.mkdtemp(), "plan.json"))
        >>> load_plan(path)["format"]
        'fxprune.plan'
    """
    return write_text(path, json.dumps(plan_to_dict(plan), indent=1))


# --- the plan schema: one row per field, checked in order -----------------------------------

def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (bool, int, float, str)):
        return f"{json.dumps(value)[:60]} ({type(value).__name__})"
    return {list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is an int to Python, never to a plan


def _int_list(value: Any, field: str, expected: str) -> list[tuple[str, str]]:
    if not isinstance(value, list):
        return [(field, f"expected {expected}, got {_kind(value)}")]
    return [(f"{field}[{i}]", f"expected an integer, got {_kind(v)}")
            for i, v in enumerate(value) if not _is_int(v) or v < 0][:1]


_Rule = tuple[str, bool, Callable[[Any], bool], str]
_TOP: list[_Rule] = [  # field, required, check, what is expected
    ("format", True, lambda v: v == FORMAT, f"the string {FORMAT!r} (is this an fxprune plan?)"),
    ("version", True, lambda v: _is_int(v) and v >= 1, "a positive integer"),
    ("model", False, lambda v: isinstance(v, str), "a string (the traced model's class name)"),
    ("policy", False, lambda v: isinstance(v, dict), "an object (Policy.to_dict())"),
    ("input_shapes", False, lambda v: isinstance(v, list) and all(
        isinstance(s, list) and all(_is_int(d) and d >= 0 for d in s) for s in v),
     "a list of shapes, each a list of non-negative integers"),
    ("groups", True, lambda v: isinstance(v, list) and all(isinstance(g, dict) for g in v),
     "a list of group objects"),
    ("edited", False, lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
     "a list of parameter names"),
]
_GROUP: list[_Rule] = [
    ("id", True, _is_int, "an integer"),
    ("size", True, lambda v: _is_int(v) and v >= 1, "a positive integer (the group's channel count)"),
    ("signature", True, lambda v: isinstance(v, list) and v and all(isinstance(s, str) for s in v),
     "a non-empty list of strings such as 'conv.weight[0]:producer'"),
    ("removed", True, lambda v: isinstance(v, list), "a list of integer channel indices"),
    ("kind", False, lambda v: v in KINDS, "one of " + ", ".join(map(repr, KINDS)) + " (optional)"),
]


def _rule_problems(data: dict, rules: list[_Rule], prefix: str) -> list[tuple[str, str]]:
    out = []
    for name, required, ok, expected in rules:
        if name not in data:
            if required:
                out.append((prefix + name, f"missing; expected {expected}"))
        elif not ok(data[name]):
            out.append((prefix + name, f"expected {expected}, got {_kind(data[name])}"))
    return out


def _group_problems(group: dict, at: str) -> list[tuple[str, str]]:
    problems = _rule_problems(group, _GROUP, at + ".")
    if problems:
        return problems
    removed, size = group["removed"], group["size"]
    problems = _int_list(removed, at + ".removed", "a list of integer channel indices")
    if problems:
        return problems
    out_of_range = [c for c in removed if c >= size]
    if out_of_range:
        return [(at + ".removed", f"channel {out_of_range[0]} is out of range for a group of "
                                  f"{size} channels (valid: 0..{size - 1})")]
    if len(set(removed)) != len(removed):
        return [(at + ".removed", f"lists a channel twice ({sorted(removed)})")]
    if len(removed) >= size:
        return [(at + ".removed", f"removes all {size} channels of the group; at least one must stay")]
    return []


def check_plan(data: Any, source: str | os.PathLike = "<plan dict>") -> dict:
    """Check that ``data`` has the plan format; returns it, or raises :class:`PlanFormatError`
    naming ``source`` and the first offending field.

    Checked: ``format``, ``version`` (an integer, not newer than this fxprune reads), the
    optional ``model``/``policy``/``input_shapes``/``edited`` types (and the policy's optional
    ``prune_outputs``: True, False or a list of output indices/names), and for each group an
    integer ``id`` (unique), a positive ``size``, a non-empty ``signature`` (unique) and
    ``removed``: distinct integers in ``0..size-1`` that leave at least one channel; an optional
    ``kind`` must be a group kind (``fxprune.group_kinds.KINDS``). Whether the
    groups fit a model is checked by :func:`rebuild`.

    Example:
        >>> plan = {"format": "fxprune.plan", "version": 1,
        ...         "groups": [{"id": 0, "size": 4, "signature": ["c.weight[0]:producer"], "removed": [1.5]}]}
        >>> try:
        ...     check_plan(plan)
        ... except PlanFormatError as err:
        ...     print(err.field, "|", err.problem)
        groups[0].removed[0] | expected an integer, got 1.5 (float)
    """
    if not isinstance(data, dict):
        raise PlanFormatError(source, "(top level)", f"expected a JSON object, got {_kind(data)}")
    problems = _rule_problems(data, _TOP, "")
    if not problems and data["version"] > VERSION:
        raise LoadError(source, f"plan version {data['version']} is newer than this fxprune reads "
                                f"({VERSION}); upgrade fxprune")
    for i, group in enumerate(data["groups"] if not problems else []):
        problems += _group_problems(group, f"groups[{i}]")
        if problems:
            break
    for key in ("id", "signature") if not problems else ():
        seen: dict = {}
        for i, group in enumerate(data["groups"]):
            value = json.dumps(group[key])
            if value in seen:
                problems.append((f"groups[{i}].{key}", f"repeats groups[{seen[value]}].{key} ({value[:80]})"))
                break
            seen[value] = i
    if not problems:
        problems = _policy_problems(data.get("policy"))
    if problems:
        raise PlanFormatError(source, *problems[0])
    return data


def _policy_problems(policy: Any) -> list[tuple[str, str]]:
    """The saved policy's ``prune_outputs`` (optional: plans written before it load as False)
    must be a valid ``Policy.prune_outputs`` value: ``rebuild`` pins outputs by it."""
    if not isinstance(policy, dict) or "prune_outputs" not in policy:
        return []
    from .errors import PolicyError
    from .policy import _checked_prune_outputs
    try:
        _checked_prune_outputs(policy["prune_outputs"])
    except PolicyError as err:
        return [("policy.prune_outputs", str(err))]
    return []


def _saved_prune_outputs(data: dict) -> Any:
    """``Policy.prune_outputs`` of a saved plan (False when the plan has none)."""
    value = (data.get("policy") or {}).get("prune_outputs", False)
    return value if isinstance(value, bool) else tuple(value)


def _saved_coupling(data: dict) -> dict:
    """The ``structures`` a rebuild needs to couple as the plan did: naming ``query-heads`` switches
    grouped-query attention to query-head groups (``fxprune.coupling.gqa_rules``); ratios do not matter."""
    saved = (data.get("policy") or {}).get("structures") or {}
    return {"query-heads": 0.0} if isinstance(saved, dict) and "query-heads" in saved else {}


def load_plan(path: str | os.PathLike) -> dict:
    """Read and check a plan file (:func:`check_plan`); a missing, unreadable, corrupt or foreign
    file, or one with a bad field, raises :class:`LoadError` naming the path (and the field).

    Example:
        >>> import os, tempfile
        >>> bad = os.path.join(tempfile.mkdtemp(), "plan.json")
        >>> _ = open(bad, "w").write('{"format": "fxprune.plan", "version": "1", "groups": []}')
        >>> try:
        ...     load_plan(bad)
        ... except LoadError as err:
        ...     print(err.field)
        version
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoadError(path, "no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise LoadError(path, f"not a JSON plan file ({err}); {_FIX}") from None
    except OSError as err:
        raise LoadError(path, f"cannot read the file ({err.strerror or err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise LoadError(path, f"not an fxprune plan (format {found!r}, expected {FORMAT!r})")
    return check_plan(data, path)


def _match_groups(data: dict, groups: list, source: str) -> None:
    """Give each of the model's groups its saved removal; every group must be in the plan."""
    by_signature = {tuple(_signature(g)): g for g in groups}
    for i, saved in enumerate(data["groups"]):
        g = by_signature.pop(tuple(saved["signature"]), None)
        if g is None or g.size != saved["size"]:
            what = "has no match in this model" if g is None else f"has {g.size} channels here, not {saved['size']}"
            raise PlanMismatchError(f"{source}: groups[{i}] (saved group {saved['id']}: "
                                    f"{', '.join(saved['signature'][:3])}...) {what}: was the plan made "
                                    "for another architecture?")
        bad = [c for c in saved["removed"] if c in g.pinned]
        if bad:
            raise PlanMismatchError(f"{source}: groups[{i}].removed: channels {bad[:5]} cannot be removed in "
                                    f"this model ({g.pinned[bad[0]]})")
        g.removed = tuple(sorted(saved["removed"]))
    if by_signature:
        missing = [", ".join(sig[:3]) for sig in by_signature][:3]
        raise PlanMismatchError(f"{source}: groups: the plan has no entry for {len(by_signature)} of the "
                                f"model's {len(groups)} groups (e.g. {'; '.join(missing)}): a plan lists every "
                                "group, those that lose nothing too; was a group deleted from the file, or "
                                "the plan made for another architecture? " + _FIX)


def _load_pruned_weights(result: torch.nn.Module, state_dict: dict, source: str) -> None:
    try:
        result.load_state_dict(state_dict)
    except RuntimeError as err:
        raise PlanMismatchError(f"{source}: the state_dict does not fit the rebuilt architecture: "
                                f"{' '.join(str(err).split())[:800]}; pass the state_dict of the model "
                                "this plan pruned") from err


def rebuild(model: torch.nn.Module, plan: Any, example_inputs: Any, *, state_dict: dict | None = None,
            leaf_modules: Iterable = (), concrete_args: dict | None = None) -> torch.fx.GraphModule:
    """The pruned architecture of a saved plan (a path or a :func:`plan_to_dict` dict), built
    from the original model; with ``state_dict``, also the pruned model's weights.

    What it restores: the structure (every group cut to the saved channels, module
    hyper-parameters and literal sizes updated) with weights *sliced from* ``model``. A plan does
    not hold weights: parameters that the importance criterion edited before slicing (listed in
    ``plan["edited"]``, e.g. SCP's compensation) come out with ``model``'s unedited values, and
    fine-tuned weights are not in a plan either. Pass ``state_dict=pruned.state_dict()`` (or
    call ``load_state_dict`` afterwards) to get the pruned model itself; its keys are the
    original parameter names. An edited plan rebuilt without a state_dict warns
    (:class:`EditedWeightsWarning`). The plan is checked first (:func:`check_plan`); a group of
    the model missing from the plan, or a saved group the model does not have, is a
    :class:`PlanMismatchError`.

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
        >>> x = (torch.randn(1, 3, 8, 8),)
        >>> pruned = fxprune.transform(m, fxprune.Policy(ratio=0.5), x)
        >>> again = rebuild(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3)),
        ...                 plan_to_dict(pruned.meta["fxprune"]), x, state_dict=pruned.state_dict())
        >>> torch.equal(again(*x), pruned(*x))
        True
    """
    from .api import analyse_model
    from .plan import Plan
    from .policy import Policy
    from .rewrite import apply
    from .trace import check_inputs
    source = "<plan dict>" if isinstance(plan, dict) else str(plan)
    data = check_plan(plan) if isinstance(plan, dict) else load_plan(plan)
    inputs = check_inputs(example_inputs)
    timings: dict[str, float] = {}
    policy = Policy(importance="l1", ratio=0.0, prune_outputs=_saved_prune_outputs(data),
                    structures=_saved_coupling(data))
    gm, an, groups, comp_to_group, index = analyse_model(model, policy, inputs, timings, leaf_modules,
                                                         concrete_args)
    _match_groups(data, groups, source)
    start = time.perf_counter()
    result = apply(Plan(gm, policy, groups, inputs, an, comp_to_group, index, {}, timings))
    timings["rewrite"] = time.perf_counter() - start
    if state_dict is not None:
        _load_pruned_weights(result, state_dict, source)
    elif data.get("edited"):
        edited = data["edited"]
        warnings.warn(f"{source}: the plan's criterion edited {len(edited)} parameters before slicing "
                      f"({', '.join(edited[:4])}{', ...' if len(edited) > 4 else ''}); the rebuilt model holds "
                      "the original model's values for them: pass state_dict=pruned.state_dict() or load "
                      "it before use", EditedWeightsWarning, stacklevel=2)
    return result
