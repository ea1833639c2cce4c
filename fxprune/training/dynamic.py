"""Dynamic filter pruning (seed 3; DPF, Lin et al. ICLR 2020): masks recomputed during training,
a straight-through forward, optional filter decorrelation, then a physical prune."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch
from torch import nn

from ..policy import Policy
from .base import TrainingPruner
from .decorrelation import DecorrelationRegularizer
from .sites import dense_tensor


class DynamicPruner(TrainingPruner):
    """Dynamic filter pruning inside a plain PyTorch training loop.

    Every ``every`` steps the channels of each coupling group are scored on the current dense
    weights (``importance``: filter L1 by default, or any registered criterion name or callable)
    and the lowest are masked, at the policy's ``ratio`` or ``flops=``/``params=`` budget, ranked
    per group (``scope="local"``) or across groups (``"global"``, as in the paper), with the
    policy's ``min_channels``/``round_to``/``ignore``. Residual-coupled channels are masked
    together. After step ``freeze_at`` the masks no longer change.

    The forward pass computes the masked model; the backward pass reaches every weight
    (straight-through estimator), so masked filters keep learning and can come back. The mask
    is applied where a group's channels are read (forward pre-hooks on the consumers, see
    ``fxprune.training.sites``), so every layer that reads a masked channel sees exactly zero, in
    training and in eval mode, whatever its norm's bias or running statistics; norms inside the
    group see the dense values. Groups that cannot be reached that way are masked at the output
    of their last norm/conv, or through parametrizations for parameters used functionally.
    ``finalize()`` and ``remove()`` take every hook and parametrization off again.

    Args:
        model, policy, example_inputs: as for ``fxprune.plan``.
        every: recompute the masks every this many ``step()`` calls (masks are also computed once
            at construction).
        freeze_at: step after which the masks stay fixed (``None``: never frozen).
        scope: ``"local"`` / ``"global"`` to override ``policy.scope``.
        importance: criterion for the masks (default ``policy.importance``).
        decorrelation: weight α of the decorrelation regulariser on the active filters of every
            conv (0: off); ``decorrelation_reduce``: ``"sum"`` or ``"mean"`` over layers.
        ramp_steps: the pruned fraction grows from 0 to the target over this many steps
            (cubic schedule of Zhu & Gupta 2017; 0: the target from the start).
        calibration, loss_fn, importance_options: passed to data-dependent criteria.

    Example:
        >>> import fxprune, torch
        >>> from fxprune.training import DynamicPruner
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...                             torch.nn.Conv2d(8, 4, 3))
        >>> x = torch.randn(4, 1, 8, 8)
        >>> pruner = DynamicPruner(model, fxprune.Policy(ratio=0.5), (x,), every=2, freeze_at=4)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> for _ in range(6):
        ...     loss = model(x).square().mean() + pruner.regularizer()
        ...     opt.zero_grad(); loss.backward(); opt.step(); _ = pruner.step()
        >>> pruned = pruner.finalize()
        >>> pruned.get_submodule("0").out_channels, fxprune.verify(pruned).ok
        (4, True)
    """

    def __init__(self, model: nn.Module, policy: Policy, example_inputs: Any, *, every: int = 16,
                 freeze_at: int | None = None, scope: str | None = None, importance: Any = None,
                 decorrelation: float = 0.0, decorrelation_reduce: str = "sum", ramp_steps: int = 0,
                 calibration: Iterable | None = None, loss_fn: Any = None,
                 importance_options: dict | None = None, leaf_modules: Iterable = (),
                 concrete_args: dict | None = None):
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        if scope is not None:
            policy = dataclasses.replace(policy, scope=scope)
        super().__init__(model, policy, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
        self.every, self.freeze_at, self.ramp_steps = int(every), freeze_at, int(ramp_steps)
        self.importance = policy.importance if importance is None else importance
        self.calibration, self.loss_fn = calibration, loss_fn
        self.importance_options = dict(importance_options or {})
        self.frozen = False
        self.history: list[dict] = []
        self._rows = self._producer_rows()
        self.decorrelation = DecorrelationRegularizer(self.model, decorrelation, reduce=decorrelation_reduce,
                                                      active=self.active_rows)
        self._values: dict[int, torch.Tensor] = {}
        self.update_masks()
        self.attach()

    def _producer_rows(self) -> dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]]:
        rows: dict[str, list] = {}
        for g in self.groups:
            for pm in g.producers:
                if pm.dim == 0:
                    rows.setdefault(pm.target, []).append(
                        (g.id, torch.tensor(pm.positions, dtype=torch.long), torch.tensor(pm.channels, dtype=torch.long)))
        return rows

    def active_rows(self, weight_name: str) -> torch.Tensor | None:
        """Bool mask of the filters (rows along dim 0) of ``weight_name`` that are not masked."""
        entries = self._rows.get(weight_name)
        if not entries:
            return None
        n = int(dense_tensor(self.model, weight_name).shape[0])
        active = torch.ones(n, dtype=torch.bool)
        for gid, positions, channels in entries:
            active[positions] = self.keep[gid][channels]
        return active

    def progress(self) -> float:
        """Fraction of the ramp done (1 without a ramp), cubic: ``1 - (1 - t/T)^3``."""
        if self.ramp_steps <= 0:
            return 1.0
        t = min(self.steps / self.ramp_steps, 1.0)
        return 1.0 - (1.0 - t) ** 3

    def target_policy(self) -> Policy:
        """The policy of the current step (the ramp scales the removed fraction)."""
        s = self.progress()
        if s >= 1.0:
            return self.policy
        budget = self.policy.budget
        if budget is None:
            return dataclasses.replace(self.policy, ratio=float(self.policy.ratio) * s)
        metric, keep = budget
        field = "flops" if metric == "macs" else metric
        return dataclasses.replace(self.policy, **{field: 1.0 - (1.0 - keep) * s})

    def update_masks(self) -> int:
        """Recompute the masks now; returns how many channels changed state."""
        scores = self.score(self.importance, self.calibration, self.loss_fn, self.importance_options)
        keep = self.choose(scores, self.target_policy())
        changed = sum(int((keep[gid] != self.keep[gid]).sum()) for gid in keep) if self.history else 0
        self.keep = keep
        self._values = {gid: k.to(torch.float32) for gid, k in keep.items() if not bool(k.all())}
        self.history.append({"step": self.steps, "changed": changed, "macs_kept": self.macs_kept()})
        return changed

    def _factor(self, gid: int):
        values = self._values.get(gid)
        return None if values is None else (values, True)

    def regularizer(self) -> torch.Tensor:
        """``α · R`` (the decorrelation of active filters), or a 0-tensor when α is 0."""
        return self.decorrelation()

    def step(self) -> bool:
        """Call after ``optimizer.step()``. Recomputes the masks every ``every`` steps until
        ``freeze_at``; returns True when the masks were recomputed."""
        self.steps += 1
        if self.frozen:
            return False
        updated = self.steps % self.every == 0
        if updated:
            self.update_masks()
        if self.freeze_at is not None and self.steps >= self.freeze_at:
            self.frozen = True
        return updated

    def state_dict(self) -> dict:
        """Masks and counters, to resume training (``load_state_dict``)."""
        return {"steps": self.steps, "frozen": self.frozen, "keep": {k: v.clone() for k, v in self.keep.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.frozen = int(state["steps"]), bool(state["frozen"])
        self.keep = {int(k): v.clone().bool() for k, v in state["keep"].items()}
        self._values = {gid: k.to(torch.float32) for gid, k in self.keep.items() if not bool(k.all())}
