"""Pictures of a prune: width of every group (or layer) before and after, and accuracy against
MACs kept from reproduction results. PNG files drawn with matplotlib's Agg canvas (no display,
no global pyplot state).

Example:
    >>> import os, tempfile
    >>> out = tempfile.mkdtemp()
    >>> path = plot_widths([{"name": "conv1", "before": 64, "after": 32}], os.path.join(out, "w.png"))
    >>> open(path, "rb").read(8) == b"\\x89PNG\\r\\n\\x1a\\n"
    True
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .errors import FxPruneError

RESULT_KEYS = ("method", "macs_kept", "accuracy")


class PlotError(FxPruneError):
    """A picture cannot be drawn: matplotlib is missing or the input data is malformed."""


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise PlotError("drawing needs matplotlib: pip install matplotlib "
                        "(or pip install 'fxprune[plot]')") from err
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _label(name: str, width: int = 40) -> str:
    """A group's producers ("a, b, c"), cut to ``width`` characters as "a, b +1"."""
    if len(name) <= width:
        return name
    parts = name.split(", ")
    shown = parts[0][:width]
    used = 1
    while used < len(parts) and len(shown) + len(parts[used]) + 10 <= width:
        shown, used = f"{shown}, {parts[used]}", used + 1
    return shown + (f" +{len(parts) - used}" if used < len(parts) else "")


def plot_widths(groups: Sequence[dict], path: str | Path, title: str | None = None) -> Path:
    """Horizontal bars of each group's width before (light) and after (dark); returns the path.

    ``groups`` are dicts with ``name``, ``before`` and ``after`` (the ``groups`` of
    :func:`fxprune.report.size_report`, or :func:`layer_widths`).

    Example:
        >>> import os, tempfile
        >>> p = plot_widths([{"name": "a", "before": 8, "after": 4}, {"name": "b", "before": 16, "after": 16}],
        ...                 os.path.join(tempfile.mkdtemp(), "widths.png"), title="demo")
        >>> p.stat().st_size > 0
        True
    """
    if not groups:
        raise PlotError("no groups or layers to draw")
    names = [_label(str(g.get("name") or g.get("group", i))) for i, g in enumerate(groups)]
    before = [int(g["before"]) for g in groups]
    after = [int(g["after"]) for g in groups]
    fig = _figure(9, max(2.5, 0.22 * len(groups) + 1.2))
    ax = fig.add_subplot()
    rows = list(range(len(groups)))
    ax.barh(rows, before, color="#b8cbe0", label="before")
    ax.barh(rows, after, height=0.5, color="#2a5f9e", label="after")
    ax.set_yticks(rows, names, fontsize=7 if len(groups) > 30 else 9)
    ax.invert_yaxis()
    ax.set_xlabel("channels")
    kept = sum(after) / max(sum(before), 1)
    ax.set_title(f"{title + ': ' if title else ''}width per group ({kept:.0%} of channels kept)")
    ax.legend(loc="lower left", bbox_to_anchor=(1.0, 0.0))
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def layer_widths(original: torch.nn.Module, pruned: torch.nn.Module) -> list[dict]:
    """Output width of every convolution, linear and norm layer of ``original`` and of the layer
    with the same name in ``pruned`` (e.g. a model reloaded with :func:`fxprune.load`).

    Example:
        >>> a = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
        >>> b = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.Conv2d(5, 4, 3))
        >>> layer_widths(a, b)[0]
        {'name': '0', 'before': 8, 'after': 5}
    """
    def width(module: torch.nn.Module) -> int | None:
        for attr in ("out_channels", "out_features", "num_features"):
            if isinstance(getattr(module, attr, None), int):
                return getattr(module, attr)
        return None

    pruned_modules = dict(pruned.named_modules())
    rows = []
    for name, module in original.named_modules():
        w = width(module)
        other = pruned_modules.get(name)
        if w is not None and other is not None and width(other) is not None:
            rows.append({"name": name, "before": w, "after": width(other)})
    return rows


def load_results(path: str | Path) -> list[dict]:
    """Records of a results JSON file: a list (or ``{"records": [...]}``) of dicts with at least
    ``method``, ``macs_kept`` (fraction of MACs kept) and ``accuracy``.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "r.json")
        >>> _ = open(path, "w").write('[{"method": "l1", "macs_kept": 0.5, "accuracy": 0.9}]')
        >>> load_results(path)[0]["method"]
        'l1'
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise PlotError(f"results file {str(path)!r} does not exist") from err
    except json.JSONDecodeError as err:
        raise PlotError(f"results file {str(path)!r} is not valid JSON: {err}") from err
    records = data.get("records", data.get("results")) if isinstance(data, dict) else data
    if not isinstance(records, list) or not records:
        raise PlotError(f"results file {str(path)!r} must hold a non-empty list of records "
                        f"(or {{'records': [...]}}) with keys {', '.join(RESULT_KEYS)}")
    for index, record in enumerate(records):
        missing = [k for k in RESULT_KEYS if not isinstance(record, dict) or k not in record]
        if missing:
            raise PlotError(f"results file {str(path)!r}: record {index} lacks {', '.join(missing)}; "
                            f"every record needs {', '.join(RESULT_KEYS)}")
    return records


def _panels(records: Iterable[dict]) -> dict[str, list[dict]]:
    """Records split by (dataset, model) when they name them; one panel otherwise."""
    panels: dict[str, list[dict]] = {}
    for r in records:
        key = " / ".join(str(r[k]) for k in ("dataset", "model") if r.get(k) is not None)
        panels.setdefault(key, []).append(r)
    return panels


def plot_accuracy(records: Sequence[dict], path: str | Path, title: str | None = None) -> Path:
    """Accuracy against the fraction of MACs kept, one line per method (one panel per
    dataset/model when records carry those keys); returns the path.

    Example:
        >>> import os, tempfile
        >>> rs = [{"method": m, "macs_kept": k, "accuracy": a} for m, k, a in
        ...       [("l1", 0.5, 0.9), ("l1", 0.3, 0.8), ("random", 0.5, 0.85)]]
        >>> plot_accuracy(rs, os.path.join(tempfile.mkdtemp(), "acc.png")).suffix
        '.png'
    """
    if not records:
        raise PlotError("no results to draw")
    panels = _panels(records)
    fig = _figure(6.5 * len(panels), 4.5)
    for index, (panel, rows) in enumerate(sorted(panels.items()), start=1):
        ax = fig.add_subplot(1, len(panels), index)
        by_method: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            by_method.setdefault(str(r["method"]), []).append((float(r["macs_kept"]), float(r["accuracy"])))
        for method, points in sorted(by_method.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.set_xlabel("MACs kept (fraction of the original)")
        ax.set_ylabel("accuracy")
        ax.set_title(" - ".join(t for t in (title, panel) if t) or "accuracy against MACs kept")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)
