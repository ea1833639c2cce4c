"""The batched union-find (label propagation over all recorded unions at once) gives every unit
the same root as a plain union-by-minimum union-find, whatever the order of unions and queries."""
import os

from hypothesis import given, settings, strategies as st

from fxprune.coupling.units import UnitTable

EXAMPLES = int(os.environ.get("FXPRUNE_HYPOTHESIS_EXAMPLES", "25")) * 4


def _reference_roots(n: int, pairs: list[tuple[int, int]]) -> list[int]:
    parent = list(range(n))

    def find(u: int) -> int:
        while parent[u] != u:
            u = parent[u]
        return u

    for x, y in pairs:
        rx, ry = find(x), find(y)
        parent[max(rx, ry)] = min(rx, ry)
    return [find(u) for u in range(n)]


@st.composite
def _program(draw):
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=8))
    steps = []
    for _ in range(draw(st.integers(0, 12))):
        size = draw(st.integers(1, 6))
        a = draw(st.lists(st.integers(0, sum(sizes) - 1), min_size=size, max_size=size))
        b = draw(st.lists(st.integers(0, sum(sizes) - 1), min_size=size, max_size=size))
        steps.append((tuple(a), tuple(b), draw(st.booleans())))  # (a, b, query roots afterwards)
    return sizes, steps


@settings(max_examples=EXAMPLES, deadline=None)
@given(_program())
def test_batched_unions_equal_a_plain_union_find(program):
    sizes, steps = program
    table = UnitTable()
    for i, size in enumerate(sizes):
        table.new_atom(("atom", i), size, "producer")
    n, pairs = sum(sizes), []
    for a, b, query in steps:
        table.union(a, b, "identity", "test")
        pairs.extend(zip(a, b))
        if query:
            assert table.roots() == _reference_roots(n, pairs)
            assert table.find(a[-1]) == table.find(b[-1])
    assert table.roots() == _reference_roots(n, pairs)
    assert table.root_tensor().tolist() == table.roots()
    linked = {frozenset(e) for e in table.graph.edges}
    atom = [i for i, size in enumerate(sizes) for _ in range(size)]
    assert linked == {frozenset({("atom", atom[x]), ("atom", atom[y])}) for x, y in pairs if atom[x] != atom[y]}
