"""What every training-time pruner shares: the coupling groups of the model (computed once), a
keep-mask per group, scoring and selection through fxprune's own stages, and ``finalize()``,
which prunes physically through the normal ``plan``/``apply`` path."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn

from .. import importance as importance_
from ..api import plan as make_plan
from ..budget import CostModel
from ..errors import PolicyError
from ..policy import Policy
from ..rewrite import apply
from ..select import select
from ..trace import check_inputs
from . import distributed
from .sites import ChannelSites, dense_tensor, unwrap


def analysis_policy(policy: Policy) -> Policy:
    """The policy's structural settings (ignore, min_channels, exact_only) with nothing removed."""
    return dataclasses.replace(policy, importance="l1", ratio=0.0, flops=None, params=None,
                               latency=None, overrides=(), structures=())


def _signature(g) -> tuple:
    return g.size, tuple((pm.target, pm.dim, pm.role, pm.positions) for pm in g.params)


class TrainingPruner:
    """Base of the training-time pruners: groups, masks, selection, ``remove()`` and ``finalize()``.

    ``keep[gid]`` is a bool tensor per prunable group (True = channel kept). Subclasses decide how
    masks change during training and what the forward hooks multiply channels by
    (``_factor(gid)``). The model is modified only by hooks (and parametrizations for parameters
    used functionally); ``remove()`` and ``finalize()`` take them all off.
    """

    placement = "exit"

    def __init__(self, model: nn.Module, policy: Policy, example_inputs: Any, *,
                 leaf_modules: Iterable = (), concrete_args: dict | None = None):
        if not isinstance(policy, Policy):
            raise PolicyError(f"policy must be a fxprune.Policy, got {type(policy).__name__}")
        if policy.latency is not None:
            raise PolicyError("training-time pruning supports flops= and params= budgets, not latency=")
        self.model = unwrap(model)
        self.policy = policy
        self.example_inputs = check_inputs(example_inputs)
        self._trace_kwargs = {"leaf_modules": tuple(leaf_modules), "concrete_args": concrete_args}
        self.plan = make_plan(self.model, analysis_policy(policy), self.example_inputs, **self._trace_kwargs)
        self.groups = [g for g in self.plan.groups
                       if not g.blocked and not (policy.exact_only and not g.exact)]
        self.keep = {g.id: torch.ones(g.size, dtype=torch.bool) for g in self.groups}
        self.cost = CostModel(self.plan.traced, self.plan.groups, self.plan.analysis)
        self._modules = dict(self.plan.traced.named_modules())
        self.sites = ChannelSites(self.plan, self.model, self.groups, self.placement)
        self.steps = 0
        self.finalized: fx.GraphModule | None = None

    # ----- masks -----------------------------------------------------------------------------
    def group(self, gid: int):
        return self.plan.groups[gid]

    def removed(self) -> dict[int, tuple[int, ...]]:
        """``{group id: removed channels}`` of the current masks."""
        return {gid: tuple((~k).nonzero().flatten().tolist()) for gid, k in self.keep.items()}

    def macs_kept(self) -> float:
        """Fraction of the model's MACs the current masks keep (``fxprune.budget.CostModel``)."""
        return float(self.cost.fractions({gid: ~k for gid, k in self.keep.items()})["macs"])

    def params_kept(self) -> float:
        """Fraction of the model's parameters the current masks keep."""
        return float(self.cost.fractions({gid: ~k for gid, k in self.keep.items()})["params"])

    def sync_traced(self) -> fx.GraphModule:
        """Copy the model's current (dense) parameters and buffers into ``plan.traced``, the
        module importance criteria read, and return it."""
        with torch.no_grad():
            for name, tensor in list(self.plan.traced.named_parameters()) + list(self.plan.traced.named_buffers()):
                tensor.copy_(dense_tensor(self.model, name).detach().to(tensor.device))
        return self.plan.traced

    def score(self, importance: Any, calibration: Iterable | None = None, loss_fn: Any = None,
              options: dict | None = None, groups: list | None = None) -> dict[int, torch.Tensor]:
        """Scores of every prunable group by a registered criterion name or a callable, on the
        current dense weights; averaged over ranks under torch.distributed (data-dependent
        criteria see different batches on different ranks)."""
        scorer = importance_.get(importance)
        ctx = importance_.ImportanceContext(self.sync_traced(), self.plan.groups, self.example_inputs,
                                            calibration, loss_fn, self.policy, dict(options or {}))
        scores = {g.id: torch.as_tensor(scorer(g, ctx), dtype=torch.float64).detach().cpu().reshape(-1).clone()
                  for g in (groups if groups is not None else self.groups)}
        return distributed.all_reduce_scores_(scores)

    def choose(self, scores: dict[int, torch.Tensor], policy: Policy | None = None) -> dict[int, torch.Tensor]:
        """Keep-masks from scores under ``policy`` (default: the pruner's), through
        ``fxprune.select`` (ratio or budget, local or global ranking, min_channels, round_to,
        overrides); broadcast from rank 0 so every rank holds the same masks."""
        policy = policy or self.policy
        cost = self.cost if (policy.budget or policy.allocation == "cost") else None
        select(self.plan.groups, scores, policy, cost, self._modules)
        keep = {}
        for g in self.groups:
            k = torch.ones(g.size, dtype=torch.bool)
            k[list(g.removed)] = False
            keep[g.id] = k
        for g in self.plan.groups:
            g.removed, g.note = (), ""
        distributed.broadcast_([keep[gid] for gid in sorted(keep)])
        return keep

    # ----- hooks -----------------------------------------------------------------------------
    def _factor(self, gid: int):
        """What the hooks multiply group ``gid``'s channels by: ``(factor, straight_through)`` or None."""
        raise NotImplementedError

    def attach(self) -> None:
        """(Re)install the hooks on the model."""
        self.sites.attach(self._factor)

    def remove(self) -> None:
        """Take every hook and parametrization off the model (the model is then the plain dense
        model again; masks are kept in ``keep``)."""
        self.sites.detach()

    def hooks_attached(self) -> bool:
        """True while any hook or parametrization of this pruner is on the model."""
        return self.sites.attached

    # ----- the end ---------------------------------------------------------------------------
    def _before_finalize(self) -> None:
        """Subclasses fold what they must into the weights here (hooks still attached)."""

    def finalize(self) -> fx.GraphModule:
        """Remove all hooks and return the physically pruned ``torch.fx.GraphModule``: a fresh
        ``fxprune.plan`` of the model whose groups lose exactly the masked channels, then
        ``fxprune.apply``. ``fxprune.verify(result).ok`` holds (the mask oracle on the final
        masks); ``result.meta["fxprune"]`` is the plan. The model itself is left dense and
        hook-free. Under torch.distributed the model's parameters and buffers are first broadcast
        from rank 0 (DDP syncs buffers only at the start of a forward), so every rank returns the
        same pruned model."""
        self._before_finalize()
        self.remove()
        if distributed.is_distributed():  # buffers (BN statistics) last synced at the last forward
            with torch.no_grad():
                distributed.broadcast_([*self.model.parameters(), *self.model.buffers()])
        final = make_plan(self.model, analysis_policy(self.policy), self.example_inputs, **self._trace_kwargs)
        if [_signature(g) for g in final.groups] != [_signature(g) for g in self.plan.groups]:
            raise RuntimeError("the model's structure changed during training: its coupling groups differ")
        for g in final.groups:
            if g.id in self.keep and not bool(self.keep[g.id].all()):
                g.removed = tuple((~self.keep[g.id]).nonzero().flatten().tolist())
                g.note = f"removed by training-time masks ({type(self).__name__})"
        final.selection = {"scope": "training-masks", "method": type(self).__name__,
                           "macs_kept": self.macs_kept(), "params_kept": self.params_kept()}
        self.finalized = apply(final)
        return self.finalized
