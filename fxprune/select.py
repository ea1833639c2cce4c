"""Stage 5: turn scores into the channels each group loses, under the policy's constraints."""
from __future__ import annotations

import math

import torch

from .errors import StageError
from .policy import Policy, kept_width


def select(groups: list, scores: dict[int, torch.Tensor], policy: Policy) -> None:
    """Set ``group.removed`` (and ``group.note`` when the request was clamped) for every group.

    Lowest score goes first; ties go to the lower channel index, so plans are deterministic.

    Example:
        >>> from fxprune.coupling.groups import Group
        >>> g = Group(0, 4, [], [], {}, {})
        >>> select([g], {0: torch.tensor([3., 1., 2., 0.])}, Policy(ratio=0.5))
        >>> g.removed
        (1, 3)
    """
    for g in groups:
        g.removed, g.note = (), ""
        if g.blocked:
            g.note = "blocked: " + next(iter(g.pinned.values()))
            continue
        if policy.exact_only and not g.exact:
            g.note = "kept whole (exact_only): " + next(iter(g.inexact.values()))
            continue
        s = scores.get(g.id)
        if s is None or tuple(s.shape) != (g.size,):
            got = None if s is None else tuple(s.shape)
            raise StageError("select", g.name, f"importance returned shape {got}, expected ({g.size},)")
        if not torch.isfinite(s).all():
            raise StageError("select", g.name, "importance returned non-finite scores")
        _remove_lowest(g, s, policy)


def _remove_lowest(g, s: torch.Tensor, policy: Policy) -> None:
    keep = kept_width(g.size, policy.ratio, policy.min_channels, policy.round_to, floor=len(g.pinned))
    asked = g.size - int(math.floor(policy.ratio * g.size + 1e-9))
    free = [c for c in range(g.size) if c not in g.pinned]
    values = s.tolist()
    order = sorted(free, key=lambda c: (values[c], c))
    g.removed = tuple(sorted(order[: g.size - keep]))
    if keep != asked:
        why = []
        if keep == len(g.pinned) or len(g.pinned) > asked:
            why.append(f"{len(g.pinned)} channels cannot be removed")
        if policy.min_channels > asked:
            why.append(f"min_channels={policy.min_channels}")
        if policy.round_to:
            why.append(f"round_to={policy.round_to}")
        g.note = f"kept {keep} instead of {asked} ({', '.join(why) or 'rounding'})"
