"""How much of a plan is blocked, and by what: the summary line of ``fxprune.explain`` and the CLI.

A channel is *prunable* unless it is kept for a model output (the contract: an output's width
never changes, see ``Policy.prune_outputs``); a prunable channel is *blocked* when it is pinned
for any other reason (an op fxprune cannot track, ``policy.ignore``, ...). Reasons are grouped by
the op that caused them, not by node, so that one op repeated in every block counts once:
``unfold`` at 12 places is one cause with the channels of all 12.

Example:
    >>> import fxprune, torch
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 4, 1)
    ...     def forward(self, x):
    ...         return self.b(torch.cummax(self.a(x), 1)[0])
    >>> s = blocked_summary(fxprune.plan(Net(), fxprune.Policy(), (torch.randn(1, 3, 4, 4),)))
    >>> s.line()
    'Blocked: 100% of 8 prunable channels; top reasons: `cummax` at cummax (8 ch)'
"""
from __future__ import annotations

import collections
import dataclasses
import re
import warnings
from typing import Any

from .coupling.outputs import OUTPUT_REASON
from .errors import BlockedWarning

_NODE = re.compile(r"node '([^']+)'")
_IGNORED = " is in policy.ignore"
TEACHABLE = ("module", "function", "method")  # causes that a rule or an issue can lift


@dataclasses.dataclass
class Cause:
    """One op that blocks channels, over every node where it does so.

    ``kind`` is ``"module"`` (a leaf module; ``op`` is its class name), ``"function"``,
    ``"method"``, ``"policy"`` (``policy.ignore``) or ``"other"`` (``op`` is then the reason);
    ``sites`` maps each place (module path, else node name) to its blocked channels.

    Example:
        >>> c = Cause("unfold", "function", 96, {"blocks.0": 64, "blocks.1": 32}, "... not in the op table")
        >>> c.text()
        '`unfold` at blocks.0 +1 more (96 ch)'
    """

    op: str
    kind: str
    channels: int
    sites: dict[str, int]
    reason: str
    module_type: Any = None

    @property
    def where(self) -> str:
        return max(self.sites, key=self.sites.get) if self.sites else ""

    def text(self) -> str:
        more = f" +{len(self.sites) - 1} more" if len(self.sites) > 1 else ""
        at = f" at {self.where}{more}" if self.where else ""
        return f"`{self.op}`{at} ({self.channels:,} ch)"

    def to_dict(self) -> dict:
        return {"op": self.op, "kind": self.kind, "channels": self.channels, "where": self.where,
                "sites": len(self.sites), "reason": self.reason}


@dataclasses.dataclass
class BlockedSummary:
    """Prunable and blocked channel counts of a plan, its causes (largest first) and its outputs.

    ``output_groups`` counts the groups with channels kept for a model output, ``outputs`` the
    outputs named by those pins (``#0``, ``'logits'``), ``output_only`` the blocked groups kept for
    outputs alone (``Policy(prune_outputs=True)`` would free them).

    Example:
        >>> s = BlockedSummary(channels=100, blocked=60, causes=[], groups=3, output_groups=1)
        >>> s.share, s.mostly_blocked
        (0.6, True)
    """

    channels: int
    blocked: int
    causes: list[Cause]
    groups: int
    output_groups: int = 0
    output_only: int = 0
    outputs: list[str] = dataclasses.field(default_factory=list)
    all_blocked: bool = False
    capture: str | None = None

    @property
    def share(self) -> float:
        return self.blocked / self.channels if self.channels else 0.0

    @property
    def mostly_blocked(self) -> bool:
        """More than half of the prunable channels are blocked."""
        return self.share > 0.5

    @property
    def nothing_to_prune(self) -> bool:
        """Every group is blocked and every group reaches a model output."""
        return self.groups > 0 and self.all_blocked and self.output_groups == self.groups

    def line(self) -> str:
        """The one summary line (what is blocked and the top three causes, or why nothing is prunable)."""
        if self.nothing_to_prune:
            outs = ", ".join(self.outputs)
            hint = ("; Policy(prune_outputs=True) narrows hidden outputs" if self.output_only
                    else "; other reasons block them too (see the groups)")
            return (f"nothing to prune: every channel group reaches a model output ({self.groups} group"
                    f"{'s' * (self.groups != 1)}; outputs {outs}){hint}")
        share = f"{self.share:.0%}" if self.share == 0 or self.share >= 0.005 else "<1%"
        head = f"Blocked: {share} of {self.channels:,} prunable channels"
        if not self.causes:
            return head
        return head + "; top reasons: " + ", ".join(c.text() for c in self.causes[:3])

    def advice(self) -> str | None:
        """For a mostly blocked plan: the first op to teach fxprune, and how; else None."""
        if not self.mostly_blocked:
            return None
        first = next((c for c in self.causes if c.kind in TEACHABLE), None)
        head = f"more than half of the prunable channels are blocked ({self.share:.0%})"
        if first is None:
            top = self.causes[0].text() if self.causes else "no single op"
            return f"{head}; the largest cause is {top}: see the blocked groups' notes"
        return f"{head}; teach fxprune {first.text()} first: {how_to_teach(first, self.capture)}"

    def to_dict(self) -> dict:
        """JSON-friendly: ``share``, ``channels``, ``blocked``, ``top`` (``[text, channels]``, three),
        ``causes`` and ``nothing_to_prune``."""
        return {"share": self.share, "channels": self.channels, "blocked": self.blocked,
                "top": [[c.text(), c.channels] for c in self.causes[:3]],
                "causes": [c.to_dict() for c in self.causes], "groups": self.groups,
                "output_groups": self.output_groups, "outputs": list(self.outputs),
                "nothing_to_prune": self.nothing_to_prune, "line": self.line(), "advice": self.advice()}


