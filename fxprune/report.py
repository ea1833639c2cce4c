"""Readable plans and size tables."""
from __future__ import annotations

from tabulate import tabulate


_FRONT_ENDS = {"fx": "torch.fx", "export": "torch.export"}


def explain(plan) -> str:
    """One summary line (the share of prunable channels that is blocked and its top three causes,
    grouped by op: ``fxprune.blocked``; or why nothing can be pruned), then every group with its
    kind (``fxprune.group_kinds``), members, width before/after and exactness, and every blocked
    op with its reason. Where more than half is blocked, a line names the first op to teach
    fxprune and how, and :class:`fxprune.BlockedWarning` is raised with the same text.

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
        >>> print(fxprune.explain(fxprune.plan(m, fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 8, 8),))))
        ... # doctest: +ELLIPSIS
        Blocked: 0% of 8 prunable channels
        Plan: 2 groups (1 pruned, 1 blocked), policy importance='l1' ratio=0.5
        Captured with torch.fx: torch.fx traced the model (the fast path)
        ...
    """
    from .blocked import blocked_summary, warn_if_mostly_blocked
    summary = blocked_summary(plan)
    advice = warn_if_mostly_blocked(summary)
    pruned = sum(1 for g in plan.groups if g.removed)
    blocked = sum(1 for g in plan.groups if g.blocked)
    policy = plan.policy.to_dict()
    structures = getattr(plan.policy, "structures", ())
    outputs = policy.get("prune_outputs", False)
    lines = [summary.line()] + ([f"Warning: {advice}"] if advice else [])
    lines.append(f"Plan: {len(plan.groups)} groups ({pruned} pruned, {blocked} blocked), "
                 f"policy importance={policy['importance']!r} ratio={plan.policy.ratio}"
                 + (f" structures={dict(structures)}" if structures else "")
                 + (f" prune_outputs={outputs}" if outputs else ""))
    if plan.capture:
        lines.append(f"Captured with {_FRONT_ENDS.get(plan.capture['frontend'], plan.capture['frontend'])}: "
                     f"{plan.capture['reason']}")
    rows = []
    for g in plan.groups:
        members = ", ".join(f"{p.owner}.{p.target.rsplit('.', 1)[-1]}[{p.dim}]:{p.role[0]}" for p in g.params)
        rows.append([g.id, getattr(g, "kind", "channel"), g.size, g.kept, "yes" if g.exact else "no",
                     _clip(members, 90), _clip(g.note or next(iter(g.inexact.values()), ""), 70)])
    lines.append(tabulate(rows, headers=["group", "kind", "before", "after", "exact",
                                         "members (p/c/p = producer/consumer/passenger)", "note"]))
    if plan.blocked_ops:
        lines.append("\nBlocked channel spaces:")
        for node, why in plan.blocked_ops:
            lines.append(f"  {node}: {why}")
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _fmt(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def size_report(pruned) -> dict:
    """Widths per group and parameter/MAC totals before and after, as a JSON-friendly dict, with
    ``blocked`` (``fxprune.blocked.BlockedSummary.to_dict``: share, causes, summary ``line`` and,
    where more than half is blocked, ``advice``, also raised as :class:`fxprune.BlockedWarning`).

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
        >>> r = size_report(fxprune.transform(m, fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 8, 8),)))
        >>> r["params"]["after"] < r["params"]["before"]
        True
    """
    from .cost import count
    plan = pruned.meta["fxprune"]
    before, after = count(plan.traced), count(pruned)
    groups = [{"group": g.id, "name": g.name, "kind": getattr(g, "kind", "channel"), "before": g.size,
               "after": g.kept, "exact": g.exact, "note": g.note} for g in plan.groups]
    from .blocked import blocked_summary, warn_if_mostly_blocked
    summary = blocked_summary(plan)
    warn_if_mostly_blocked(summary)
    return {
        "blocked": summary.to_dict(),
        "groups": groups,
        "params": {"before": before["params"], "after": after["params"]},
        "macs": {"before": before["macs"], "after": after["macs"]},
        "timings": dict(plan.timings),
    }


def size_table(report: dict, only_changed: bool = False) -> str:
    """The size report as text tables (tabulate): per group, then totals; a report with
    ``blocked`` starts with its summary line (and its advice, where more than half is blocked).

    Example:
        >>> print(size_table({"groups": [], "params": {"before": 10, "after": 5},
        ...                   "macs": {"before": 100, "after": 40}, "timings": {}}))
        ... # doctest: +ELLIPSIS
        total ...
    """
    rows = [[g["group"], g.get("kind", ""), _clip(g["name"], 40), g["before"], g["after"],
             "yes" if g["exact"] else "no", _clip(g["note"], 50)]
            for g in report["groups"] if not only_changed or g["after"] != g["before"]]
    blocked = report.get("blocked")
    parts = [blocked["line"] + (f"\nWarning: {blocked['advice']}" if blocked.get("advice") else "")] if blocked else []
    if rows:
        parts.append(tabulate(rows, headers=["group", "kind", "producers", "width before", "width after", "exact",
                                             "note"]))
    totals = []
    for key in ("params", "macs"):
        b, a = report[key]["before"], report[key]["after"]
        totals.append([key, _fmt(b), _fmt(a), f"{a / b:.3f}" if b else "-"])
    parts.append(tabulate(totals, headers=["total", "before", "after", "ratio"]))
    return "\n\n".join(parts)
