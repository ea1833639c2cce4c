"""BatchNorm recalibration: re-estimate running statistics of a (pruned) model from unlabelled data.

Pruning removes channels that fed the next layers, so the statistics each BatchNorm recorded
during training no longer describe its input. Re-estimating them from a few batches (no labels,
no weight update) recovers much of the accuracy before any fine-tuning.
"""
from __future__ import annotations

import inspect
from typing import Any, Iterable

import torch
import torch.fx as fx

from .errors import InputError

_BN = torch.nn.modules.batchnorm._BatchNorm


def _n_inputs(model: torch.nn.Module) -> int | None:
    if isinstance(model, fx.GraphModule):
        return sum(1 for n in model.graph.nodes if n.op == "placeholder")
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    return sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _as_inputs(batch: Any, n_inputs: int | None) -> tuple[tuple, dict]:
    if isinstance(batch, dict):
        return (), batch
    if isinstance(batch, (tuple, list)):
        if n_inputs is not None and len(batch) != n_inputs and len(batch) == 2:
            first = batch[0]
            return (tuple(first) if isinstance(first, (tuple, list)) else (first,)), {}
        return tuple(batch), {}
    return (batch,), {}


def recalibrate(model: torch.nn.Module, batches: Iterable, momentum: float | None = None) -> torch.nn.Module:
    """Re-estimate every BatchNorm's ``running_mean`` / ``running_var`` from ``batches``; in place.

    Statistics are reset, then each BatchNorm (and only BatchNorm: dropout stays off) runs in
    training mode over the batches under ``torch.no_grad()``. With ``momentum=None`` (default)
    the result is the cumulative average over all batches; a number uses that exponential
    momentum instead. No parameter changes; every module's training flag and every BatchNorm's
    momentum are restored afterwards; if a batch fails (or there is none) the old statistics are
    put back before the error propagates. Returns ``model``.

    ``batches``: an iterable of model inputs — a tensor, a tuple with one entry per input, a
    dict of keyword inputs, or an ``(inputs, targets)`` pair (targets ignored), so a labelled
    ``DataLoader`` can be passed as it is.

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...                         torch.nn.Conv2d(8, 2, 1)).eval()
        >>> x = torch.randn(16, 3, 8, 8)
        >>> pruned = fxprune.transform(m, fxprune.Policy("l1", 0.5), (x,))
        >>> pruned = recalibrate(pruned, [x[:8], x[8:]])
        >>> bn = pruned.get_submodule("1")
        >>> torch.allclose(bn.running_mean, pruned.get_submodule("0")(x).mean((0, 2, 3)), atol=1e-5)
        True
    """
    norms = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not norms:
        return model
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    saved = {m: {k: v.clone() for k, v in m.state_dict().items()} for m in norms}
    n_inputs = _n_inputs(model)
    seen, done = 0, False
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = momentum
            m.train()
        with torch.no_grad():
            for batch in batches:
                args, kwargs = _as_inputs(batch, n_inputs)
                model(*args, **kwargs)
                seen += 1
        done = seen > 0
    finally:
        for m, training in modes.items():
            m.train(training)
        for m, value in momenta.items():
            m.momentum = value
        if not done:  # an error or no data: leave the statistics as they were
            for m, state in saved.items():
                m.load_state_dict(state)
    if seen == 0:
        raise InputError("recalibrate: the batch iterable is empty; pass a few batches of model inputs")
    return model
