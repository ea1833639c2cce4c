"""Channel units: a union-find over single channels, plus the networkx graph of channel spaces.

Every channel that an op creates (a conv's output row, a model input's channel, ...) is one
*unit*. Units created together form an *atom* (a channel space such as ``("out", "conv1", 1)``).
Coupling merges units (``union``); the atoms they belong to become connected in a networkx
graph whose edges carry ``kind=`` and ``reason=``. Connected atoms form the pruning groups.

Unions are recorded and resolved together, on the first query after them, by label
propagation with pointer jumping over all recorded pairs at once (torch gathers and scatters
instead of one Python step per channel). A unit's root is the smallest unit of its set, as a
union-by-minimum union-find would give, so the numbering of groups and channels does not
depend on how the sets were merged.
"""
from __future__ import annotations

import array
import dataclasses
from typing import Hashable, Sequence

import networkx as nx
import torch


@dataclasses.dataclass
class Atom:
    """A channel space whose channels were created together (``key`` names it in the graph)."""

    key: Hashable
    kind: str          # "producer", "input", "opaque", "param"
    start: int
    size: int


def long_tensor(values: Sequence[int]) -> torch.Tensor:
    """A long tensor of Python ints, 3-4x faster than ``torch.tensor`` on long lists.

    Example:
        >>> long_tensor([3, 1, 2]).tolist()
        [3, 1, 2]
    """
    if not len(values):
        return torch.empty(0, dtype=torch.long)
    return torch.frombuffer(array.array("q", values), dtype=torch.long)


def _resolve(labels: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Roots after merging ``a[i]`` with ``b[i]``, given ``labels`` (every unit's current root,
    ``labels[u] <= u``): hook each pair's larger root under the smaller, then jump pointers
    until every label is a root, until all pairs agree. Labels only decrease, so this ends;
    each component ends labelled by its smallest unit."""
    while True:
        la, lb = labels[a], labels[b]
        differ = la != lb
        if not bool(differ.any()):
            return labels
        la, lb = la[differ], lb[differ]
        low = torch.minimum(la, lb)
        labels = labels.scatter_reduce(0, torch.cat([la, lb]), torch.cat([low, low]), "amin")
        while True:
            jumped = labels[labels]
            if torch.equal(jumped, labels):
                break
            labels = jumped


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
        self._parent: list[int] | None = []  # None: read it from _labels
        self.atom_index: list[int] = []
        self.atoms: list[Atom] = []
        self.atom_by_key: dict[Hashable, Atom] = {}
        self.graph = nx.Graph()
        self.pins: dict[int, str] = {}
        self.inexact: dict[int, str] = {}
        self._pending: list[tuple[Sequence[int], Sequence[int]]] = []
        self._labels: torch.Tensor | None = None

    def new_atom(self, key: Hashable, size: int, kind: str) -> tuple[int, ...]:
        if key in self.atom_by_key:
            key = (key, len(self.atoms))
        parent = self.parent
        start = len(parent)
        atom = Atom(key, kind, start, size)
        self.atoms.append(atom)
        self.atom_by_key[key] = atom
        parent.extend(range(start, start + size))
        self.atom_index.extend([len(self.atoms) - 1] * size)
        self.graph.add_node(key, kind=kind, size=size)
        self._labels = None
        return tuple(range(start, start + size))

    def _flush(self) -> None:
        """Resolve the recorded unions into ``parent`` (every entry then a root)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        a, b = [], []
        for x, y in pending:
            a.extend(x)
            b.extend(y)
        self._labels = _resolve(self.root_tensor(flush=False), long_tensor(a), long_tensor(b))
        self._parent = None  # the list form is made when asked for

    def find(self, u: int) -> int:
        self._flush()
        return self.parent[u]  # flushed entries are roots; units created since are their own

    def roots(self) -> list[int]:
        """The root of every unit, by unit id (the smallest unit of its set).

        Example:
            >>> t = UnitTable()
            >>> a, b = t.new_atom("a", 2, "producer"), t.new_atom("b", 2, "producer")
            >>> t.union(a, b, "identity", "add")
            >>> t.roots()
            [0, 1, 0, 1]
        """
        self._flush()
        return self.parent

    @property
    def parent(self) -> list[int]:
        """Every unit's parent (after a flush: its root), as a list."""
        if self._parent is None:
            self._parent = self._labels.tolist()
        return self._parent

    def root_tensor(self, flush: bool = True) -> torch.Tensor:
        """``roots()`` as a long tensor.

        Example:
            >>> t = UnitTable()
            >>> a, b = t.new_atom("a", 2, "producer"), t.new_atom("b", 2, "producer")
            >>> t.union(a, b, "identity", "add")
            >>> t.root_tensor().tolist()
            [0, 1, 0, 1]
        """
        if flush:
            self._flush()
        if self._labels is None:
            self._labels = long_tensor(self._parent)
        return self._labels

    def atom_of(self, u: int) -> Atom:
        return self.atoms[self.atom_index[u]]

    def _atoms_of(self, units: Sequence[int]) -> list[int]:
        """Atom of each unit; one entry when all lie in one atom (atoms are unit ranges)."""
        index = self.atom_index
        first = index[min(units)]
        if first == index[max(units)]:
            return [first]
        return list(map(index.__getitem__, units))

    def union(self, a: Sequence[int], b: Sequence[int], kind: str, reason: str) -> None:
        """Merge ``a[i]`` with ``b[i]`` for every i and record why in the graph."""
        if len(a) != len(b):
            raise ValueError(f"cannot couple channel spaces of sizes {len(a)} and {len(b)}: {reason}")
        if not len(a):
            return
        self._pending.append((a, b))
        atoms_a, atoms_b = self._atoms_of(a), self._atoms_of(b)
        if len(atoms_a) == 1 and len(atoms_b) == 1:
            pairs = {(atoms_a[0], atoms_b[0])}
        else:
            pairs = set(zip(atoms_a * len(a) if len(atoms_a) == 1 else atoms_a,
                            atoms_b * len(b) if len(atoms_b) == 1 else atoms_b))
        linked = {(min(i, j), max(i, j)) for i, j in pairs if i != j}
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
        if not marks:
            return {}
        roots = self.root_tensor()[long_tensor(list(marks))].tolist()
        out: dict[int, str] = {}
        for root, why in zip(roots, marks.values()):
            out.setdefault(root, why)
        return out
