"""Prune to a latency target and confirm it with the harness: predict, measure, correct.

``Policy(latency=t)`` prunes until the lookup table *predicts* ``t`` of the original latency.
A prediction from layers timed one by one is not the model's measured latency (caches, the
memory-bound rest of the network, the allocator), so :func:`prune_to_latency` closes the loop:
it prunes with the table, measures original and pruned side by side with :func:`compare`, and,
while the measured fraction misses the target by more than ``tolerance`` (relative), asks the
table for a corrected fraction and tries again, at most ``rounds`` times: after the first round
``t_next = t_asked * target / measured`` (the line through the origin), after later rounds the
secant through the last two (asked, measured) points, when it slopes upwards. Every round is
reported, so the open-loop error of the table is on record next to the result.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .compare import Comparison, compare


@dataclasses.dataclass(frozen=True)
class LatencyRound:
    """One round: the fraction asked of the table, what the table predicted, what was measured.

    Example:
        >>> r = LatencyRound(1, 0.6, 0.6, 0.66, 0.6, None)
        >>> round(r.error, 3)
        0.1
    """

    round: int
    asked: float
    predicted: float
    measured: float
    target: float
    comparison: Comparison | None

    @property
    def error(self) -> float:
        """Relative miss of the measured fraction: ``measured / target - 1``."""
        return self.measured / self.target - 1.0

    def to_dict(self) -> dict:
        return {"round": self.round, "asked": self.asked, "predicted": self.predicted,
                "measured": self.measured, "target": self.target, "error": self.error}


def prune_to_latency(model: torch.nn.Module, policy, example_inputs: Any, *, tolerance: float = 0.05,
                     rounds: int = 3, latency_table=None, runs: int = 20, warmup: int = 5,
                     threads: int = 1, **plan_kwargs: Any) -> tuple[torch.fx.GraphModule, list[LatencyRound]]:
    """Prune ``model`` so that its *measured* latency is ``policy.latency`` of the original.

    Returns the pruned module whose measured fraction is closest to the target and the list of
    rounds. The table is measured on ``policy.device`` with ``threads`` threads (or given as
    ``latency_table``) and reused by every round; timing uses the same device and threads.

    Example:
        >>> import fxprune, torch
        >>> from fxprune.latency_lut import GRID, LatencyTable
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 8, 3))
        >>> lut = LatencyTable({"0.weight": [[fi * fo for fo in GRID] for fi in GRID],
        ...                     "2.weight": [[fi * fo for fo in GRID] for fi in GRID]}, 0.1, 2.1, "demo")
        >>> pruned, history = prune_to_latency(m, fxprune.Policy(latency=0.7), (torch.randn(1, 3, 16, 16),),
        ...                                    latency_table=lut, rounds=1, runs=3, warmup=1)
        >>> len(history), history[0].asked
        (1, 0.7)
    """
    from ..api import transform
    from ..errors import PolicyError
    from ..latency_lut import LatencyTable
    from ..trace import check_inputs
    if policy.latency is None:
        raise PolicyError("prune_to_latency needs a policy with latency=<fraction to keep>")
    if not 0.0 < tolerance < 1.0 or rounds < 1:
        raise PolicyError(f"need 0 < tolerance < 1 and rounds >= 1, got tolerance={tolerance}, rounds={rounds}")
    inputs = check_inputs(example_inputs)
    if latency_table is None:
        latency_table = LatencyTable.for_model(model, policy, inputs, threads=threads,
                                               leaf_modules=plan_kwargs.get("leaf_modules", ()),
                                               concrete_args=plan_kwargs.get("concrete_args"))
    target, asked = float(policy.latency), float(policy.latency)
    history: list[LatencyRound] = []
    best: tuple[float, torch.fx.GraphModule] | None = None
    for index in range(1, rounds + 1):
        candidate = dataclasses.replace(policy, latency=asked)
        pruned = transform(model, candidate, inputs, latency_table=latency_table, **plan_kwargs)
        record = compare(model, pruned, inputs, device=policy.device, runs=runs, warmup=warmup, threads=threads)
        measured = record.pruned.median_ms / record.original.median_ms
        predicted = float(pruned.meta["fxprune"].selection.get("achieved", asked))
        history.append(LatencyRound(index, asked, predicted, measured, target, record))
        if best is None or abs(measured - target) < best[0]:
            best = (abs(measured - target), pruned)
        if abs(measured / target - 1.0) <= tolerance:
            break
        asked = min(1.0, max(1e-3, _next_ask(history, target)))
    return best[1], history


def _next_ask(history: list[LatencyRound], target: float) -> float:
    """The fraction to ask the table for next (see the module docstring).

    Example:
        >>> rounds = [LatencyRound(1, 0.6, 0.6, 0.8, 0.6, None), LatencyRound(2, 0.45, 0.45, 0.5, 0.6, None)]
        >>> round(_next_ask(rounds[:1], 0.6), 3), round(_next_ask(rounds, 0.6), 3)
        (0.45, 0.5)
    """
    last = history[-1]
    if len(history) >= 2:
        prev = history[-2]
        slope = (last.measured - prev.measured) / (last.asked - prev.asked) if last.asked != prev.asked else 0.0
        if slope > 0:
            return last.asked + (target - last.measured) / slope
    return last.asked * target / last.measured
