"""Filter decorrelation regulariser (Zhu, Zhou & Li, IJCAI 2018), as dynamic filter pruning with
decorrelation intends it: per conv layer, the Frobenius norm of the off-diagonal correlation of
its active filters.

For a layer with weight ``W`` (``O x ...``) and active filters ``A`` (all of them, or those a
pruning mask keeps): ``F = W[A].reshape(|A|, -1)``; each row is centred and L2-normalised
(``F̂``); ``C = F̂ F̂ᵀ`` (the filters' correlation matrix); ``R = ||C - diag(C)||_F / |A|``.
Layers with fewer than two active filters contribute 0. The layer terms are summed (default)
or averaged, and the result is differentiable: add ``alpha * R`` to the loss.

Example:
    >>> import torch
    >>> w = torch.randn(1, 8).repeat(4, 1).view(4, 2, 2, 2)    # four identical filters
    >>> round(float(filter_correlation(w)), 3)                # off-diagonal all 1: sqrt(12) / 4
    0.866
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from .sites import dense_tensor, unwrap

ActiveRows = Callable[[str], "torch.Tensor | None"]


def filter_correlation(weight: torch.Tensor, active: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """``||C - diag(C)||_F / |A|`` for the rows of ``weight`` selected by the bool ``active``.

    Example:
        >>> w = torch.eye(3)                       # orthogonal rows (after centring: -1/2 correlated)
        >>> float(filter_correlation(w)) > 0
        True
        >>> float(filter_correlation(w, torch.tensor([True, False, False])))
        0.0
    """
    rows = weight.reshape(weight.shape[0], -1)
    if active is not None:
        rows = rows[active.to(rows.device)]
    n = rows.shape[0]
    if n < 2:
        return weight.new_zeros(())
    centred = rows - rows.mean(dim=1, keepdim=True)
    unit = centred / centred.norm(dim=1, keepdim=True).clamp_min(eps)
    corr = unit @ unit.t()
    off = corr - torch.diag_embed(torch.diagonal(corr))
    return off.norm(p="fro") / n


def conv_layers(model: nn.Module) -> list[str]:
    """Names of the conv layers (``nn.Conv1d/2d/3d``) of a model."""
    return [n for n, m in unwrap(model).named_modules() if isinstance(m, nn.modules.conv._ConvNd)
            and not isinstance(m, nn.modules.conv._ConvTransposeNd)]


class DecorrelationRegularizer:
    """``alpha`` times the decorrelation penalty summed (or averaged) over conv layers.

    Args:
        model: the model being trained (a DDP wrapper is looked through).
        alpha: the penalty's weight.
        layers: module names to regularise (default: every ``nn.Conv1d/2d/3d``).
        reduce: ``"sum"`` (default) or ``"mean"`` over layers.
        active: ``active(weight_name) -> bool rows or None``: which filters are active (a pruner
            passes its masks; ``None``: all rows).

    Call it (``reg()`` or ``reg(model)``) to get the scalar; it plugs into
    ``fxprune.training.finetune(..., regularizer=reg)``.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
        >>> reg = DecorrelationRegularizer(m, alpha=0.1)
        >>> loss = reg()
        >>> loss.backward(); m[0].weight.grad is not None
        True
    """

    def __init__(self, model: nn.Module, alpha: float = 0.1, layers: Iterable[str] | None = None,
                 reduce: str = "sum", active: ActiveRows | None = None):
        if reduce not in ("sum", "mean"):
            raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
        self.model = unwrap(model)
        self.alpha = float(alpha)
        self.layers = list(layers) if layers is not None else conv_layers(self.model)
        self.reduce = reduce
        self.active = active

    def penalty(self) -> torch.Tensor:
        """The unweighted penalty ``R`` (summed or averaged over layers)."""
        terms = []
        for name in self.layers:
            target = f"{name}.weight" if name else "weight"
            weight = dense_tensor(self.model, target)
            terms.append(filter_correlation(weight, self.active(target) if self.active else None))
        if not terms:
            return torch.zeros(())
        total = torch.stack(terms).sum()
        return total / len(terms) if self.reduce == "mean" else total

    def __call__(self, model: nn.Module | None = None) -> torch.Tensor:
        if self.alpha == 0.0:
            return torch.zeros(())
        return self.alpha * self.penalty()
