"""Network slimming (Liu et al. 2017): L1 sparsity on the norm scales during training, then
channels pruned by ``|γ|`` (the ``bn_scale`` criterion) through ``fxprune.plan``/``apply``."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn

from .. import importance as importance_
from ..api import transform
from ..errors import PolicyError
from ..importance.magnitude import reduce_rows
from ..policy import Policy
from ..trace import check_inputs
from .sites import dense_tensor, unwrap

_SCALED_NORMS = (nn.modules.batchnorm._BatchNorm,)


def norm_layers(model: nn.Module) -> list[str]:
    """Names of the BatchNorm layers with an affine scale."""
    return [n for n, m in unwrap(model).named_modules()
            if isinstance(m, _SCALED_NORMS) and getattr(m, "weight", None) is not None]


class SlimmingRegularizer:
    """``weight · Σ |γ|`` over the BatchNorm scales of a model (the sparsity term of network slimming).

    Callable with or without the model (``reg()`` / ``reg(model)``), so it plugs into
    ``fxprune.training.finetune(..., regularizer=reg)``.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
        >>> SlimmingRegularizer(m, weight=0.5)().item()   # 0.5 * (4 scales of 1)
        2.0
    """

    def __init__(self, model: nn.Module, weight: float = 1e-4, layers: Iterable[str] | None = None):
        self.model = unwrap(model)
        self.weight = float(weight)
        self.layers = list(layers) if layers is not None else norm_layers(self.model)

    def __call__(self, model: nn.Module | None = None) -> torch.Tensor:
        if self.weight == 0.0 or not self.layers:
            return torch.zeros(())
        total = sum(dense_tensor(self.model, f"{n}.weight").abs().sum() for n in self.layers)
        return self.weight * total


def bn_scale_importance(group, ctx) -> torch.Tensor:
    """``|γ|`` of the group's BatchNorm passengers, mean over them; groups without one fall back
    to filter L1 (the same scores as the registered ``bn_scale`` criterion, usable without it).

    Example:
        >>> import fxprune
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
        >>> m[1].weight.data = torch.tensor([0.1, 2.0, 0.3, 1.0])
        >>> fxprune.plan(m, fxprune.Policy(bn_scale_importance, 0.5), (torch.randn(1, 3, 8, 8),)).groups[0].removed
        (0, 2)
    """
    per_row = []
    for pm in group.passengers:
        module = ctx.module.get_submodule(pm.owner) if pm.owner else ctx.module
        if isinstance(module, _SCALED_NORMS) and pm.target == (f"{pm.owner}.weight" if pm.owner else "weight"):
            values = ctx.param(pm.target).detach().abs().to(torch.float64)[list(pm.positions)]
            per_row.append((values, torch.tensor(pm.channels, dtype=torch.long)))
    if not per_row:
        return importance_.get("l1")(group, ctx)
    return reduce_rows(group, per_row, "mean")


def _bn_scale() -> Any:
    return "bn_scale" if "bn_scale" in importance_.available() else bn_scale_importance


class NetworkSlimming:
    """Network slimming with the pruner interface: ``regularizer()`` during training (L1 on the
    BatchNorm scales), ``step()`` (nothing to do; present for a uniform loop), ``finalize()``
    prunes by ``|γ|`` with the policy's ratio or budget (``bn_scale`` criterion when registered,
    else ``bn_scale_importance``). Nothing is attached to the model. Fine-tune the result.

    Example:
        >>> import fxprune
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...                         torch.nn.Conv2d(8, 2, 3))
        >>> x = torch.randn(2, 1, 8, 8)
        >>> slim = NetworkSlimming(m, fxprune.Policy(ratio=0.5), (x,), weight=1e-4)
        >>> loss = m(x).mean() + slim.regularizer(); loss.backward(); _ = slim.step()
        >>> pruned = slim.finalize()
        >>> pruned.get_submodule("0").out_channels, fxprune.verify(pruned).ok
        (4, True)
    """

    def __init__(self, model: nn.Module, policy: Policy, example_inputs: Any, weight: float = 1e-4,
                 **plan_kwargs):
        if not isinstance(policy, Policy):
            raise PolicyError(f"policy must be a fxprune.Policy, got {type(policy).__name__}")
        self.model = unwrap(model)
        self.policy = dataclasses.replace(policy, importance=_bn_scale())
        self.example_inputs = check_inputs(example_inputs)
        self.sparsity = SlimmingRegularizer(self.model, weight)
        self.plan_kwargs = plan_kwargs
        self.steps = 0

    def regularizer(self) -> torch.Tensor:
        """``weight · Σ|γ|`` (differentiable)."""
        return self.sparsity()

    def step(self) -> bool:
        self.steps += 1
        return False

    def remove(self) -> None:
        """Nothing to remove (no hooks are used); present for a uniform interface."""

    def finalize(self) -> fx.GraphModule:
        """The pruned ``torch.fx.GraphModule`` (``fxprune.transform`` by ``|γ|``)."""
        return transform(self.model, self.policy, self.example_inputs, **self.plan_kwargs)
