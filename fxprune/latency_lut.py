"""A latency lookup table: each prunable layer timed at a few widths on the target device.

``Policy(latency=0.6)`` prunes until the predicted latency is 60% of the original. The
prediction sums, over conv/linear layers, their latency interpolated (bilinearly, over the
fractions of input and output channels kept) from a grid measured once and cached in a JSON
file keyed by device; everything else in the model (norms, activations, additions, pooling) is
timed as a whole and scaled by the fraction of activation elements kept, since those ops are
memory-bound. ``benchmarks/latency_target.py`` then measures the pruned model to confirm.
"""
from __future__ import annotations

import json
import math
import os
import platform
import warnings
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from .shapes import is_tensor_shape, shape

GRID = (0.25, 0.5, 0.75, 1.0)


def device_key(device: str = "cpu", threads: int = 1) -> str:
    """Name of the device the table belongs to, e.g. ``cpu-x86_64-1t`` or ``cuda-NVIDIA H100``.

    Example:
        >>> device_key("cpu", 1).startswith("cpu-")
        True
    """
    if str(device).startswith("cuda"):
        return f"cuda-{torch.cuda.get_device_name(torch.device(device))}"
    return f"cpu-{platform.machine()}-{threads}t"


def default_cache(device: str = "cpu", threads: int = 1) -> Path:
    root = Path(os.environ.get("FXPRUNE_CACHE", Path.home() / ".cache" / "fxprune"))
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in device_key(device, threads))
    return root / f"latency-{safe}.json"


def _layer(m: nn.Module, fin: float, fout: float) -> tuple[nn.Module, int]:
    """A fresh layer like ``m`` with the given fractions of its channels, and its input width."""
    if isinstance(m, nn.Linear):
        i, o = max(1, round(m.in_features * fin)), max(1, round(m.out_features * fout))
        return nn.Linear(i, o, bias=m.bias is not None), i
    depthwise = m.groups > 1 and m.groups == m.in_channels
    i = max(1, round(m.in_channels * (fout if depthwise else fin)))
    o = max(1, round(m.out_channels * fout))
    if depthwise:
        o = i * (m.out_channels // m.in_channels)
    groups = i if depthwise else 1
    cls = type(m)
    kwargs = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=groups, bias=m.bias is not None)
    if m.transposed:
        kwargs["output_padding"] = m.output_padding
    return cls(i, o, m.kernel_size, **kwargs), i


def signature(m: nn.Module, in_shape: tuple) -> str:
    return f"{type(m).__name__}|{m.extra_repr()}|{tuple(in_shape)}"


def _weighted_nodes(gm: fx.GraphModule, params: dict) -> list[tuple[fx.Node, nn.Module, str]]:
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        target = f"{node.target}.weight"
        supported = isinstance(m, nn.Linear) or (isinstance(m, nn.modules.conv._ConvNd) and
                                                 (m.groups == 1 or m.groups == m.in_channels))
        if supported and any(t == target for t, _ in params) and is_tensor_shape(shape(node.args[0])):
            out.append((node, m, target))
    return out


