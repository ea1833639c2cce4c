"""Shared by the op-rule tests: prune a model in float64 and hold the result to the mask oracle."""
from __future__ import annotations

import torch
import torch.nn as nn

import fxprune


def prune_verified(model: nn.Module, inputs: tuple, capture: str, ratio: float = 0.5,
                   randomize_bn: bool = False) -> tuple:
    """``(plan, pruned)`` of ``model`` in float64 at ``Policy(ratio=ratio)``; asserts that the
    oracle compared something and holds. ``randomize_bn`` gives BatchNorm2d non-trivial statistics."""
    model = model.double().eval()
    inputs = tuple(t.double() for t in inputs)
    if randomize_bn:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-1, 1)
                    m.running_var.uniform_(0.5, 2)
    plan = fxprune.plan(model, fxprune.Policy(ratio=ratio), inputs, capture=capture)
    pruned = fxprune.apply(plan)
    check = fxprune.verify(pruned, inputs=inputs)
    assert check.ok and check.compared, check
    return plan, pruned


def blocked_reasons(plan) -> list[str]:
    """The reasons of every blocked op of a plan."""
    return [why for _, why in plan.blocked_ops]
