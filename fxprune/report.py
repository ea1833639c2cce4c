"""Readable plans and size tables."""
from __future__ import annotations

from tabulate import tabulate


_FRONT_ENDS = {"fx": "torch.fx", "export": "torch.export"}


def explain(plan) -> str:
    """Every group with its kind (``fxprune.group_kinds``), members, width before/after and
    exactness; every blocked op with its reason.

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
        >>> print(fxprune.explain(fxprune.plan(m, fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 8, 8),))))
        ... # doctest: +ELLIPSIS
        Plan: 2 groups (1 pruned, 1 blocked), policy importance='l1' ratio=0.5
        Captured with torch.fx: torch.fx traced the model (the fast path)
        ...
    """
    pruned = sum(1 for g in plan.groups if g.removed)
    blocked = sum(1 for g in plan.groups if g.blocked)
    structures = getattr(plan.policy, "structures", ())
    lines = [f"Plan: {len(plan.groups)} groups ({pruned} pruned, {blocked} blocked), "
             f"policy importance={plan.policy.to_dict()['importance']!r} ratio={plan.policy.ratio}"
             + (f" structures={dict(structures)}" if structures else "")]
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
    """Widths per group and parameter/MAC totals before and after, as a JSON-friendly dict.

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
    return {
        "groups": groups,
        "params": {"before": before["params"], "after": after["params"]},
        "macs": {"before": before["macs"], "after": after["macs"]},
        "timings": dict(plan.timings),
    }


def size_table(report: dict, only_changed: bool = False) -> str:
    """The size report as text tables (tabulate): per group, then totals.

    Example:
        >>> print(size_table({"groups": [], "params": {"before": 10, "after": 5},
        ...                   "macs": {"before": 100, "after": 40}, "timings": {}}))
        ... # doctest: +ELLIPSIS
        total ...
    """
    rows = [[g["group"], g.get("kind", ""), _clip(g["name"], 40), g["before"], g["after"],
             "yes" if g["exact"] else "no", _clip(g["note"], 50)]
            for g in report["groups"] if not only_changed or g["after"] != g["before"]]
    parts = []
    if rows:
        parts.append(tabulate(rows, headers=["group", "kind", "producers", "width before", "width after", "exact",
                                             "note"]))
    totals = []
    for key in ("params", "macs"):
        b, a = report[key]["before"], report[key]["after"]
        totals.append([key, _fmt(b), _fmt(a), f"{a / b:.3f}" if b else "-"])
    parts.append(tabulate(totals, headers=["total", "before", "after", "ratio"]))
    return "\n\n".join(parts)