class LatencyTable:
    """Latency grids of a model's prunable layers, plus the time of everything else.

    Example:
        >>> import fxprune, torch, tempfile, os
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3))
        >>> p = fxprune.plan(m, fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 16, 16),))
        >>> lut = LatencyTable.build(p.traced, p.analysis, p.example_inputs, runs=3, warmup=1,
        ...                          cache=os.path.join(tempfile.mkdtemp(), "lut.json"))
        >>> sorted(lut.layers)
        ['0.weight', '2.weight']
    """

    def __init__(self, layers: dict[str, list[list[float]]], rest_ms: float, total_ms: float, device: str):
        self.layers, self.rest_ms, self.total_ms, self.device = layers, rest_ms, total_ms, device

    @classmethod
    def build(cls, traced: fx.GraphModule, analysis, example_inputs: tuple, device: str = "cpu",
              threads: int = 1, runs: int = 10, warmup: int = 3, cache: str | Path | None = None,
              progress: bool = False) -> "LatencyTable":
        """Measure (or read from the cache) every prunable layer at ``GRID`` x ``GRID`` widths."""
        from .bench.latency import measure
        cache = Path(cache) if cache else default_cache(device, threads)
        store = _read_cache(cache)
        timing = dict(device=device, threads=threads, runs=runs, warmup=warmup)
        layers = {}
        nodes = _weighted_nodes(traced, analysis.params)
        if progress:
            from tqdm import tqdm
            nodes = tqdm(nodes, desc="latency table", unit="layer")
        for node, m, target in nodes:
            in_shape = shape(node.args[0])
            key = signature(m, in_shape)
            if key not in store:
                grid = []
                for fin in GRID:
                    row = []
                    for fout in GRID:
                        layer, width = _layer(m, fin, fout)
                        x = torch.randn(*in_shape[:1], width, *in_shape[2:]) if len(in_shape) > 2 else \
                            torch.randn(*in_shape[:-1], width)
                        row.append(measure(layer, (x,), **timing).median_ms)
                    grid.append(row)
                store[key] = grid
            layers[target] = layers.get(target) or store[key]
        whole = measure(traced, example_inputs, **timing).median_ms
        at_full = sum(grid[-1][-1] for grid in layers.values())
        _write_cache(cache, store)
        return cls(layers, max(whole - at_full, 0.0), whole, device_key(device, threads))

    @classmethod
    def for_model(cls, model: nn.Module, policy, example_inputs, *, device: str | None = None,
                  threads: int = 1, progress: bool = False, leaf_modules=(), concrete_args: dict | None = None,
                  **build_options) -> "LatencyTable":
        """The table of ``model``'s prunable layers (traced and analysed as ``fxprune.plan`` does),
        measured on ``device`` (default: ``policy.device``) with ``threads`` threads, or read from
        the cache; ``build_options`` go to :meth:`build`."""
        from .analysis import analyse_model
        from .trace import check_inputs
        inputs = check_inputs(example_inputs)
        gm, an, *_ = analyse_model(model, policy, inputs, {}, leaf_modules, concrete_args)
        return cls.build(gm, an, inputs, device=device or policy.device, threads=threads, progress=progress,
                         **build_options)

    def predict(self, keeps: dict[str, dict[int, float]], activations: float, in_dims: dict[str, int]) -> float:
        """Predicted latency (ms) for kept fractions ``{weight: {dim: fraction}}``."""
        total = self.rest_ms * activations
        for target, grid in self.layers.items():
            k = keeps.get(target, {})
            fin, fout = k.get(in_dims.get(target, 1), 1.0), k.get(1 - in_dims.get(target, 1), 1.0)
            total += _bilinear(grid, fin, fout)
        return total


def _read_cache(cache: Path) -> dict:
    """The cached grids, or ``{}`` when the cache is missing or unreadable (it is then rebuilt)."""
    try:
        store = json.loads(cache.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        warnings.warn(f"latency cache {cache} is unreadable ({err}); measuring again and rewriting it",
                      RuntimeWarning, stacklevel=3)
        return {}
    return store if isinstance(store, dict) else {}


def _write_cache(cache: Path, store: dict) -> None:
    """Write the cache whole or not at all, so an interrupted run never leaves a truncated cache."""
    from .atomic import write_text
    write_text(cache, json.dumps(store))


def _bilinear(grid: list[list[float]], fin: float, fout: float) -> float:
    def locate(f: float) -> tuple[int, float]:
        f = min(max(f, GRID[0]), GRID[-1])
        for i in range(len(GRID) - 1):
            if f <= GRID[i + 1]:
                return i, (f - GRID[i]) / (GRID[i + 1] - GRID[i])
        return len(GRID) - 2, 1.0
    i, a = locate(fin)
    j, b = locate(fout)
    top = grid[i][j] * (1 - b) + grid[i][j + 1] * b
    bottom = grid[i + 1][j] * (1 - b) + grid[i + 1][j + 1] * b
    value = top * (1 - a) + bottom * a
    lo = min(fin, fout)
    if lo < GRID[0]:  # below the grid: scale down linearly
        value *= max(lo / GRID[0], 0.0) if not math.isclose(lo, 0.0) else 0.0
    return value
