"""Stage 5: turn scores into the channels each group loses, under the policy's constraints.

Local scope removes a ratio from every group; global scope ranks all channels after a
normalisation. A budget (``flops=`` / ``params=``) searches the ratio (local) or the threshold
(global) by bisection on a cost model, keeping at least what was asked. Groups with an override,
or of a kind named in ``policy.structures``, keep their own ratio: they are not ranked with the
rest, and a budget search moves only the others. Every group is clamped
by its minimum width, rounding and unremovable channels, and a clamp is reported in its note.
Groups of attention heads round their channel width (heads x head_dim), not their head count,
and a ``query-heads`` group removes as many heads from every kv group (``fxprune.select_heads``).
"""
from __future__ import annotations

import math
import warnings

import torch

from .budget import CostModel, bisect, budget_met
from .errors import BudgetWarning, StageError
from .policy import Policy, kept_width
from .select_heads import (block_floor, even_blocks, head_step, is_head_group, kept_heads, lowest_in_blocks,
                           next_cut)
from .select_keys import group_weights, normalised


def _eligible(groups: list, scores: dict, policy: Policy) -> list:
    out = []
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
        out.append(g)
    return out


def _lowest(g, s: torch.Tensor, ratio: float, policy: Policy) -> tuple[int, ...]:
    ratio = min(max(ratio, 0.0), 1.0)
    if is_head_group(g):
        keep, _ = kept_heads(g, kept_width(g.size, ratio, policy.min_channels, None, floor=block_floor(g)),
                             policy.round_to)
        if g.blocks:
            return lowest_in_blocks(g, s, keep)
    else:
        keep = kept_width(g.size, ratio, policy.min_channels, policy.round_to, floor=len(g.pinned))
    free = [c for c in range(g.size) if c not in g.pinned]
    order = sorted(free, key=s.tolist().__getitem__)  # stable: ties go by channel index
    return tuple(sorted(order[: g.size - keep]))


def _group_ratio(g, policy: Policy, modules: dict) -> float | None:
    """The ratio a group keeps whatever the scope or budget: the smallest override among its
    producers, else the ratio ``policy.structures`` gives its kind, else None (``ratio`` applies)."""
    found = [policy.override_for(p.owner, modules.get(p.owner)) for p in g.producers]
    found = [r for r in found if r is not None]
    return min(found) if found else policy.structure_ratio(getattr(g, "kind", "channel"))


class _Selector:
    """Removal for a scalar knob: the ratio (local scope) or a key quantile (global scope)."""

    def __init__(self, groups, scores, policy, modules, weights):
        self.groups, self.scores, self.policy = groups, scores, policy
        self.fixed = {g.id: r for g in groups if (r := _group_ratio(g, policy, modules)) is not None}
        self.weights = weights
        if policy.scope == "global":
            self.keys = {g.id: normalised(scores[g.id], policy.normalize) / weights.get(g.id, 1.0)
                         for g in groups if g.id not in self.fixed}
            free = [k for g in groups if g.id in self.keys
                    for c, k in enumerate(self.keys[g.id].tolist()) if c not in g.pinned]
            self.sorted_keys = sorted(free)

    def removal(self, knob: float) -> dict[int, tuple]:
        out = {}
        threshold = self._threshold(knob) if self.policy.scope == "global" else None
        for g in self.groups:
            s = self.scores[g.id]
            if g.id in self.fixed:
                ratio = self.fixed[g.id]
            elif threshold is not None:
                below = sum(1 for c, k in enumerate(self.keys[g.id].tolist()) if k < threshold and c not in g.pinned)
                ratio = below / g.size
            else:
                ratio = knob * self.weights.get(g.id, 1.0)
            out[g.id] = _lowest(g, s, ratio, self.policy)
        return out

    def _threshold(self, quantile: float) -> float:
        keys = self.sorted_keys
        if not keys:
            return -math.inf
        n = int(math.floor(quantile * len(keys) + 1e-9))
        return keys[n] if n < len(keys) else math.inf


