"""The pipeline: trace -> shapes -> coupling -> importance -> select, then rewrite."""
from __future__ import annotations

import time
from typing import Any, Iterable

import torch
import torch.fx as fx

from . import importance as importance_
from .budget import CostModel
from .errors import FxPruneError, StageError
from .gc_pause import paused_collector
from .input_check import check_arity
from .plan import Plan
from .policy import Policy
from .policy_check import check_names
from .rewrite import apply
from .select import select
from .analysis import analyse_model, stage as _stage
from .capture.fx_trace import check_inputs


def _score(groups: list, policy: Policy, ctx: importance_.ImportanceContext) -> dict:
    scorer = importance_.get(policy.importance)
    scores = {}
    for g in groups:
        if g.blocked or (policy.exact_only and not g.exact):
            continue
        try:
            s = scorer(g, ctx)
        except FxPruneError:
            raise
        except Exception as err:
            raise StageError("importance", g.name, f"{type(err).__name__}: {err}") from err
        scores[g.id] = torch.as_tensor(s, dtype=torch.float64).detach().cpu().reshape(-1)
    return scores


def plan(model: torch.nn.Module, policy: Policy, example_inputs: Any, *, leaf_modules: Iterable = (),
         concrete_args: dict | None = None, calibration: Iterable | None = None,
         loss_fn: Any = None, importance_options: dict | None = None,
         latency_table: Any = None, capture: str = "auto") -> Plan:
    """Decide what to prune, changing nothing. See ``Plan``.

    ``capture`` picks the front end: ``"fx"`` (``torch.fx.symbolic_trace``), ``"export"``
    (``torch.export``, non-strict) or ``"auto"`` (FX, then export when FX fails); the plan records
    which one ran and why (``plan.capture``, shown by ``fxprune.explain``). ``leaf_modules``
    apply to the FX front end; ``concrete_args`` to both.

    The plan's traced module reads the model's parameters and buffers without copying them
    (fxprune never writes to them); ``apply`` copies them, so the pruned module owns its
    tensors. A model trained further between ``plan`` and ``apply`` is pruned with its new
    values but the channels chosen from the old ones: plan again after training.

    Example:
        >>> import fxprune, torchvision, torch
        >>> p = fxprune.plan(torchvision.models.resnet18(), fxprune.Policy("l1", 0.5),
        ...                  (torch.randn(1, 3, 64, 64),))
        >>> len(p.groups) > 0
        True
    """
    if not isinstance(policy, Policy):
        raise FxPruneError(f"policy must be a fxprune.Policy, got {type(policy).__name__}")
    inputs = check_inputs(example_inputs)
    check_arity(model, inputs, concrete_args)
    check_names(policy, model)
    timings: dict[str, float] = {}
    gm, an, groups, comp_to_group, index = analyse_model(model, policy, inputs, timings, leaf_modules,
                                                         concrete_args, capture)
    with _stage("importance", timings):
        ctx = importance_.ImportanceContext(gm, groups, inputs, calibration, loss_fn, policy,
                                            dict(importance_options or {}), modules=an.modules)
        scores = _score(groups, policy, ctx)
    with _stage("select", timings), paused_collector():
        policy = _selection_policy(policy, ctx)
        cost = None
        if policy.budget or policy.allocation == "cost":
            lut = latency_table
            if policy.latency is not None and lut is None:
                from .latency_lut import LatencyTable
                lut = LatencyTable.build(gm, an, inputs, device=policy.device)
            cost = CostModel(gm, groups, an, lut)
        selection = select(groups, scores, policy, cost, an.modules)
        if policy is not ctx.policy:
            selection["selection_policy"] = {k: v for k, v in policy.to_dict().items()
                                             if v != ctx.policy.to_dict().get(k)}
    with _stage("edits", timings):
        _collect_edits(groups, ctx)
    return Plan(gm, ctx.policy, groups, inputs, an, comp_to_group, index, dict(ctx.edits), timings, selection,
                dict(gm.meta.get("fxprune_capture", {})))


def _selection_policy(policy: Policy, ctx: importance_.ImportanceContext) -> Policy:
    """The policy ``select`` uses: the user's, unless the criterion has a
    ``selection_policy(policy, ctx) -> Policy`` method that derives how channels are ranked
    from its own scores (e.g. sensitivity's ``layer_rates="hessian"``: one global ranking of
    unnormalised second-order saliencies). The change is recorded in ``plan.selection``."""
    adjust = getattr(importance_.get(policy.importance), "selection_policy", None)
    if adjust is None:
        return policy
    chosen = adjust(policy, ctx)
    if not isinstance(chosen, Policy):
        raise StageError("select", None, f"selection_policy of {policy.importance!r} returned "
                                         f"{type(chosen).__name__}, not a Policy")
    return chosen


def _collect_edits(groups: list, ctx: importance_.ImportanceContext) -> None:
    """Criteria with an ``edits(group, ctx) -> {param: tensor}`` method (e.g. weight compensation)
    edit parameters once the removed channels are known; edits compose through ``ctx.current``."""
    make_edits = getattr(importance_.get(ctx.policy.importance), "edits", None)
    if make_edits is None:
        return
    for g in groups:
        if g.removed:
            for target, value in (make_edits(g, ctx) or {}).items():
                ctx.edits[target] = value.detach()


def transform(model: torch.nn.Module, policy: Policy, example_inputs: Any, **kwargs) -> fx.GraphModule:
    """Prune ``model`` and return a new, physically smaller ``torch.fx.GraphModule``.

    The model is not modified. The plan is stored at ``pruned.meta["fxprune"]``.

    Example:
        >>> import fxprune, torchvision, torch
        >>> m = torchvision.models.resnet18()
        >>> pruned = fxprune.transform(m, fxprune.Policy("l1", 0.5), (torch.randn(1, 3, 64, 64),))
        >>> sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in m.parameters())
        True
    """
    p = plan(model, policy, example_inputs, **kwargs)
    start = time.perf_counter()
    pruned = apply(p)
    p.timings["rewrite"] = time.perf_counter() - start
    return pruned
