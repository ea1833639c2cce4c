"""Shared by the op-rule tests: prune a model in float64 and hold the result to the mask oracle."""
from __future__ import annotations

import torch
import torch.nn as nn

import fxprune


def prune_verified(model: nn.Module, inputs: tuple, capture: str = "auto", ratio: float = 0.5,
                   randomize_bn: bool = False, *, exact_only: bool = False, policy: fxprune.Policy | None = None,
                   max_error: float | None = None, seed: int | None = None, **plan_kwargs) -> tuple:
    """``(plan, pruned)`` of ``model`` in float64 at ``Policy(ratio=ratio, exact_only=exact_only)``
    (or at ``policy`` when given); asserts that the oracle compared something and holds.

    ``model`` is converted in place (``.double().eval()``): pass a copy to keep the original. Floating
    inputs become float64, other inputs (token ids, indices) stay as they are. ``randomize_bn`` gives
    BatchNorm2d non-trivial statistics. ``exact_only`` (or a policy with it) also asserts that every
    group that loses channels is exact; ``max_error`` asserts the oracle's error is strictly below it;
    ``seed`` seeds torch before planning; ``plan_kwargs`` (``leaf_modules=...``) go to ``fxprune.plan``.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> plan, pruned = prune_verified(m, (torch.randn(3, 4),), "fx", exact_only=True, max_error=1e-9)
        >>> pruned.get_submodule("0").out_features
        4
    """
    model = model.double().eval()
    inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    if seed is not None:
        torch.manual_seed(seed)
    if randomize_bn:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-1, 1)
                    m.running_var.uniform_(0.5, 2)
    policy = policy if policy is not None else fxprune.Policy(ratio=ratio, exact_only=exact_only)
    plan = fxprune.plan(model, policy, inputs, capture=capture, **plan_kwargs)
    pruned = fxprune.apply(plan)
    check = fxprune.verify(pruned, inputs=inputs)
    assert check.ok and check.compared, check
    if policy.exact_only:
        assert check.exact, check
    if max_error is not None:
        assert check.max_error < max_error, check
    return plan, pruned


def blocked_reasons(plan) -> list[str]:
    """The reasons of every blocked op of a plan."""
    return [why for _, why in plan.blocked_ops]
