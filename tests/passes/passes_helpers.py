"""Shared pieces of the importance-pass tests: calibration data, a loss, scores of a plan."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fxprune
from zoo import build

DATA_FREE = ["scp", "cpmc", "bn_scale", "fpgm", "random", "lamp"]
WITH_DATA = ["sensitivity", "hrank", "taylor"]
ALL = DATA_FREE + WITH_DATA
NETS = ["conv_chain_2d", "residual", "flatten_heads", "depthwise", "mlp", "functional", "concat"]


def leaves(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in leaves(v)]
    return [t for v in out for t in leaves(v)]


def loss_fn(out, targets):
    """Mean squared error of every output leaf against the targets (a list of tensors)."""
    return sum(F.mse_loss(o, t) for o, t in zip(leaves(out), targets))


def calibration(name: str, model, batches: int = 2):
    """Labelled batches ``(inputs, targets)`` from fresh zoo inputs; targets are perturbed outputs."""
    out = []
    for seed in range(10, 10 + batches):
        inputs = build(name, seed=seed)[1]
        with torch.no_grad():
            targets = [t + 0.1 * torch.randn_like(t) for t in leaves(model(*inputs))]
        out.append((inputs, targets))
    return out


def data_kwargs(name: str, model) -> dict:
    return {"calibration": calibration(name, model), "loss_fn": loss_fn}


def scores(plan, criterion: str, options: dict | None = None, **data) -> dict[int, torch.Tensor]:
    """``{group id: scores}`` of a criterion on a plan's groups (what the pipeline computes)."""
    ctx = fxprune.ImportanceContext(plan.traced, plan.groups, plan.example_inputs,
                                    data.get("calibration"), data.get("loss_fn"), plan.policy,
                                    dict(options or {}))
    scorer = fxprune.importance.get(criterion)
    return {g.id: torch.as_tensor(scorer(g, ctx)) for g in plan.groups if not g.blocked}
