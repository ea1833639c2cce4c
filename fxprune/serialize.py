"""Plans as small JSON files, and rebuilding a pruned architecture from the original model.

The usual complaint about pruning tools is "size mismatch" when loading a pruned state_dict into
the original architecture. Save the plan, and ``rebuild`` re-creates the pruned architecture
from the original model class; then ``load_state_dict`` the pruned weights.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import FxPruneError
from .exporters import LoadError

FORMAT, VERSION = "fxprune.plan", 1


class PlanMismatchError(FxPruneError, ValueError):
    """A saved plan does not fit the model it is applied to."""


def _signature(group) -> list[str]:
    return sorted(f"{p.target}[{p.dim}]:{p.role}" for p in group.params)


def plan_to_dict(plan) -> dict:
    """A JSON-friendly description: the policy and, per group, its signature and removed channels.

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
        >>> d = plan_to_dict(fxprune.plan(m, fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 8, 8),)))
        >>> d["groups"][0]["size"], len(d["groups"][0]["removed"])
        (8, 4)
    """
    return {
        "format": FORMAT, "version": VERSION, "model": type(plan.traced).__name__,
        "policy": plan.policy.to_dict(),
        "input_shapes": [list(t.shape) for t in plan.example_inputs if isinstance(t, torch.Tensor)],
        "groups": [{"id": g.id, "size": g.size, "signature": _signature(g), "removed": list(g.removed)}
                   for g in plan.groups],
        "edited": sorted(plan.edits),
    }


def save_plan(plan, path: str | Path) -> Path:
    """Write ``plan_to_dict(plan)`` as JSON (a few KB) and return the path.

    Example:
        >>> import fxprune, torch, tempfile, os
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
        >>> p = fxprune.plan(m, fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 8, 8),))
        >>> path = save_plan(p, os.path.join(tempfile.mkdtemp(), "plan.json"))
        >>> load_plan(path)["format"]
        'fxprune.plan'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan_to_dict(plan), indent=1))
    return path


def load_plan(path: str | Path) -> dict:
    """Read and validate a plan file; a missing, corrupt or foreign file raises ``LoadError``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LoadError(path, "no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LoadError(path, f"not a JSON plan file ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LoadError(path, f"not an fxprune plan (format {data.get('format') if isinstance(data, dict) else None!r})")
    if data.get("version", 0) > VERSION:
        raise LoadError(path, f"plan version {data['version']} is newer than this fxprune reads ({VERSION})")
    if not isinstance(data.get("groups"), list):
        raise LoadError(path, "plan has no group list")
    return data


def rebuild(model: torch.nn.Module, plan: Any, example_inputs: Any, *, leaf_modules: Iterable = (),
            concrete_args: dict | None = None) -> torch.fx.GraphModule:
    """The pruned architecture of a saved plan, built from the original model (weights sliced from
    ``model``; load the pruned state_dict into it afterwards).

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
        >>> x = (torch.randn(1, 3, 8, 8),)
        >>> pruned = fxprune.transform(m, fxprune.Policy(ratio=0.5), x)
        >>> again = rebuild(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3)),
        ...                 plan_to_dict(pruned.meta["fxprune"]), x)
        >>> _ = again.load_state_dict(pruned.state_dict())
    """
    from .api import analyse_model
    from .plan import Plan
    from .policy import Policy
    from .rewrite import apply
    from .trace import check_inputs
    data = plan if isinstance(plan, dict) else load_plan(plan)
    if data.get("edited"):
        raise PlanMismatchError("this plan edited weights before slicing; rebuild the architecture and load "
                                "the pruned state_dict, which already holds the edited weights")
    inputs = check_inputs(example_inputs)
    timings: dict[str, float] = {}
    policy = Policy(importance="l1", ratio=0.0)
    gm, an, groups, comp_to_group, index = analyse_model(model, policy, inputs, timings, leaf_modules,
                                                         concrete_args)
    by_signature = {tuple(_signature(g)): g for g in groups}
    for saved in data["groups"]:
        g = by_signature.get(tuple(saved["signature"]))
        if g is None or g.size != saved["size"]:
            raise PlanMismatchError(f"saved group {saved['id']} ({', '.join(saved['signature'][:3])}...) "
                                    "has no match in this model: was the plan made for another architecture?")
        bad = [c for c in saved["removed"] if not 0 <= c < g.size or c in g.pinned]
        if bad:
            raise PlanMismatchError(f"saved group {saved['id']} removes channels {bad[:5]} this model cannot lose")
        g.removed = tuple(sorted(saved["removed"]))
    start = time.perf_counter()
    result = apply(Plan(gm, policy, groups, inputs, an, comp_to_group, index, {}, timings))
    timings["rewrite"] = time.perf_counter() - start
    return result
