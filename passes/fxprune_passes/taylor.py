"""First-order Taylor importance (Molchanov et al. 2019): ``(Σ_s g_s · w_s)²`` over the
parameters s of a channel, per calibration batch, averaged over batches. Needs ``(inputs,
targets)`` calibration batches and ``loss_fn``.

Option ``taylor_params`` chooses the parameters s of channel c:

* ``"auto"`` (default): the affine γ, β of the group's BatchNorms when it has any (the
  "gate after BN" of the paper: zeroing them zeroes the channel), else the producer weights and
  biases;
* ``"producer"``: producer weights and every per-channel parameter (biases, norm affine);
* ``"consumer"``: the consumer columns (the first-order change seen by the next layers).

``max_batches`` (default ``None``) limits the batches read.
"""
from __future__ import annotations

import torch

from .base import Criterion, cached
from .data import loss_batches
from .weights import batch_norm_modules, channel_sum, is_parameter


def _members(group, ctx, mode: str) -> list:
    params = [pm for pm in group.params if is_parameter(ctx, pm.target)]
    if mode == "consumer":
        return [pm for pm in params if pm.role == "consumer"]
    if mode == "producer":
        return [pm for pm in params if pm.role != "consumer"]
    bns = batch_norm_modules(ctx, group)
    affine = [pm for pm in params if pm.role == "passenger" and pm.owner in bns]
    if affine:
        return affine
    owners = {pm.owner for pm in group.producers}
    return [pm for pm in params if pm.role == "producer" or (pm.role == "passenger" and pm.owner in owners)]


class Taylor(Criterion):
    """First-order Taylor expansion of the loss when a channel is removed (needs a loss).

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                         torch.nn.Linear(8 * 36, 4))
        >>> x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> p = fxprune.plan(m, fxprune.Policy("taylor", 0.5), (x,), calibration=[(x, y)],
        ...                  loss_fn=torch.nn.functional.cross_entropy)
        >>> p.groups[0].kept
        4
    """

    name = "taylor"
    defaults = {"taylor_params": "auto", "max_batches": None}
    choices = {"taylor_params": ("auto", "producer", "consumer")}

    def all_scores(self, ctx) -> dict[int, torch.Tensor]:
        """``{group id: scores}`` for every removable group, from one pass over the data."""
        mode = self.option(ctx, "taylor_params")

        def compute():
            groups = [g for g in ctx.groups if not g.blocked]
            members = {g.id: _members(g, ctx, mode) for g in groups}
            targets = sorted({pm.target for ms in members.values() for pm in ms})
            total = {g.id: torch.zeros(g.size, dtype=torch.float64) for g in groups}
            count = 0
            for gm, loss in loss_batches(ctx, self.name, self.option(ctx, "max_batches")):
                params = [gm.get_parameter(t) for t in targets]
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                gw = {t: (g * p).detach() if g is not None else torch.zeros_like(p.detach())
                      for t, p, g in zip(targets, params, grads)}
                for g in groups:
                    first = torch.zeros(g.size, dtype=torch.float64)
                    for pm in members[g.id]:
                        first += channel_sum(g, pm, gw[pm.target])
                    total[g.id] += first ** 2
                count += 1
            return {k: v / max(count, 1) for k, v in total.items()}
        return cached(ctx, ("taylor", mode), compute)

    def score(self, group, ctx) -> torch.Tensor:
        return self.all_scores(ctx)[group.id]


taylor = Taylor()