def how_to_teach(cause: Cause, capture: str | None = None) -> str:
    """What a user can do about one cause.

    Example:
        >>> how_to_teach(Cause("Unfold", "module", 8, {"unfold": 8}, ""))[:60]
        'a leaf module: fxprune.register_module_rule(Unfold, rule) wi'

    """
    if cause.kind == "module":
        name = cause.module_type.__qualname__ if cause.module_type is not None else cause.op
        return (f"a leaf module: fxprune.register_module_rule({name}, rule) with a rule from fxprune.coupling.rules "
                "(e.g. rules.passthrough for a per-channel module) or your own (an, node) -> ChannelInfo")
    other = "" if capture == "export" else "try capture=\"export\" (its ATen ops have rules of their own), "
    return (f"an op fxprune cannot track here ({cause.reason[:160]}): {other}move it into a module passed "
            "as leaf_modules= and describe that module with fxprune.register_module_rule(Type, rule), "
            "or open an fxprune issue with this line")


def _module_path(node) -> str:
    """The module a call sits in (``nn_module_stack``), else the node's name."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1]
        path = path[0] if isinstance(path, (tuple, list)) else path
        if isinstance(path, str) and path:
            return path.replace("L['self'].", "").replace("L__self___", "")
    return node.name


def _op_name(target: Any) -> str:
    packet = getattr(target, "overloadpacket", None)  # ATen OpOverload (torch.export graphs)
    if packet is not None:
        return getattr(packet, "__name__", str(packet))
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


def _cause_key(reason: str, nodes: dict, traced) -> tuple[tuple, str, Any]:
    """``((kind, op), where, module type)`` of one pin reason."""
    if reason.endswith(_IGNORED):
        return ("policy", "policy.ignore"), reason[: -len(_IGNORED)], None
    found = _NODE.search(reason)
    node = nodes.get(found.group(1)) if found else None
    if node is None:
        return ("other", reason if len(reason) <= 80 else reason[:77] + "..."), "", None
    if node.op == "call_module":
        try:
            module_type = type(traced.get_submodule(node.target))
        except AttributeError:
            module_type = None
        op = module_type.__name__ if module_type is not None else str(node.target)
        return ("module", op), str(node.target), module_type
    if node.op in ("call_function", "call_method"):
        return (node.op[5:], _op_name(node.target)), _module_path(node), None
    return ("other", f"{node.op} {node.name}"), node.name, None


def blocked_summary(plan) -> BlockedSummary:
    """Count the prunable and blocked channels of a plan and group the blocking reasons by op.

    Works on a plan before or after selection (it reads each group's pins, not its removal).
    See the module docstring for an example.
    """
    traced = plan.traced
    nodes = {n.name: n for n in traced.graph.nodes}
    keys: dict[str, tuple] = {}
    channels = blocked = output_groups = output_only = 0
    by_cause: dict[tuple, Cause] = {}
    outputs: dict[str, None] = {}
    for g in plan.groups:
        reasons = collections.Counter(g.pinned.values())
        kept_for_outputs = sum(n for why, n in reasons.items() if why.startswith(OUTPUT_REASON))
        channels += g.size - kept_for_outputs
        if kept_for_outputs:
            output_groups += 1
            output_only += g.blocked and kept_for_outputs == len(g.pinned)
            for why in reasons:
                if why.startswith(OUTPUT_REASON):
                    outputs[why[len(OUTPUT_REASON):].strip(" ()") or "the output"] = None
        for why, n in reasons.items():
            if why.startswith(OUTPUT_REASON):
                continue
            blocked += n
            if why not in keys:
                keys[why] = _cause_key(why, nodes, traced)
            key, where, module_type = keys[why]
            cause = by_cause.get(key)
            if cause is None:
                cause = by_cause[key] = Cause(key[1], key[0], 0, {}, why, module_type)
            cause.channels += n
            cause.sites[where] = cause.sites.get(where, 0) + n
    causes = sorted(by_cause.values(), key=lambda c: (-c.channels, c.op))
    return BlockedSummary(channels, blocked, causes, len(plan.groups), output_groups, output_only, list(outputs),
                          all(g.blocked for g in plan.groups), (plan.capture or {}).get("frontend"))


def warn_if_mostly_blocked(summary: BlockedSummary, stacklevel: int = 3) -> str | None:
    """Warn with :class:`fxprune.BlockedWarning` when more than half is blocked; return the advice.

    Example:
        >>> s = BlockedSummary(channels=10, blocked=2, causes=[], groups=1)
        >>> warn_if_mostly_blocked(s) is None
        True
    """
    advice = summary.advice()
    if advice is not None:
        warnings.warn(advice, BlockedWarning, stacklevel=stacklevel)
    return advice
