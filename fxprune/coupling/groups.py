"""Groups: connected channel spaces that must lose the same channels, in their own index space."""
from __future__ import annotations

import dataclasses
from typing import Callable

import networkx as nx

from .state import Analysis, ChannelInfo


@dataclasses.dataclass(frozen=True)
class Member:
    """A node output inside a group: tensor positions along ``dim`` and the group channel of each."""

    node: str
    dim: int
    positions: tuple[int, ...]
    channels: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ParamMember:
    """A parameter dim inside a group (``role``: producer, consumer or passenger)."""

    target: str
    dim: int
    role: str
    owner: str
    positions: tuple[int, ...]
    channels: tuple[int, ...]


@dataclasses.dataclass
class Group:
    """Coupled channels that are removed together.

    ``removed`` lists the removed channels in the group's own index space (0..size-1);
    ``pinned`` maps channels that can never go to the reason; ``exact`` is False when a
    channel-mixing op (e.g. LayerNorm over the channel dim) makes removal an approximation.

    Example:
        >>> g = Group(0, 4, [], [], {}, {})
        >>> g.kept, g.exact, g.blocked
        (4, True, False)
    """

    id: int
    size: int
    members: list[Member]
    params: list[ParamMember]
    pinned: dict[int, str]
    inexact: dict[int, str]
    removed: tuple[int, ...] = ()
    note: str = ""

    @property
    def exact(self) -> bool:
        return not self.inexact

    @property
    def blocked(self) -> bool:
        return len(self.pinned) >= self.size

    @property
    def kept(self) -> int:
        return self.size - len(self.removed)

    def of_role(self, role: str) -> list[ParamMember]:
        return [p for p in self.params if p.role == role]

    @property
    def producers(self) -> list[ParamMember]:
        return self.of_role("producer")

    @property
    def consumers(self) -> list[ParamMember]:
        return self.of_role("consumer")

    @property
    def passengers(self) -> list[ParamMember]:
        return self.of_role("passenger")

    @property
    def name(self) -> str:
        owners = list(dict.fromkeys(p.owner for p in self.producers))
        head = ", ".join(owners[:3]) + (f" +{len(owners) - 3}" if len(owners) > 3 else "")
        return head or f"group{self.id}"


def channel_index(an: Analysis) -> dict[int, tuple[int, int]]:
    """unit root -> (group id, channel index), numbered in atom creation order (deterministic)."""
    component = {}
    for cid, comp in enumerate(sorted(nx.connected_components(an.units.graph),
                                      key=lambda c: min(an.units.atom_by_key[k].start for k in c))):
        for key in comp:
            component[key] = cid
    counters: dict[int, int] = {}
    index: dict[int, tuple[int, int]] = {}
    roots = an.units.roots()
    for atom in an.units.atoms:
        gid = component[atom.key]
        for u in range(atom.start, atom.start + atom.size):
            r = roots[u]
            if r not in index:
                index[r] = (gid, counters.get(gid, 0))
                counters[gid] = counters.get(gid, 0) + 1
    return index


def _split_by_group(units, unit_index: list, memo: dict | None = None) -> dict[int, tuple[list, list]]:
    """{group: (positions, channels)} of a units tuple (``unit_index[u]`` = (group, channel));
    memoised by identity, since per-channel ops hand the same tuple from node to node."""
    if memo is not None and id(units) in memo:
        return memo[id(units)][1]
    entries = list(map(unit_index.__getitem__, units))
    gids = {gid for gid, _ in entries}
    if len(gids) == 1:  # the common case: one tensor, one group
        out = {gids.pop(): (list(range(len(entries))), [ch for _, ch in entries])}
        if memo is not None:
            memo[id(units)] = (units, out)
        return out
    out: dict[int, tuple[list, list]] = {}
    for pos, (gid, ch) in enumerate(entries):
        entry = out.setdefault(gid, ([], []))
        entry[0].append(pos)
        entry[1].append(ch)
    if memo is not None:
        memo[id(units)] = (units, out)  # keep the tuple alive so its id stays unique
    return out


def build_groups(an: Analysis, ignored: Callable[[str], bool]) -> tuple[list[Group], dict, dict]:
    """Groups that own at least one producer weight, in deterministic order.

    Returns (groups, component id -> group index, unit root -> (component id, channel)).
    """
    for ps in an.params.values():
        if ps.role != "consumer" and ignored(ps.owner):
            an.units.pin(ps.units, f"{ps.owner} is in policy.ignore")
    index = channel_index(an)
    unit_index = [index[r] for r in an.units.roots()]
    memo: dict = {}
    params: dict[int, list[ParamMember]] = {}
    for ps in an.params.values():
        for gid, (pos, ch) in _split_by_group(ps.units, unit_index, memo).items():
            params.setdefault(gid, []).append(
                ParamMember(ps.target, ps.dim, ps.role, ps.owner, tuple(pos), tuple(ch)))
    wanted = {gid for gid, ps in params.items() if any(p.role == "producer" for p in ps)}
    sizes: dict[int, int] = {}
    for gid, _ch in index.values():
        sizes[gid] = sizes.get(gid, 0) + 1
    members: dict[int, list[Member]] = {gid: [] for gid in wanted}
    for name, info in an.info.items():
        if isinstance(info, ChannelInfo):
            for gid, (pos, ch) in _split_by_group(info.units, unit_index, memo).items():
                if gid in wanted:
                    members[gid].append(Member(name, info.dim, tuple(pos), tuple(ch)))
    pins: dict[int, dict[int, str]] = {}
    for root, why in an.units.resolved(an.units.pins).items():
        gid, ch = index[root]
        pins.setdefault(gid, {})[ch] = why
    inexact: dict[int, dict[int, str]] = {}
    for root, why in an.units.resolved(an.units.inexact).items():
        gid, ch = index[root]
        inexact.setdefault(gid, {})[ch] = why
    ordered = sorted(wanted)
    return [Group(i, sizes[gid], members[gid], params[gid], pins.get(gid, {}), inexact.get(gid, {}))
            for i, gid in enumerate(ordered)], {gid: i for i, gid in enumerate(ordered)}, index
