"""Standard data-free criteria: BN scale (network slimming), FPGM, random, and LAMP over a base
criterion. (L1/L2 filter norms are fxprune's own ``l1`` / ``l2``.)"""
from __future__ import annotations

import torch

import fxprune
from fxprune.importance import get as get_importance
from fxprune.importance.magnitude import producer_rows, reduce_rows

from .base import Criterion, lamp
from .weights import batch_norm_modules, channel_sum


class BatchNormScale(Criterion):
    """``|γ|`` of the group's BatchNorm passengers, mean over them (Liu et al. 2017, network slimming;
    pair it with L1 sparsity on γ during training).

    Options: ``bn_fallback`` — criterion used for groups without BatchNorm (default ``"l1"``;
    ``"error"`` raises instead).

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
        >>> m[1].weight.data = torch.tensor([0.1, 2.0, 0.3, 1.0])
        >>> fxprune.plan(m, fxprune.Policy("bn_scale", 0.5), (torch.randn(1, 3, 8, 8),)).groups[0].removed
        (0, 2)
    """

    name = "bn_scale"
    defaults = {"bn_fallback": "l1"}

    def score(self, group, ctx) -> torch.Tensor:
        bns = batch_norm_modules(ctx, group)
        members = [pm for pm in group.passengers if pm.owner in bns and pm.target == f"{pm.owner}.weight"]
        if not members:
            fallback = self.option(ctx, "bn_fallback")
            if fallback == "error":
                raise fxprune.PolicyError(
                    f"importance 'bn_scale': group {group.name!r} has no BatchNorm with an affine weight; "
                    "set importance_options={'bn_fallback': 'l1'} to score such groups by another criterion")
            return get_importance(fallback)(group, ctx)
        total = torch.zeros(group.size, dtype=torch.float64)
        count = torch.zeros(group.size, dtype=torch.float64)
        for pm in members:
            total += channel_sum(group, pm, ctx.param(pm.target).detach().abs())
            count += channel_sum(group, pm, torch.ones(ctx.param(pm.target).shape, dtype=torch.float64))
        return total / count.clamp(min=1)


class GeometricMedian(Criterion):
    """FPGM (He et al. 2019): a filter close to the geometric median of its layer is redundant.

    Score of a producer row = Σ over the producer's other rows of the distance to it (the
    usual approximation of the distance to the geometric median), on raw weights; channels
    reduce over producers with ``reduce`` (default ``"mean"``). Option ``fpgm_norm``: 2 (default) or 1.

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1, bias=False), torch.nn.Conv2d(3, 1, 1))
        >>> m[0].weight.data = torch.tensor([0., 1., 10.]).view(3, 1, 1, 1)
        >>> fxprune.plan(m, fxprune.Policy("fpgm", 0.34), (torch.randn(1, 1, 4, 4),)).groups[0].removed
        (1,)
    """

    name = "fpgm"
    defaults = {"fpgm_norm": 2, "reduce": "mean"}
    choices = {"fpgm_norm": (1, 2), "reduce": ("mean", "sum")}

    def score(self, group, ctx) -> torch.Tensor:
        p = float(self.option(ctx, "fpgm_norm"))
        per_row = []
        for rows, channels in producer_rows(group, ctx):
            rows = rows.to(torch.float64)
            per_row.append((torch.cdist(rows, rows, p=p).sum(1), channels))
        return reduce_rows(group, per_row, self.option(ctx, "reduce"))


class Random(Criterion):
    """Uniform random scores, the baseline every criterion must beat.

    Option ``seed`` (default 0): the same seed gives the same scores for the same group.

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 2, 1))
        >>> plan = lambda s: fxprune.plan(m, fxprune.Policy("random", 0.5), (torch.randn(1, 3, 8, 8),),
        ...                               importance_options={"seed": s}).groups[0].removed
        >>> plan(1) == plan(1)
        True
    """

    name = "random"
    defaults = {"seed": 0}

    def score(self, group, ctx) -> torch.Tensor:
        gen = torch.Generator().manual_seed(int(self.option(ctx, "seed")) * 1_000_003 + group.id)
        return torch.rand(group.size, generator=gen, dtype=torch.float64)


class Lamp(Criterion):
    """LAMP-normalised scores of a base criterion, for ranking channels across groups.

    ``lamp_base`` (default ``"l1"``) names any registered criterion (its options apply too);
    the base's weight edits, if any, are kept. The order within a group is the base's, so the
    name matters only for ``Policy(scope="global", normalize="none")``; this is the same as
    ``Policy(importance=base, scope="global", normalize="lamp")``, which is the usual spelling.

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 2, 1))
        >>> x = (torch.randn(1, 3, 8, 8),)
        >>> a = fxprune.plan(m, fxprune.Policy("lamp", 0.5), x).groups[0].removed
        >>> a == fxprune.plan(m, fxprune.Policy("l1", 0.5), x).groups[0].removed
        True
    """

    name = "lamp"
    defaults = {"lamp_base": "l1"}

    def _base(self, ctx):
        base = self.option(ctx, "lamp_base")
        if base == self.name:
            raise fxprune.PolicyError("importance 'lamp': lamp_base cannot be 'lamp'")
        return get_importance(base)

    def score(self, group, ctx) -> torch.Tensor:
        return lamp(torch.as_tensor(self._base(ctx)(group, ctx), dtype=torch.float64))

    def edits(self, group, ctx) -> dict:
        """The base criterion's weight edits (e.g. SCP compensation), if it has any."""
        make = getattr(self._base(ctx), "edits", None)
        return make(group, ctx) if make is not None else {}


bn_scale = BatchNormScale()
fpgm = GeometricMedian()
random = Random()
lamp_criterion = Lamp()
