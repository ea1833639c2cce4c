"""Selection for groups whose channels are whole attention heads (kinds ``head``, ``kv-group``,
``query-heads``): ``round_to`` on the channel width, and even removal across kv groups.

One channel of such a group is a head: ``head_dim`` rows of each q/k/v projection (``n_rep x
head_dim`` of q for a kv group) and as many columns of the output projection. ``round_to`` (a
channel multiple, e.g. 8 or 64 for tensor cores) is therefore met on those widths, not on the head
count: a group keeps the fewest heads ``k >= asked`` whose every weight width ``k x w`` is a multiple
of ``round_to``, i.e. a multiple of ``step = lcm_w(round_to / gcd(round_to, w))`` heads. Where the
group has no such count at or above the request (``round_to`` coarser than the group allows), it
keeps the nearest whole number of heads at or above the rounded channel width and says so in its
note; the model still runs, only the multiple is not met.

A ``query-heads`` group (grouped-query attention pruned within kv groups) also has ``blocks``,
the query heads of each kv group: each block keeps the same number, the best-scoring ones.

Example:
    >>> from fxprune.coupling.groups import Group, ParamMember
    >>> heads = tuple(h for h in range(6) for _ in range(16))   # 6 heads of 16 channels
    >>> g = Group(0, 6, [], [ParamMember("q.weight", 0, "producer", "q", tuple(range(96)), heads)], {}, {}, kind="head")
    >>> kept_heads(g, 3, 64)
    (4, 'round_to=64: 4 heads x 16 = 64 channels')
    >>> kept_heads(g, 3, 8)    # 16-channel heads already satisfy 8
    (3, '')
    >>> kept_heads(g, 5, 64)[0]   # 8 heads would be needed: the nearest valid count is the whole group
    6
"""
from __future__ import annotations

import math
from collections import Counter

import torch

from .group_kinds import HEAD_KINDS


def is_head_group(g) -> bool:
    """True for groups whose channels are attention heads.

    Example:
        >>> from fxprune.coupling.groups import Group
        >>> is_head_group(Group(0, 4, [], [], {}, {}, kind="kv-group")), is_head_group(Group(0, 4, [], [], {}, {}))
        (True, False)
    """
    return getattr(g, "kind", "channel") in HEAD_KINDS


def head_widths(g) -> list[int]:
    """Channels each head takes in every producer and consumer weight dim of ``g`` (distinct,
    ascending): ``[head_dim, n_rep * head_dim]`` for a kv group.

    Example:
        >>> from fxprune.coupling.groups import Group, ParamMember
        >>> k = ParamMember("k.weight", 0, "producer", "k", tuple(range(8)), (0,) * 4 + (1,) * 4)
        >>> head_widths(Group(0, 2, [], [k], {}, {}, kind="kv-group"))
        [4]
    """
    out = set()
    for p in g.params:
        if p.role not in ("producer", "consumer"):
            continue
        counts = set(Counter(p.channels).values())
        if len(counts) == 1:
            out.add(counts.pop())
    return sorted(out)


def _step(widths: list[int], round_to: int) -> int:
    step = 1
    for w in widths:
        need = round_to // math.gcd(round_to, w)
        step = step * need // math.gcd(step, need)
    return step


def head_step(g, round_to: int | None) -> int:
    """The head counts ``g`` may keep are the multiples of this: every weight width a multiple of
    ``round_to`` (1 without it) and, with ``blocks``, as many heads in every block.

    Example:
        >>> head_step(_example(6, 12), 8), head_step(_example(6, 16), 8), head_step(_example(6, 16), None)
        (2, 1, 1)
    """
    widths = head_widths(g)
    step = _step(widths, round_to) if round_to and round_to > 1 and widths else 1
    nb = len(g.blocks) if getattr(g, "blocks", ()) else 1
    return step * nb // math.gcd(step, nb)


def _example(heads: int, head_dim: int):
    from .coupling.groups import Group, ParamMember
    rows = ParamMember("q.weight", 0, "producer", "q", tuple(range(heads * head_dim)),
                       tuple(h for h in range(heads) for _ in range(head_dim)))
    return Group(0, heads, [], [rows], {}, {}, kind="head")


