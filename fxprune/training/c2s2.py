"""C2S2 — cost-aware channel sparse selection (seed 2, arXiv 1904.03508), reconstructed.

Per coupling group a real-valued gate ``g`` (init 1) multiplies the group's channels after the
producers' norm (coupled producers share one gate). Phase 1 ("search") trains the gates with the
task loss plus ``λ_l · ||g_l||₁ / C_l``; the gates are then binarised, ``b = 1[|g| > τ]`` (at least
``min_channels`` kept), ``g`` is folded into the norm (or into the producer when no norm follows),
phase 2 ("finetune") trains with the binary gates, and the channels with ``b = 0`` are removed by
``finalize()`` through ``fxprune.plan``/``apply``. The binary gates act where the channels are
read (as the masks of ``DynamicPruner``, without straight-through), so phase 2 trains exactly the
network that ``finalize()`` returns. With ``progressive`` the groups go through search and
finetune a few at a time, in topological order.

The cost-aware mechanism: ``cost="loss"`` scales λ every ``adjust_every`` steps, by ``kappa_down``
when the task loss of the window exceeds ``(1 + delta)`` times the first window's (``ce0``), by
``kappa_up`` otherwise; ``cost="compute"`` weights each group's λ by its share of the MACs and
ends the search as soon as binarising would meet the policy's ``flops=``/``params=`` target;
``"both"`` does both. With a budget, the end of the last search (before its phase 2) removes
further channels by lowest ``|g|``, ranked as the policy says, until the budget holds
(``enforce_budget``). The gates live outside the model (``pruner.parameters()``).

The defaults marked [I] in METHODS.md are inferred, not the paper's: λ₀ 1e-3, δ 0.01, κ↓ 0.5,
κ↑ 1.1, τ 1e-2.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from ..policy import Policy
from . import distributed
from .base import TrainingPruner
from .sites import ChannelSites, dense_tensor

_COSTS = ("loss", "compute", "both", "none")


class C2S2Pruner(TrainingPruner):
    """C2S2 channel gates in a plain PyTorch loop.

    Put ``pruner.parameters()`` (the gates) in the optimizer, preferably without weight decay;
    add ``pruner.regularizer()`` to the loss; call ``pruner.step(loss=task_loss)`` after
    ``optimizer.step()`` (the task loss feeds the loss-aware λ). ``pruner.phase`` is
    ``"search"``, ``"finetune"`` or ``"done"``; ``advance()`` ends the current phase now.
    ``finalize()`` binarises whatever is still searching and returns the pruned GraphModule.
    The policy's ``ratio`` is not used: sparsity comes from λ and τ, or from its ``flops=`` /
    ``params=`` budget; ``min_channels``, ``round_to``, ``ignore`` and ``scope`` apply.

    Args:
        lam: λ₀. tau: binarisation threshold τ. cost: ``"loss"``, ``"compute"``, ``"both"``, ``"none"``.
        delta, kappa_down, kappa_up, adjust_every: the loss-aware schedule. ce0: the reference task
            loss (default: the mean of the first window).
        search_steps, finetune_steps: steps of each phase per stage.
        progressive: ``False`` (all groups in one stage), ``True`` (one group per stage) or the
            number of groups per stage.
        enforce_budget: with ``flops=``/``params=`` in the policy, prune to the budget at the end.

    Gates are averaged across ranks after every step under torch.distributed (DDP does not see
    them), and every binarisation is broadcast from rank 0.

    Example:
        >>> import fxprune, torch
        >>> from fxprune.training import C2S2Pruner
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...                             torch.nn.Conv2d(8, 4, 3))
        >>> x = torch.randn(4, 1, 8, 8)
        >>> pruner = C2S2Pruner(model, fxprune.Policy(), (x,), lam=1.0, search_steps=20, finetune_steps=2)
        >>> opt = torch.optim.SGD([*model.parameters(), *pruner.parameters()], lr=0.1)
        >>> while pruner.phase != "done":
        ...     task = model(x).square().mean()
        ...     opt.zero_grad(); (task + pruner.regularizer()).backward(); opt.step(); _ = pruner.step(loss=task)
        >>> pruned = pruner.finalize()
        >>> fxprune.verify(pruned).ok
        True
    """

    def __init__(self, model: nn.Module, policy: Policy, example_inputs: Any, *, lam: float = 1e-3,
                 tau: float = 1e-2, cost: str = "loss", delta: float = 0.01, kappa_down: float = 0.5,
                 kappa_up: float = 1.1, adjust_every: int = 50, ce0: float | None = None,
                 search_steps: int = 1000, finetune_steps: int = 0, progressive: bool | int = False,
                 enforce_budget: bool = True, leaf_modules: Iterable = (), concrete_args: dict | None = None):
        if cost not in _COSTS:
            raise ValueError(f"cost must be one of {', '.join(_COSTS)}; got {cost!r}")
        super().__init__(model, policy, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
        self.lam, self.tau, self.cost_mode = float(lam), float(tau), cost
        self.delta, self.kappa_down, self.kappa_up = float(delta), float(kappa_down), float(kappa_up)
        self.adjust_every, self.ce0 = max(int(adjust_every), 1), ce0
        self.search_steps, self.finetune_steps = int(search_steps), int(finetune_steps)
        self.enforce_budget = enforce_budget
        self.gate_sites = ChannelSites(self.plan, self.model, self.groups, "affine")
        self.gates = nn.ParameterDict({str(g.id): nn.Parameter(torch.ones(g.size)) for g in self.groups})
        self.binary: dict[int, torch.Tensor] = {}
        self.magnitude: dict[int, torch.Tensor] = {}
        per_stage = len(self.groups) if progressive is False else (1 if progressive is True else int(progressive))
        ids = [g.id for g in self.groups]
        self.stages = [ids[i:i + max(per_stage, 1)] for i in range(0, len(ids), max(per_stage, 1))] or [[]]
        self.weights = self._lambda_weights() if cost in ("compute", "both") else {gid: 1.0 for gid in ids}
        self.stage, self.phase, self.phase_steps = 0, "search", 0
        self.target_reached = False
        self.log: list[dict] = []
        self._window: list[float] = []
        self._set_trainable()
        self.attach()

    # ----- gates -----------------------------------------------------------------------------
    def parameters(self):
        """The gate parameters (give them to the optimizer)."""
        return self.gates.parameters()

    def _lambda_weights(self) -> dict[int, float]:
        """λ_l ∝ the MACs that vanish with group l, normalised to mean 1 over the groups."""
        share = {g.id: max(1.0 - self.cost.fractions({g.id: tuple(range(g.size))})["macs"], 0.0)
                 for g in self.groups}
        mean = sum(share.values()) / max(len(share), 1)
        return {gid: (s / mean if mean > 0 else 1.0) for gid, s in share.items()}

    def _set_trainable(self) -> None:
        searching = set(self.current_groups) if self.phase == "search" else set()
        for g in self.groups:
            self.gates[str(g.id)].requires_grad_(g.id in searching)

    @property
    def current_groups(self) -> list[int]:
        return self.stages[self.stage] if self.stage < len(self.stages) else []

    def _factor(self, gid: int):
        """Binary masks, where the channels are read (exact: the pruned model computes this)."""
        b = self.binary.get(gid)
        return None if b is None or bool(b.all()) else (b.to(torch.float32), False)

    def _gate_factor(self, gid: int):
        """Real-valued gates, after the producers' norm, while their group is searched."""
        if self.phase == "search" and gid in self.current_groups and gid not in self.binary:
            return self.gates[str(gid)], False
        return None

    def attach(self) -> None:
        super().attach()
        self.gate_sites.attach(self._gate_factor)

    def remove(self) -> None:
        super().remove()
        self.gate_sites.detach()

    def hooks_attached(self) -> bool:
        return super().hooks_attached() or self.gate_sites.attached

    def regularizer(self) -> torch.Tensor:
        """``Σ_l λ·w_l·||g_l||₁ / C_l`` over the groups being searched (0-tensor otherwise)."""
        if self.phase != "search":
            return torch.zeros(())
        terms = [self.weights[gid] * self.gates[str(gid)].abs().sum() / self.group(gid).size
                 for gid in self.current_groups]
        return self.lam * torch.stack(terms).sum() if terms else torch.zeros(())

    # ----- schedule ----------------------------------------------------------------------------
    def step(self, loss: Any = None) -> str:
        """Call after ``optimizer.step()`` with the task loss (a tensor or float); returns the phase."""
        self.steps += 1
        self.phase_steps += 1
        if self.phase == "search":
            self._sync_gates()
            if loss is not None:
                self._window.append(float(loss.detach() if isinstance(loss, torch.Tensor) else loss))
            if self.phase_steps % self.adjust_every == 0:
                self._adjust()
            if self.phase_steps >= self.search_steps or self.target_reached:
                self.advance()
        elif self.phase == "finetune" and self.phase_steps >= self.finetune_steps:
            self.advance()
        return self.phase

    def advance(self) -> str:
        """End the current phase now (search -> binarise -> finetune -> next stage or done)."""
        if self.phase == "search":
            self._binarize(self.current_groups)
            if self.stage == len(self.stages) - 1 or self._budget_met():
                self._enforce()  # before the last phase 2, so it fine-tunes what the budget removed
            self.phase = "finetune" if self.finetune_steps > 0 else self._next_stage()
        elif self.phase == "finetune":
            self.phase = self._next_stage()
        self.phase_steps, self.target_reached = 0, False
        self._set_trainable()
        return self.phase

    def _next_stage(self) -> str:
        self.stage += 1
        if self.stage < len(self.stages) and not self._budget_met():
            return "search"
        self.stage = len(self.stages)
        self._enforce()
        return "done"

    def _sync_gates(self) -> None:
        if distributed.is_distributed():
            with torch.no_grad():
                for gid in self.current_groups:
                    distributed.all_reduce_mean_(self.gates[str(gid)].data)

    def _adjust(self) -> None:
        window, self._window = self._window, []
        if self.cost_mode in ("loss", "both") and window:
            mean = distributed.mean_scalar(sum(window) / len(window))
            if self.ce0 is None:
                self.ce0 = mean
            else:
                self.lam *= self.kappa_down if mean > (1.0 + self.delta) * self.ce0 else self.kappa_up
        if self.cost_mode in ("compute", "both") and self.policy.budget is not None:
            trial = {**self.keep, **{gid: self._threshold(gid) for gid in self.current_groups}}
            self.target_reached = self._kept(trial) <= self.policy.budget[1] + 1e-12
        self.log.append({"step": self.steps, "lambda": self.lam,
                         "loss": sum(window) / len(window) if window else None})

    # ----- binarisation and fold ---------------------------------------------------------------
    def _threshold(self, gid: int) -> torch.Tensor:
        """``|g| > τ``, widened to ``min_channels`` / pinned channels / ``round_to`` by largest ``|g|``."""
        g = self.group(gid)
        mag = self.gates[str(gid)].detach().abs().cpu().to(torch.float64)
        keep = mag > self.tau
        keep[list(g.pinned)] = True
        want = max(int(keep.sum()), self.policy.min_channels, len(g.pinned))
        if self.policy.round_to and self.policy.round_to > 1:
            want = int(math.ceil(want / self.policy.round_to) * self.policy.round_to)
        want = min(want, g.size)
        if int(keep.sum()) < want:
            order = sorted(range(g.size), key=lambda c: (c not in g.pinned, -float(mag[c]), c))
            keep[order[:want]] = True
        return keep

    def _binarize(self, gids: list[int]) -> None:
        """Binarise the gates of ``gids``, fold their real values into the weights, freeze them."""
        keep = {gid: self._threshold(gid) for gid in gids}
        distributed.broadcast_([keep[gid] for gid in sorted(keep)])
        with torch.no_grad():
            for gid in gids:
                gate = self.gates[str(gid)]
                self.magnitude[gid] = gate.detach().abs().cpu().to(torch.float64)
                self._fold(gid, gate.detach())
                gate.fill_(1.0)
                self.binary[gid] = keep[gid]
                self.keep[gid] = keep[gid].clone()

    def _fold(self, gid: int, gate: torch.Tensor) -> None:
        """Scale the rows of the parameters after which the gate acts (norm γ, β; or the producer's
        weight rows and bias) by the gate, so the model computes the same without it."""
        for target, dim, site in self.gate_sites.fold_targets(gid):
            tensor = dense_tensor(self.model, target)
            factor = gate.to(tensor.device, tensor.dtype)[site.channels.to(tensor.device)]
            shape = [1] * tensor.dim()
            shape[dim] = -1
            rows = tensor.index_select(dim, site.positions.to(tensor.device)) * factor.view(shape)
            tensor.index_copy_(dim, site.positions.to(tensor.device), rows)

    def _kept(self, keep: dict[int, torch.Tensor]) -> float:
        metric = self.policy.budget[0] if self.policy.budget else "macs"
        return float(self.cost.fractions({gid: ~k for gid, k in keep.items()})[metric])

    def _budget_met(self) -> bool:
        budget = self.policy.budget
        return budget is not None and self.cost_mode in ("compute", "both") and \
            self._kept(self.keep) <= budget[1] + 1e-12

    def _enforce(self) -> None:
        """With a budget not yet met: remove more channels, lowest recorded ``|g|`` first, ranked as
        the policy says (scope, normalize); channels already removed score 0, so they stay removed."""
        budget = self.policy.budget
        if not self.enforce_budget or budget is None or self._kept(self.keep) <= budget[1] + 1e-12:
            return
        scores = {}
        for g in self.groups:
            mag = self.magnitude.get(g.id, torch.ones(g.size, dtype=torch.float64)).clone()
            mag[~self.keep[g.id]] = 0.0
            scores[g.id] = mag
        for gid, k in self.choose(scores).items():
            both = k & self.keep[gid]
            if gid in self.binary or not bool(both.all()):
                self.binary[gid] = both
            self.keep[gid] = both.clone()

    def _before_finalize(self) -> None:
        while self.phase != "done":
            self.advance()
