"""Readable plans and size tables."""
from __future__ import annotations

from tabulate import tabulate


def explain(plan) -> str:
    """Every group with its members, width before/after, exactness; every blocked op with its reason.

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
        >>> print(fxprune.explain(fxprune.plan(m, fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 8, 8),))))
        ... # doctest: +ELLIPSIS
        Plan: 1 groups (1 pruned, 0 blocked), policy importance='l1' ratio=0.5
        ...
    """
    pruned = sum(1 for g in plan.groups if g.removed)
    blocked = sum(1 for g in plan.groups if g.blocked)
    lines = [f"Plan: {len(plan.groups)} groups ({pruned} pruned, {blocked} blocked), "
             f"policy importance={plan.policy.to_dict()['importance']!r} ratio={plan.policy.ratio}"]
    rows = []
    for g in plan.groups:
        members = ", ".join(f"{p.owner}.{p.target.rsplit('.', 1)[-1]}[{p.dim}]:{p.role[0]}" for p in g.params)
        rows.append([g.id, g.size, g.kept, "yes" if g.exact else "no", _clip(members, 90),
                     _clip(g.note or next(iter(g.inexact.values()), ""), 70)])
    lines.append(tabulate(rows, headers=["group", "before", "after", "exact", "members (p/c/p = producer/consumer/passenger)", "note"]))
    if plan.blocked_ops:
        lines.append("\nBlocked channel spaces:")
        for node, why in plan.blocked_ops:
            lines.append(f"  {node}: {why}")
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