def select(groups: list, scores: dict[int, torch.Tensor], policy: Policy, cost: CostModel | None = None,
           modules: dict | None = None) -> dict:
    """Set ``group.removed`` (and ``group.note`` when clamped) for every group; return a summary.

    Lowest score goes first; ties go to the lower channel index, so plans are deterministic.
    Under a budget the summary holds ``metric``, ``target``, ``achieved`` and ``met`` (within 1%
    of the target, relative: ``fxprune.budget.budget_met``); a missed budget adds ``reason`` and
    warns with :class:`fxprune.errors.BudgetWarning`.

    Example:
        >>> from fxprune.coupling.groups import Group
        >>> g = Group(0, 4, [], [], {}, {})
        >>> _ = select([g], {0: torch.tensor([3., 1., 2., 0.])}, Policy(ratio=0.5))
        >>> g.removed
        (1, 3)
    """
    eligible = _eligible(groups, scores, policy)
    weights = group_weights(eligible, cost) if policy.allocation == "cost" else {}
    chooser = _Selector(eligible, scores, policy, modules or {}, weights)
    summary: dict = {"scope": policy.scope}
    if policy.budget is None and policy.scope == "local":
        removal = chooser.removal(float(policy.ratio))
    elif policy.budget is None:  # global ratio: a share of all removable channels, clamps included
        wanted = int(math.floor(float(policy.ratio) * len(chooser.sorted_keys) + 1e-9))
        fits = lambda q: sum(len(r) for gid, r in chooser.removal(q).items() if gid not in chooser.fixed) <= wanted
        removal = chooser.removal(bisect(fits, 0.0, 1.0))
    else:
        if cost is None:
            raise StageError("select", None, "a flops/params budget needs a cost model")
        metric, target = policy.budget
        hi = 1.0 if policy.scope == "global" else 1.0 / min(weights.values(), default=1.0)
        knob = bisect(lambda k: cost.fractions(chooser.removal(k))[metric] >= target - 1e-12, 0.0, hi)
        removal = _top_up(chooser.removal(knob), chooser, cost, metric, target)
        achieved = cost.fractions(removal)[metric]
        summary.update(metric=metric, target=target, achieved=achieved, knob=knob,
                       met=budget_met(achieved, target))
    for g in eligible:
        g.removed = removal[g.id]
        _note_clamp(g, policy, chooser, summary)
        _note_structure(g, policy, modules or {})
        _keep_every_member(g, scores[g.id], None if is_head_group(g) else policy.round_to)
        _add_note(g, even_blocks(g, scores[g.id]))
    if policy.budget is not None:
        summary["achieved"] = cost.fractions({g.id: g.removed for g in eligible})[summary["metric"]]
        summary["met"] = budget_met(summary["achieved"], summary["target"])
        if not summary["met"]:
            _warn_budget(summary, cost, cost.fractions(chooser.removal(hi))[summary["metric"]])
    return summary


def _warn_budget(summary: dict, cost: CostModel, most: float) -> None:
    """Say why a budget was missed (``summary["reason"]``) and warn with :class:`BudgetWarning`.

    ``most`` is the fraction kept when every removable channel goes."""
    metric, target, achieved = summary["metric"], summary["target"], summary["achieved"]
    if achieved < target:
        why = ("overrides or structures remove more than the budget allows (overridden groups and "
               "named kinds keep their ratio)")
    elif most > target * 1.01:
        fixed = {"params": cost.fixed_params / max(cost.total_params, 1),
                 "macs": cost.fixed_macs / max(cost.total_macs, 1)}.get(metric)
        where = f"; {fixed:.1%} of the {metric} sit in layers no group can shrink" if fixed else ""
        why = (f"removing every removable channel still keeps {most:.2%}{where} (channels reaching an "
               "output, blocked, ignored or overridden groups, kinds fixed by structures, min_channels and "
               "round_to keep the rest)")
    else:
        why = "the channel steps are too coarse to land closer (small layers or round_to)"
    summary["reason"] = why
    warnings.warn(BudgetWarning(f"{metric} budget not met: asked to keep {target:.2%}, reached "
                                f"{achieved:.2%}: {why}"), stacklevel=4)


def _top_up(removal: dict, chooser: _Selector, cost: CostModel, metric: str, target: float,
            max_tries: int = 4000) -> dict:
    """After the search, remove single channels (``round_to`` at a time) by lowest normalised
    score while the budget still holds, so coarse steps do not leave it far from the target."""
    policy, rt = chooser.policy, chooser.policy.round_to or 1
    removal = {gid: tuple(r) for gid, r in removal.items()}
    open_groups = {g.id: g for g in chooser.groups if g.id not in chooser.fixed}
    tries = 0
    while open_groups and tries < max_tries:
        candidates = []
        for gid, g in list(open_groups.items()):
            gone = set(removal[gid])
            s = chooser.scores[gid]
            nxt = _next_channels(g, gone, s, policy, rt)
            if not nxt:
                del open_groups[gid]
                continue
            key = float(normalised(s, policy.normalize)[nxt[0]]) / chooser.weights.get(gid, 1.0)
            candidates.append((key, gid, nxt))
        accepted = False
        for key, gid, nxt in sorted(candidates):
            tries += 1
            trial = {**removal, gid: tuple(sorted(removal[gid] + tuple(nxt)))}
            if cost.fractions(trial)[metric] >= target - 1e-12:
                removal, accepted = trial, True
                break
            del open_groups[gid]
        if not accepted:
            break
    return removal


