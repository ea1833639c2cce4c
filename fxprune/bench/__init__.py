"""Latency benchmarks: one model (:func:`measure`, :func:`batch_sweep`) or an original against
its pruned version (:func:`compare`), with results as a table or JSON.

Example:
    >>> import torch
    >>> from fxprune import bench
    >>> wide, narrow = torch.nn.Linear(64, 64), torch.nn.Linear(64, 16)
    >>> record = bench.compare(wide, narrow, (torch.randn(8, 64),), warmup=1, runs=3)
    >>> record.ideal_speedup
    4.0
    >>> "speedup" in bench.format_table([record])
    True
"""
from .compare import Comparison, compare, count_macs, count_params, environment, format_table, to_json
from .latency import (DTYPES, BenchError, DeviceUnavailableError, LatencyStats, batch_sweep, measure,
                      resize_batch)
from .latency_target import LatencyRound, prune_to_latency

__all__ = [
    "measure", "batch_sweep", "resize_batch", "LatencyStats", "compare", "Comparison",
    "count_macs", "count_params", "environment", "format_table", "to_json", "DTYPES",
    "BenchError", "DeviceUnavailableError", "prune_to_latency", "LatencyRound",
]
