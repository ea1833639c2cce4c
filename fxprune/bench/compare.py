"""Original against pruned: interleaved latency, MACs, parameters, and a table or JSON of them.

Example:
    >>> import torch
    >>> wide = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.Conv2d(32, 32, 3))
    >>> narrow = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.Conv2d(16, 16, 3))
    >>> record = compare(wide, narrow, (torch.randn(1, 3, 32, 32),), warmup=1, runs=3)
    >>> record.ideal_speedup > 1
    True
"""
from __future__ import annotations

import copy
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch.utils.flop_counter import FlopCounterMode

from .latency import (BenchError, LatencyStats, ModelRunner, check_counts, timing_session)

JSON_SCHEMA = "fxprune.bench"
JSON_VERSION = 1


def _macs_of_placed(module: torch.nn.Module, inputs: tuple) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops() // 2


def count_macs(model: torch.nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward call, counted by ``torch.utils.flop_counter``.

    MACs = FLOPs / 2 over the ops the counter knows (convolutions, matrix products,
    attention); element-wise ops are not counted. Runs an eval-mode copy; the caller's model
    is not changed.

    Example:
        >>> count_macs(torch.nn.Linear(4, 3, bias=False), (torch.randn(2, 4),))
        24
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    return _macs_of_placed(copy.deepcopy(model).eval(), inputs)


def count_params(model: torch.nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once).

    Example:
        >>> count_params(torch.nn.Linear(4, 3))
        15
    """
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class Comparison:
    """One side-by-side measurement of an original and a pruned model.

    ``speedup`` = original median / pruned median; ``ideal_speedup`` = original MACs / pruned
    MACs (``None`` when the pruned model has no counted MACs); ``efficiency`` = speedup /
    ideal speedup (1.0 means latency fell exactly as much as the arithmetic).

    Example:
        >>> fast = LatencyStats.from_samples([1.0], device="cpu", dtype="fp32", batch=1)
        >>> slow = LatencyStats.from_samples([3.0], device="cpu", dtype="fp32", batch=1)
        >>> c = Comparison("m", slow, fast, original_macs=400, pruned_macs=100,
        ...                original_params=40, pruned_params=10)
        >>> c.speedup, c.ideal_speedup, c.efficiency
        (3.0, 4.0, 0.75)
    """

    name: str
    original: LatencyStats
    pruned: LatencyStats
    original_macs: int
    pruned_macs: int
    original_params: int
    pruned_params: int

    @property
    def speedup(self) -> float:
        return self.original.median_ms / self.pruned.median_ms

    @property
    def ideal_speedup(self) -> float | None:
        return self.original_macs / self.pruned_macs if self.pruned_macs else None

    @property
    def efficiency(self) -> float | None:
        ideal = self.ideal_speedup
        return self.speedup / ideal if ideal else None

    def to_dict(self, samples: bool = False) -> dict:
        """JSON-serialisable fields, the derived ratios included.

        Example:
            >>> s = LatencyStats.from_samples([2.0], device="cpu", dtype="fp32", batch=1)
            >>> Comparison("m", s, s, 2, 1, 4, 2).to_dict()["ideal_speedup"]
            2.0
        """
        return {
            "name": self.name,
            "original": self.original.to_dict(samples),
            "pruned": self.pruned.to_dict(samples),
            "speedup": self.speedup,
            "original_macs": self.original_macs,
            "pruned_macs": self.pruned_macs,
            "ideal_speedup": self.ideal_speedup,
            "efficiency": self.efficiency,
            "original_params": self.original_params,
            "pruned_params": self.pruned_params,
        }


def compare(original: torch.nn.Module, pruned: torch.nn.Module, example_inputs: Any, *,
            name: str | None = None, device: str = "cpu", dtype: str = "fp32",
            channels_last: bool = False, compile: bool | str = False, warmup: int = 10,
            runs: int = 50, threads: int | None = None, fold_norms: bool = False) -> Comparison:
    """Measure ``original`` and ``pruned`` in one interleaved run and relate speed to MACs.

    Calls alternate between the two models in rounds (original first in even rounds, pruned
    first in odd ones), so load changes on the machine hit both alike. Options are those of
    :func:`fxprune.bench.measure`. Neither model is changed.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 32)
        >>> record = compare(a, b, (torch.randn(4, 64),), name="fc", warmup=1, runs=3)
        >>> record.name, record.ideal_speedup, record.original.runs
        ('fc', 2.0, 3)
    """
    check_counts(warmup, runs)
    options = dict(device=device, dtype=dtype, channels_last=channels_last, compile=compile, fold_norms=fold_norms)
    runners = (ModelRunner(original, example_inputs, **options),
               ModelRunner(pruned, example_inputs, **options))
    macs = [_macs_of_placed(r.module, r.inputs) for r in runners]
    samples: tuple[list[float], list[float]] = ([], [])
    with timing_session(runners[0].device, threads) as used_threads:
        for runner in runners:
            runner.warm_up(warmup)
        for round_index in range(runs):
            order = (0, 1) if round_index % 2 == 0 else (1, 0)
            for which in order:
                samples[which].append(runners[which].time_once())
    stats = [LatencyStats.from_samples(s, device=str(r.device), dtype=dtype, batch=r.batch,
                                       threads=used_threads) for s, r in zip(samples, runners)]
    return Comparison(name=name or type(original).__name__, original=stats[0], pruned=stats[1],
                      original_macs=macs[0], pruned_macs=macs[1],
                      original_params=count_params(original), pruned_params=count_params(pruned))


def _si(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:.0f}"


def _ms(stats: LatencyStats) -> str:
    return f"{stats.median_ms:.3f} [{stats.p25_ms:.3f}-{stats.p75_ms:.3f}]"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _comparison_row(r: Comparison) -> list:
    return [r.name, r.original.device, r.original.dtype, r.original.batch, _ms(r.original),
            _ms(r.pruned), _ratio(r.speedup), _ratio(r.ideal_speedup),
            "n/a" if r.efficiency is None else f"{r.efficiency:.0%}",
            f"{_si(r.original_macs)} -> {_si(r.pruned_macs)}",
            f"{_si(r.original_params)} -> {_si(r.pruned_params)}"]


def _latency_row(s: LatencyStats) -> list:
    return [s.device, s.dtype, s.batch, s.threads, f"{s.median_ms:.3f}", f"{s.p25_ms:.3f}",
            f"{s.p75_ms:.3f}", f"{s.iqr_ms:.3f}", s.runs]


def format_table(records: Iterable[Comparison | LatencyStats], tablefmt: str = "github") -> str:
    """A text table of :class:`Comparison` records, or of :class:`LatencyStats` (e.g. a sweep).

    Latency columns show the median and [p25-p75] in milliseconds.

    Example:
        >>> s = LatencyStats.from_samples([2.0], device="cpu", dtype="fp32", batch=1)
        >>> table = format_table([Comparison("net", s, s, 2, 1, 4, 2)])
        >>> "speedup" in table.splitlines()[0], "net" in table.splitlines()[2]
        (True, True)
    """
    from tabulate import tabulate

    records = list(records)
    if all(isinstance(r, LatencyStats) for r in records):
        headers = ["device", "dtype", "batch", "threads", "median ms", "p25 ms", "p75 ms",
                   "IQR ms", "runs"]
        return tabulate([_latency_row(r) for r in records], headers=headers, tablefmt=tablefmt)
    if not all(isinstance(r, Comparison) for r in records):
        raise BenchError("format_table takes a list of Comparison records or of LatencyStats, "
                         "not a mix or other objects")
    headers = ["model", "device", "dtype", "batch", "original ms", "pruned ms", "speedup",
               "ideal (MACs)", "efficiency", "MACs", "params"]
    return tabulate([_comparison_row(r) for r in records], headers=headers, tablefmt=tablefmt)


def environment() -> dict:
    """Where the numbers were taken: versions, CPU, threads and GPU (if any).

    Example:
        >>> sorted(environment())[:3]
        ['cpu_count', 'cuda_device', 'machine']
    """
    return {
        "cpu_count": os.cpu_count(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def to_json(records: Iterable[Comparison | LatencyStats], samples: bool = False) -> dict:
    """A JSON-serialisable dict: schema tag, environment and one entry per record.

    Example:
        >>> import json
        >>> s = LatencyStats.from_samples([2.0], device="cpu", dtype="fp32", batch=1)
        >>> doc = to_json([Comparison("net", s, s, 2, 1, 4, 2)])
        >>> json.loads(json.dumps(doc))["records"][0]["ideal_speedup"]
        2.0
    """
    return {"schema": JSON_SCHEMA, "version": JSON_VERSION, "environment": environment(),
            "records": [r.to_dict(samples) for r in records]}
