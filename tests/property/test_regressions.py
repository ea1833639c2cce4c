"""Minimal reproducers of core bugs found by the random-network property tests.

Each test states the correct behaviour; they were found by the random-network properties and
now guard the fixes.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

import fxprune


def _ramp(module: nn.Module, scale: float = 1.0) -> None:
    """Deterministic weights (a ramp over [-scale, scale]) and zero bias."""
    with torch.no_grad():
        w = module.weight
        w.copy_(torch.linspace(-scale, scale, w.numel(), dtype=w.dtype).reshape(w.shape))
        if module.bias is not None:
            module.bias.zero_()


class SplitPieces(nn.Module):
    """A one-channel split piece: ``torch.split(a(x), [1, 5], 1)``, concatenated back swapped."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        p, q = torch.split(self.a(x), [1, 5], 1)
        return self.head(torch.cat([q, p], 1))


def test_restoring_a_split_piece_keeps_round_to():
    model = SplitPieces().double().eval()
    with torch.no_grad():  # channel 0 (the lone piece) has the lowest L1 norm
        model.a.weight.copy_(torch.arange(1, 19, dtype=torch.float64).reshape(6, 3, 1, 1))
    x = (torch.randn(1, 3, 4, 4, dtype=torch.float64),)
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5, round_to=2), x)
    group = next(g for g in plan.groups if g.name == "a")
    assert group.removed
    assert group.kept % 2 == 0, f"kept {group.kept} of {group.size} with round_to=2 ({group.note})"


class TwoBranches(nn.Module):
    """An expensive branch (3x3 conv, 10 channels) and a cheap one (1x1 conv, 3 channels), concatenated."""

    def __init__(self):
        super().__init__()
        self.big = nn.Conv2d(3, 10, 3, padding=1)
        self.small = nn.Conv2d(3, 3, 1)
        self.head = nn.Conv2d(13, 1, 1)

    def forward(self, x):
        return self.head(torch.cat([torch.relu(self.big(x)), torch.relu(self.small(x))], 1))


def test_budget_top_up_keeps_round_to():
    model = TwoBranches().double().eval()
    _ramp(model.big)
    _ramp(model.small, 0.01)  # the cheap branch has the lowest scores
    _ramp(model.head)
    x = (torch.randn(1, 3, 8, 8, dtype=torch.float64),)
    plan = fxprune.plan(model, fxprune.Policy(flops=0.9, round_to=2), x)
    for g in plan.groups:
        if g.removed:
            assert g.kept % 2 == 0, f"{g.name}: kept {g.kept} of {g.size} with round_to=2"


def test_pruned_model_keeps_each_submodules_train_eval_flag():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    model = model.double()
    model.train()
    model[1].eval()  # fine-tuning with frozen BatchNorm statistics
    x = (torch.randn(2, 3, 6, 6, dtype=torch.float64),)
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.0), x)
    flags = {name: m.training for name, m in pruned.named_modules()}
    assert flags.get("1") is False, f"BatchNorm '1' is in training mode in the pruned model: {flags}"
    with torch.no_grad():
        want, got = copy.deepcopy(model)(*x), copy.deepcopy(pruned)(*x)
    assert torch.equal(got, want)
