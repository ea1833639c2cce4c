"""Calibration data for the criteria that need it: batch parsing, observed forward passes on a
private copy of the traced module (no hooks on anything), and gradients of a loss.

Calibration is an iterable given to ``fxprune.plan(..., calibration=...)`` (or ``transform``):

* unlabelled criteria take batches of model inputs: a tensor, or a tuple/list with one entry
  per model input; a pair ``(inputs, targets)`` is also accepted for a one-input model (the
  targets are ignored), so a labelled ``DataLoader`` can be passed as it is;
* criteria that need a loss take ``(inputs, targets)`` pairs and ``loss_fn=`` (called as
  ``loss_fn(outputs, targets)``).

Every criterion reads the iterable once per plan (its statistics are cached), at most
``max_batches`` batches (option, default ``None``: all).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx

from .base import DataRequiredError, cached


def _inputs(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _split(batch: Any, n_inputs: int, labelled: bool, who: str) -> tuple[tuple, Any]:
    if labelled:
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return _inputs(batch[0]), batch[1]
        raise DataRequiredError(
            f"importance {who!r} needs labelled batches (inputs, targets); got a {type(batch).__name__}")
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, (tuple, list)):
        if len(batch) == n_inputs:
            return tuple(batch), None
        if len(batch) == 2:
            return _inputs(batch[0]), batch[1]
    raise DataRequiredError(
        f"importance {who!r}: a calibration batch must be a tensor, a tuple of {n_inputs} input(s), "
        f"or (inputs, targets); got {type(batch).__name__}")


def batches(ctx, who: str, labelled: bool = False, max_batches: int | None = None) -> Iterator[tuple[tuple, Any]]:
    """``(inputs, targets)`` for each calibration batch (targets None when unlabelled).

    Raises ``DataRequiredError`` (a ``fxprune.FxPruneError``) saying what to pass when the plan
    has no calibration data, or no ``loss_fn`` when ``labelled``.

    Example:
        >>> import fxprune
        >>> ctx = fxprune.ImportanceContext(None, [], (torch.zeros(1, 3),), calibration=[torch.ones(2, 3)])
        >>> [tuple(x[0].shape) for x, _ in batches(ctx, "example")]
        [(2, 3)]
    """
    if ctx.calibration is None:
        what = ("calibration=[(inputs, targets), ...] and loss_fn=... (e.g. torch.nn.functional.cross_entropy)"
                if labelled else "calibration=[inputs, ...] (a few batches of model inputs)")
        raise DataRequiredError(f"importance {who!r} needs data: pass {what} to fxprune.plan / fxprune.transform")
    if labelled and ctx.loss_fn is None:
        raise DataRequiredError(
            f"importance {who!r} needs a loss: pass loss_fn=... (called as loss_fn(outputs, targets)) "
            "with calibration=[(inputs, targets), ...] to fxprune.plan / fxprune.transform")
    n = len(ctx.example_inputs)
    seen = 0
    for batch in ctx.calibration:
        if max_batches is not None and seen >= max_batches:
            break
        seen += 1
        yield _split(batch, n, labelled, who)
    if seen == 0:
        raise DataRequiredError(f"importance {who!r}: the calibration iterable is empty")


def private_copy(ctx) -> fx.GraphModule:
    """A deep copy of the traced module in eval mode, once per plan; the original is never run.

    Example:
        >>> import fxprune
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Dropout()).train())
        >>> ctx = fxprune.ImportanceContext(gm, [], ())
        >>> private_copy(ctx) is private_copy(ctx), private_copy(ctx).training, gm.training
        (True, False, True)
    """
    return cached(ctx, "eval copy", lambda: copy.deepcopy(ctx.module).eval())


class Observer(fx.Interpreter):
    """Runs a GraphModule node by node and calls ``watch[node.name](node, args, result)``.

    Example:
        >>> gm = torch.fx.symbolic_trace(torch.nn.ReLU())
        >>> seen = []
        >>> _ = Observer(gm, {"relu": lambda n, a, r: seen.append(r.sum().item())}).run(-torch.ones(2))
        >>> seen
        [0.0]
    """

    def __init__(self, gm: fx.GraphModule, watch: dict[str, Callable]):
        super().__init__(gm)
        self.watch = watch

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.name in self.watch:
            args, _ = self.fetch_args_kwargs_from_env(n)
            self.watch[n.name](n, args, result)
        return result


def observe(ctx, who: str, watch: dict[str, Callable], max_batches: int | None = None) -> int:
    """Run every calibration batch through a private copy with ``watch`` callbacks (no grad);
    returns the number of samples seen (the first input's leading dim, summed).

    Example:
        >>> import fxprune
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU()))
        >>> ctx = fxprune.ImportanceContext(gm, [], (torch.zeros(1, 2),), calibration=[torch.ones(3, 2)])
        >>> sums = []
        >>> observe(ctx, "example", {"_0": lambda node, args, out: sums.append(out.sum().item())})
        3
        >>> sums
        [6.0]
    """
    gm = private_copy(ctx)
    samples = 0
    with torch.no_grad():
        for inputs, _ in batches(ctx, who, False, max_batches):
            Observer(gm, watch).run(*inputs)
            samples += int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 1
    return samples


def loss_batches(ctx, who: str, max_batches: int | None = None) -> Iterator[tuple[fx.GraphModule, torch.Tensor]]:
    """For each labelled batch: the private copy (eval mode, gradients zeroed, every parameter
    requiring grad) and the loss ``ctx.loss_fn(copy(*inputs), targets)``, ready for autograd.

    Example:
        >>> import fxprune
        >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 1))
        >>> ctx = fxprune.ImportanceContext(gm, [], (torch.zeros(1, 2),), loss_fn=torch.nn.functional.mse_loss,
        ...                                 calibration=[(torch.ones(4, 2), torch.zeros(4, 1))])
        >>> [loss.requires_grad for _, loss in loss_batches(ctx, "example")]
        [True]
    """
    gm = private_copy(ctx)
    for p in gm.parameters():
        p.requires_grad_(True)
    for inputs, targets in batches(ctx, who, True, max_batches):
        gm.zero_grad(set_to_none=True)
        yield gm, ctx.loss_fn(gm(*inputs), targets)