def kept_heads(g, asked: int, round_to: int | None) -> tuple[int, str]:
    """(heads kept, why not ``asked``: "" when no clamp) for a head group asked to keep ``asked``
    heads; ``round_to`` applies to the channel widths, ``blocks`` make the count a multiple of
    their number. Never more than the group has, never a fraction of a head.

    Example:
        >>> from fxprune.coupling.groups import Group, ParamMember
        >>> heads = tuple(h for h in range(8) for _ in range(12))
        >>> q = ParamMember("q.weight", 0, "producer", "q", tuple(range(96)), heads)
        >>> g = Group(0, 8, [], [q], {}, {}, kind="query-heads", blocks=((0, 1, 2, 3), (4, 5, 6, 7)))
        >>> kept_heads(g, 3, None)
        (4, 'the same number of query heads in each of 2 kv groups')
        >>> kept_heads(g, 3, 32)   # 12-channel heads: a multiple of 8 heads = 96 channels
        (8, 'round_to=32: 8 heads x 12 = 96 channels; the same number of query heads in each of 2 kv groups')
    """
    nb = len(g.blocks) if getattr(g, "blocks", ()) else 1
    widths = head_widths(g)
    unit = widths[0] if widths else 1
    per_width = _step(widths, round_to) if round_to and round_to > 1 and widths else 1
    step = head_step(g, round_to)
    even = f"the same number of query heads in each of {nb} kv groups" if nb > 1 else ""
    k = math.ceil(asked / step) * step
    if k <= g.size:
        why = [f"round_to={round_to}: {k} heads x {unit} = {k * unit} channels"] if per_width > 1 and k != asked else []
        why += [even] if even and asked % nb else []
        return k, "; ".join(why)
    target = math.ceil(asked * unit / round_to) * round_to
    k = min(g.size, max(asked, math.ceil(target / unit)))
    k = min(g.size, math.ceil(k / nb) * nb)
    why = (f"round_to={round_to} not met: it needs a multiple of {per_width} heads of {unit} channels, and this "
           f"group of {g.size} has none at or above {asked}; kept the nearest whole number of heads at or above "
           f"{target} channels ({k} x {unit} = {k * unit})")
    return k, why + (f"; {even}" if even else "")


def lowest_in_blocks(g, s: torch.Tensor, keep: int) -> tuple[int, ...]:
    """Removed channels when each of ``g.blocks`` keeps ``keep // len(blocks)`` (at least its
    pinned channels): the lowest-scoring free ones of each block go; ties by channel index.

    Example:
        >>> from fxprune.coupling.groups import Group
        >>> g = Group(0, 4, [], [], {}, {}, kind="query-heads", blocks=((0, 1), (2, 3)))
        >>> lowest_in_blocks(g, torch.tensor([1., 0., 2., 3.]), 2)
        (1, 2)
    """
    values = s.tolist()
    per = keep // len(g.blocks)
    out = []
    for block in g.blocks:
        free = sorted((c for c in block if c not in g.pinned), key=lambda c: (values[c], c))
        out += free[: max(len(block) - max(per, len(block) - len(free)), 0)]
    return tuple(sorted(out))


def block_floor(g) -> int:
    """The fewest channels a group with ``blocks`` can keep given its pinned channels (every
    block keeps as many as the block with the most pinned ones), else ``len(g.pinned)``.

    Example:
        >>> from fxprune.coupling.groups import Group
        >>> block_floor(Group(0, 4, [], [], {1: "output"}, {}, kind="query-heads", blocks=((0, 1), (2, 3))))
        2
    """
    if not getattr(g, "blocks", ()):
        return len(g.pinned)
    return len(g.blocks) * max(sum(c in g.pinned for c in b) for b in g.blocks)


def next_cut(g, gone: set, s: torch.Tensor, round_to: int | None, floor: int) -> list[int] | None:
    """The channels a budget top-up removes next from a head group (to the next smaller valid
    head count, spread evenly over ``blocks``), or None when it cannot shrink further.

    Example:
        >>> from fxprune.coupling.groups import Group
        >>> g = Group(0, 4, [], [], {}, {}, kind="query-heads", blocks=((0, 1), (2, 3)))
        >>> next_cut(g, set(), torch.tensor([1., 0., 2., 3.]), None, 1)
        [1, 2]
    """
    now = g.size - len(gone)
    step = head_step(g, round_to)
    for k in range(now - 1, max(floor, 1) - 1, -1):
        if k % step == 0:
            break
    else:
        return None
    values = s.tolist()
    order = lambda c: (values[c], c)
    if getattr(g, "blocks", ()):
        per, out = k // len(g.blocks), []
        for block in g.blocks:
            free = sorted((c for c in block if c not in gone and c not in g.pinned), key=order)
            need = len(block) - sum(c in gone for c in block) - per
            if need > len(free):
                return None
            out += free[:max(need, 0)]
        return sorted(out)
    free = sorted((c for c in range(g.size) if c not in gone and c not in g.pinned), key=order)
    return free[: now - k] if len(free) >= now - k else None


def even_blocks(g, s: torch.Tensor) -> str:
    """Make every block keep the same number after later adjustments (channels a member needs):
    short blocks get back their best removed channels. Returns a note ("" when nothing changed).

    Example:
        >>> from fxprune.coupling.groups import Group
        >>> g = Group(0, 4, [], [], {}, {}, removed=(0, 1, 2), kind="query-heads", blocks=((0, 1), (2, 3)))
        >>> even_blocks(g, torch.tensor([1., 0., 2., 3.])), g.removed
        ('kept 1 more so that every kv group keeps as many query heads as the others', (1, 2))
    """
    if not getattr(g, "blocks", ()) or not g.removed:
        return ""
    removed = set(g.removed)
    values = s.tolist()
    per = max(sum(c not in removed for c in b) for b in g.blocks)
    restored = 0
    for block in g.blocks:
        gone = sorted((c for c in block if c in removed), key=lambda c: (-values[c], c))
        for c in gone[: per - (len(block) - len(gone))]:
            removed.discard(c)
            restored += 1
    if not restored:
        return ""
    g.removed = tuple(sorted(removed))
    return f"kept {restored} more so that every kv group keeps as many query heads as the others"