def _next_channels(g, gone: set, s: torch.Tensor, policy: Policy, rt: int) -> list[int] | None:
    """The channels a top-up step removes next from ``g`` (lowest score first), or None."""
    if is_head_group(g):
        nxt = next_cut(g, gone, s, policy.round_to, max(policy.min_channels, block_floor(g)))
        return sorted(nxt, key=lambda c: (float(s[c]), c)) if nxt else None
    step = (g.size - len(gone)) % rt or rt  # land on a multiple of round_to
    free = [c for c in range(g.size) if c not in g.pinned and c not in gone]
    if len(free) < step or g.size - len(gone) - step < max(policy.min_channels, len(g.pinned)):
        return None
    return sorted(free, key=lambda c: (float(s[c]), c))[:step]


def _add_note(g, note: str) -> None:
    if note:
        g.note = f"{g.note}; {note}" if g.note else note


def _note_clamp(g, policy: Policy, chooser: _Selector, summary: dict) -> None:
    if policy.budget is not None or policy.scope == "global":
        if g.kept == len(g.pinned) and g.pinned and g.kept > policy.min_channels:
            g.note = f"kept {g.kept}: {len(g.pinned)} channels cannot be removed"
        elif is_head_group(g) and g.removed and g.kept % head_step(g, policy.round_to):
            g.note = f"kept {g.kept}: " + kept_heads(g, g.kept, policy.round_to)[1]
        return
    ratio = chooser.fixed.get(g.id, float(policy.ratio) * chooser.weights.get(g.id, 1.0))
    asked = g.size - int(math.floor(min(ratio, 1.0) * g.size + 1e-9))
    if is_head_group(g) and g.kept != asked:
        floor = max(asked, policy.min_channels, block_floor(g))
        why = [f"{block_floor(g)} heads cannot be removed"] if block_floor(g) > asked else []
        why += [f"min_channels={policy.min_channels}"] if policy.min_channels > asked else []
        why += [r for r in [kept_heads(g, floor, policy.round_to)[1]] if r]
        g.note = f"kept {g.kept} instead of {asked} ({'; '.join(why) or 'rounding'})"
    elif g.kept != asked:
        why = []
        if len(g.pinned) > asked:
            why.append(f"{len(g.pinned)} channels cannot be removed")
        if policy.min_channels > asked:
            why.append(f"min_channels={policy.min_channels}")
        if policy.round_to:
            why.append(f"round_to={policy.round_to}")
        g.note = f"kept {g.kept} instead of {asked} ({', '.join(why) or 'rounding'})"


def _note_structure(g, policy: Policy, modules: dict) -> None:
    """Say so when a group stays whole because ``policy.structures`` gives its kind 0.0."""
    if g.removed or g.note or policy.structure_ratio(getattr(g, "kind", "channel")) != 0.0:
        return
    if all(policy.override_for(p.owner, modules.get(p.owner)) is None for p in g.producers):
        g.note = f"kept whole: structures gives {g.kind!r} 0.0"


def _keep_every_member(g, s: torch.Tensor, round_to: int | None = None) -> None:
    """A member may carry only some of its group's channels (a split piece, one side of a
    channel shuffle): if all of them were chosen, its best one stays and, where possible, the
    weakest channel that no member needs goes instead, so the width asked for is kept; else the
    group keeps more (rounded up to a multiple of ``round_to``) and says so in its note."""
    if not g.removed:
        return
    removed = set(g.removed)
    values = s.tolist()
    distinct = {id(m.channels): m.channels for m in [*g.members, *g.params]}  # members share tuples
    sets = [chans for chans in map(set, distinct.values()) if len(chans) < g.size]
    restored = []
    for channels in sets:
        if channels <= removed:
            best = max(channels, key=lambda c: (values[c], -c))
            removed.discard(best)
            restored.append(best)
    extra = 0
    pinned, kept_back = set(g.pinned), set(restored)
    for _ in restored:
        # c may go unless some member would then lose all of its channels: one whose only
        # channel not removed yet is c
        last = {next(iter(missing)) for missing in (m - removed for m in sets) if len(missing) == 1}
        spare = [c for c in range(g.size) if c not in removed and c not in pinned and c not in kept_back
                 and c not in last]
        if spare:
            removed.add(min(spare, key=lambda c: (values[c], c)))
        else:
            extra += 1
    while extra and round_to and (g.size - len(removed)) % round_to and removed:
        removed.discard(max(removed, key=lambda c: (values[c], -c)))
        extra += 1
    if extra:
        note = f"kept {extra} more so that no tensor or weight is left empty"
        g.note = f"{g.note}; {note}" if g.note else note
    g.removed = tuple(sorted(removed))
