"""Groups: connected channel spaces that must lose the same channels, in their own index space."""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Mapping
from typing import Callable, NamedTuple

import networkx as nx
import torch

from ..group_kinds import classify
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
    channel-mixing op (e.g. LayerNorm over the channel dim) makes removal an approximation;
    ``kind`` says what structure a channel is: ``"channel"``, ``"head"``, ``"kv-group"``,
    ``"hidden"``, ``"mlp"`` or ``"query-heads"`` (set by :func:`build_groups`, rules in
    ``fxprune.group_kinds``). ``blocks``, where set, are channel sets that must each lose the same
    number of channels (the query heads of each kv group, kind ``"query-heads"``).

    Example:
        >>> g = Group(0, 4, [], [], {}, {})
        >>> g.kept, g.exact, g.blocked, g.kind
        (4, True, False, 'channel')
    """

    id: int
    size: int
    members: list[Member]
    params: list[ParamMember]
    pinned: dict[int, str]
    inexact: dict[int, str]
    removed: tuple[int, ...] = ()
    note: str = ""
    kind: str = "channel"
    blocks: tuple[tuple[int, ...], ...] = ()

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


class ChannelOfRoot(Mapping):
    """unit root -> (component, channel), read from the per-unit tables (no dict of every root).

    Example:
        >>> m = ChannelOfRoot([0, 0, 1, 0], [0, 1, 0, 1], {0: [0, 1], 1: [2]})
        >>> m[2], 3 in m, list(m), len(m)
        ((1, 0), False, [0, 1, 2], 3)
    """

    def __init__(self, component: list[int], channel: list[int], roots: dict[int, list[int]]):
        self._component, self._channel, self._roots = component, channel, roots

    def __getitem__(self, root: int) -> tuple[int, int]:
        if not isinstance(root, int) or not 0 <= root < len(self._component):
            raise KeyError(root)
        comp, ch = self._component[root], self._channel[root]
        roots = self._roots.get(comp, ())
        if ch >= len(roots) or roots[ch] != root:
            raise KeyError(root)
        return comp, ch

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(itertools.chain.from_iterable(self._roots.values())))

    def __len__(self) -> int:
        return sum(map(len, self._roots.values()))

    def root(self, component: int, channel: int) -> int:
        """The root unit of ``channel`` in ``component`` (the inverse lookup).

        Example:
            >>> ChannelOfRoot([0, 0, 1, 0], [0, 1, 0, 1], {0: [0, 1], 1: [2]}).root(1, 0)
            2
        """
        return self._roots[component][channel]


class _Tables(NamedTuple):
    index: ChannelOfRoot               # unit root -> (component, channel)
    component: list[int]               # by unit
    channel: list[int]                 # by unit
    sizes: dict[int, int]              # component -> channels


def _channel_tables(an: Analysis) -> _Tables:
    """Component and channel of every unit root and of every unit, and component sizes.

    Components are numbered by their first atom; channels by root within a component (a root
    is the smallest unit of its set, so this is the order in which the atoms first show them).
    """
    units = an.units
    atom_position = {atom.key: i for i, atom in enumerate(units.atoms)}
    comp_of_atom = [0] * len(units.atoms)
    for cid, comp in enumerate(sorted(nx.connected_components(units.graph),
                                      key=lambda c: min(units.atom_by_key[k].start for k in c))):
        for key in comp:
            comp_of_atom[atom_position[key]] = cid
    labels = units.root_tensor()
    if not len(labels):
        return _Tables(ChannelOfRoot([], [], {}), [], [], {})
    sizes = torch.tensor([atom.size for atom in units.atoms], dtype=torch.long)
    comp_of_unit = torch.repeat_interleave(torch.tensor(comp_of_atom, dtype=torch.long), sizes)
    roots = (labels == torch.arange(len(labels))).nonzero().squeeze(1)
    comp = comp_of_unit[roots]
    comp_sorted, order = torch.sort(comp, stable=True)  # roots stay ascending within a component
    counts = torch.bincount(comp_sorted)
    first = torch.cumsum(counts, 0) - counts
    channel = torch.empty_like(roots)
    channel[order] = torch.arange(len(roots)) - first[comp_sorted]
    comp_of_root = torch.zeros_like(labels)
    channel_of_root = torch.zeros_like(labels)
    comp_of_root[roots], channel_of_root[roots] = comp, channel
    sizes = dict(enumerate(counts.tolist()))
    by_component = dict(zip(sizes, (part.tolist() for part in torch.split(roots[order], counts.tolist()))))
    component, channel_of_unit = comp_of_root[labels].tolist(), channel_of_root[labels].tolist()
    index = ChannelOfRoot(component, channel_of_unit, by_component)
    return _Tables(index, component, channel_of_unit, sizes)


def channel_index(an: Analysis) -> ChannelOfRoot:
    """unit root -> (group id, channel index), numbered in atom creation order (deterministic).

    Example:
        >>> import torch
        >>> from fxprune.shapes import propagate
        >>> from fxprune.coupling.build import analyse
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.Conv2d(2, 2, 1)))
        >>> _ = propagate(gm, (torch.randn(1, 3, 4, 4),))
        >>> sorted(channel_index(analyse(gm)).values())[:3]
        [(0, 0), (0, 1), (0, 2)]
    """
    return _channel_tables(an).index


def _split_by_group(units, tables: _Tables, memo: dict | None = None) -> dict[int, tuple[tuple, tuple]]:
    """{component: (positions, channels)} of a units tuple; memoised by identity, since
    per-channel ops hand the same tuple from node to node."""
    if memo is not None and id(units) in memo:
        return memo[id(units)][1]
    comps = list(map(tables.component.__getitem__, units))
    channels = tuple(map(tables.channel.__getitem__, units))
    found = set(comps)
    if len(found) == 1:  # the common case: one tensor, one group
        out = {found.pop(): (tuple(range(len(units))), channels)}
    else:
        lists: dict[int, tuple[list, list]] = {}
        for pos, (gid, ch) in enumerate(zip(comps, channels)):
            entry = lists.setdefault(gid, ([], []))
            entry[0].append(pos)
            entry[1].append(ch)
        out = {gid: (tuple(pos), tuple(ch)) for gid, (pos, ch) in lists.items()}
    if memo is not None:
        memo[id(units)] = (units, out)  # keep the tuple alive so its id stays unique
    return out


def build_groups(an: Analysis, ignored: Callable[[str], bool]) -> tuple[list[Group], dict, dict]:
    """Groups that own at least one producer weight, in deterministic order, each with its
    ``kind`` (:func:`fxprune.group_kinds.classify`).

    Returns (groups, component id -> group index, unit root -> (component id, channel)).
    """
    for ps in an.params.values():
        if ps.role != "consumer" and ignored(ps.owner):
            an.units.pin(ps.units, f"{ps.owner} is in policy.ignore")
    tables = _channel_tables(an)
    index, sizes = tables.index, tables.sizes
    memo: dict = {}
    params: dict[int, list[ParamMember]] = {}
    for ps in an.params.values():
        for gid, (pos, ch) in _split_by_group(ps.units, tables, memo).items():
            params.setdefault(gid, []).append(ParamMember(ps.target, ps.dim, ps.role, ps.owner, pos, ch))
    wanted = {gid for gid, ps in params.items() if any(p.role == "producer" for p in ps)}
    members: dict[int, list[Member]] = {gid: [] for gid in wanted}
    for name, info in an.info.items():
        if isinstance(info, ChannelInfo):
            for gid, (pos, ch) in _split_by_group(info.units, tables, memo).items():
                if gid in wanted:
                    members[gid].append(Member(name, info.dim, pos, ch))
    component, channel = tables.component, tables.channel  # a root's entries are its (group, channel)
    pins: dict[int, dict[int, str]] = {}
    for root, why in an.units.resolved(an.units.pins).items():
        pins.setdefault(component[root], {})[channel[root]] = why
    inexact: dict[int, dict[int, str]] = {}
    for root, why in an.units.resolved(an.units.inexact).items():
        inexact.setdefault(component[root], {})[channel[root]] = why
    ordered = sorted(wanted)
    groups = [Group(i, sizes[gid], members[gid], params[gid], pins.get(gid, {}), inexact.get(gid, {}))
              for i, gid in enumerate(ordered)]
    group_of_component = {gid: i for i, gid in enumerate(ordered)}
    kinds = classify(an, groups, lambda u: group_of_component.get(component[u]) if 0 <= u < len(component) else None)
    for g in groups:
        g.kind = kinds[g.id]
    return groups, group_of_component, index
