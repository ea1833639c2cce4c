"""Channel units: a union-find over single channels, plus the networkx graph of channel spaces.

Every channel that an op creates (a conv's output row, a model input's channel, ...) is one
*unit*. Units created together form an *atom* (a channel space such as ``("out", "conv1", 1)``).
Coupling merges units (``union``); the atoms they belong to become connected in a networkx
graph whose edges carry ``kind=`` and ``reason=``. Connected atoms form the pruning groups.
"""
from __future__ import annotations

import dataclasses
from typing import Hashable, Sequence

import networkx as nx


@dataclasses.dataclass
class Atom:
    """A channel space whose channels were created together (``key`` names it in the graph)."""

    key: Hashable
    kind: str          # "producer", "input", "opaque", "param"
    start: int
    size: int


class UnitTable:
    """Union-find over channel units with per-unit pins (never remove) and inexact marks.

    Example:
        >>> t = UnitTable()
        >>> a = t.new_atom(("out", "a", 1), 3, "producer")
        >>> b = t.new_atom(("out", "b", 1), 3, "producer")
        >>> t.union(a, b, "identity", "residual add at node 'add'")
        >>> t.find(b[2]) == t.find(a[2])
        True
        >>> t.graph.edges[("out", "a", 1), ("out", "b", 1)]["kind"]
        'identity'
    """

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.atom_index: list[int] = []
        self.atoms: list[Atom] = []
        self.atom_by_key: dict[Hashable, Atom] = {}
        self.graph = nx.Graph()
        self.pins: dict[int, str] = {}
        self.inexact: dict[int, str] = {}
        self._roots: list[int] | None = None

    def new_atom(self, key: Hashable, size: int, kind: str) -> tuple[int, ...]:
        if key in self.atom_by_key:
            key = (key, len(self.atoms))
        self._roots = None
        start = len(self.parent)
        atom = Atom(key, kind, start, size)
        self.atoms.append(atom)
        self.atom_by_key[key] = atom
        self.parent.extend(range(start, start + size))
        self.atom_index.extend([len(self.atoms) - 1] * size)
        self.graph.add_node(key, kind=kind, size=size)
        return tuple(range(start, start + size))

    def find(self, u: int) -> int:
        parent = self.parent
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    def roots(self) -> list[int]:
        """The root of every unit, by unit id (cached until the next ``union`` or ``new_atom``).

        Example:
            >>> t = UnitTable()
            >>> a, b = t.new_atom("a", 2, "producer"), t.new_atom("b", 2, "producer")
            >>> t.union(a, b, "identity", "add")
            >>> t.roots()
            [0, 1, 0, 1]
        """
        if self._roots is None:
            find = self.find
            self._roots = [find(u) for u in range(len(self.parent))]
        return self._roots

    def atom_of(self, u: int) -> Atom:
        return self.atoms[self.atom_index[u]]

    def union(self, a: Sequence[int], b: Sequence[int], kind: str, reason: str) -> None:
        """Merge ``a[i]`` with ``b[i]`` for every i and record why in the graph."""
        if len(a) != len(b):
            raise ValueError(f"cannot couple channel spaces of sizes {len(a)} and {len(b)}: {reason}")
        self._roots = None
        parent, find, atom_index = self.parent, self.find, self.atom_index
        pairs = set(zip(map(atom_index.__getitem__, a), map(atom_index.__getitem__, b)))
        linked = {(min(i, j), max(i, j)) for i, j in pairs if i != j}
        for x, y in zip(a, b):
            rx = x if parent[x] == x else find(x)
            ry = y if parent[y] == y else find(y)
            if rx < ry:
                parent[ry] = rx
            elif ry < rx:
                parent[rx] = ry
        for i, j in sorted(linked):
            ki, kj = self.atoms[i].key, self.atoms[j].key
            if not self.graph.has_edge(ki, kj):
                self.graph.add_edge(ki, kj, kind=kind, reason=reason)

    def pin(self, units: Sequence[int], reason: str) -> None:
        """Mark units as never removable (first reason wins)."""
        for u in units:
            self.pins.setdefault(u, reason)

    def mark_inexact(self, units: Sequence[int], reason: str) -> None:
        """Mark units whose removal changes other channels' values (e.g. LayerNorm statistics)."""
        for u in units:
            self.inexact.setdefault(u, reason)

    def resolved(self, marks: dict[int, str]) -> dict[int, str]:
        """Marks re-keyed by their unit's root."""
        out: dict[int, str] = {}
        for u, why in marks.items():
            out.setdefault(self.find(u), why)
        return out
