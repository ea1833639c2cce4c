"""The import graph of fxprune: no module imports one that imports it back.

Every ``import``/``from ... import`` in every module is read with ``ast`` (function-level, lazy
imports included, since they only hide a cycle until the function runs). An edge goes to the
module named: ``from .bench.latency import measure`` is an edge to ``fxprune.bench.latency``;
``from . import importance`` to ``fxprune.importance``; ``from .bench import measure`` to
``fxprune.bench`` (the package's ``__init__``). Package ``__init__`` files run before their
submodules, but that is not counted as an edge: a package re-exporting its submodules would
otherwise be in a cycle with each of them.
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

import fxprune

ROOT = Path(fxprune.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imported(node: ast.AST, name: str, is_package: bool, modules: dict) -> list[str]:
    """The fxprune modules an import statement of module ``name`` names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        package = name.split(".") if is_package else name.split(".")[:-1]
        base = package[:len(package) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    found = []
    for alias in node.names:
        submodule = f"{source}.{alias.name}"
        if submodule in modules:
            found.append(submodule)
        elif source in modules:
            found.append(source)
    return found


def import_graph() -> nx.DiGraph:
    """``module -> module it imports`` over every module of the fxprune package."""
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            for target in _imported(node, name, path.name == "__init__.py", modules):
                if target != name:
                    graph.add_edge(name, target, line=node.lineno)
    return graph


def _describe(graph: nx.DiGraph, cycle: list[str]) -> str:
    steps = zip(cycle, cycle[1:] + cycle[:1])
    return " -> ".join(f"{a} (line {graph.edges[a, b]['line']})" for a, b in steps) + f" -> {cycle[0]}"


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert graph.has_edge("fxprune.cli", "fxprune.cli_commands")        # inside parser()
    assert graph.has_edge("fxprune.latency_lut", "fxprune.bench.latency")  # inside LatencyTable.build
    assert graph.has_edge("fxprune.bench", "fxprune.bench.latency")


@pytest.mark.parametrize("a, b", [("fxprune.cli", "fxprune.cli_commands"),
                                  ("fxprune.latency_lut", "fxprune.bench"),
                                  ("fxprune.latency_lut", "fxprune.bench.latency_target"),
                                  ("fxprune.api", "fxprune.latency_lut")])
def test_no_import_cycle_between(a, b):
    graph = import_graph()
    if nx.has_path(graph, a, b) and nx.has_path(graph, b, a):
        there, back = nx.shortest_path(graph, a, b), nx.shortest_path(graph, b, a)
        pytest.fail(f"import cycle: {_describe(graph, there[:-1] + back[:-1])}")


COMMAND_LINE_AND_BENCH = ("fxprune.cli", "fxprune.cli_commands", "fxprune.cli_args", "fxprune.cli_io",
                          "fxprune.cli_model", "fxprune.__main__", "fxprune.latency_lut", "fxprune.bench")


def test_no_import_cycle_runs_through_the_command_line_or_the_benchmarks():
    graph = import_graph()
    ours = [m for m in graph if m.startswith(COMMAND_LINE_AND_BENCH)]
    assert "fxprune.cli_args" in ours and "fxprune.bench.latency_target" in ours
    for component in nx.strongly_connected_components(graph):
        if len(component) > 1 and component & set(ours):
            cycle = nx.find_cycle(graph.subgraph(component))
            pytest.fail(f"import cycle: {_describe(graph, [a for a, _ in cycle])}")


# Cycles left in modules other engineers own, each to be broken there; a cycle not listed here,
# or one grown beyond its listed modules, fails the test.
KNOWN_CYCLES: list[set[str]] = []


def test_no_new_import_cycle_anywhere_in_fxprune():
    graph = import_graph()
    for component in nx.strongly_connected_components(graph):
        if len(component) > 1 and not any(component <= known for known in KNOWN_CYCLES):
            cycle = nx.find_cycle(graph.subgraph(component))
            pytest.fail(f"import cycle: {_describe(graph, [a for a, _ in cycle])}")
