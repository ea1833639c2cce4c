"""Latency of one model: a private, placed copy timed with the right clock for its device.

CPU: ``time.perf_counter`` around each call, with a fixed thread count restored afterwards.
CUDA: CUDA events around each call, synchronised, after a warm-up. Always under
``torch.inference_mode()`` on an eval-mode copy; the caller's model is never changed.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    >>> stats = measure(model, (torch.randn(1, 3, 32, 32),), warmup=2, runs=5)
    >>> stats.p25_ms <= stats.median_ms <= stats.p75_ms
    True
"""
from __future__ import annotations

import contextlib
import copy
import gc
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class BenchError(ValueError):
    """A benchmark setting is invalid; the message names it and the valid choices.

    Example:
        >>> issubclass(DeviceUnavailableError, BenchError)
        True
    """


class DeviceUnavailableError(BenchError):
    """The requested device (e.g. ``"cuda"``) is not available on this machine.

    Example:
        >>> str(DeviceUnavailableError("no GPU"))
        'no GPU'
    """


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one model at one setting, in milliseconds per forward call.

    Example:
        >>> s = LatencyStats.from_samples([3.0, 1.0, 2.0], device="cpu", dtype="fp32", batch=1)
        >>> s.median_ms, s.p25_ms, s.p75_ms, s.runs
        (2.0, 1.5, 2.5, 3)
    """

    median_ms: float
    p25_ms: float
    p75_ms: float
    iqr_ms: float
    runs: int
    device: str
    dtype: str
    batch: int | None
    threads: int | None = None
    samples_ms: tuple[float, ...] = field(default=(), repr=False)

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], *, device: str, dtype: str,
                     batch: int | None, threads: int | None = None) -> "LatencyStats":
        """Summarise raw per-call timings (milliseconds).

        Example:
            >>> LatencyStats.from_samples([1.0], device="cpu", dtype="fp32", batch=None).iqr_ms
            0.0
        """
        if not samples_ms:
            raise BenchError("no timings to summarise: runs must be at least 1")
        ordered = sorted(float(s) for s in samples_ms)
        p25, median, p75 = (_percentile(ordered, q) for q in (0.25, 0.5, 0.75))
        return cls(median_ms=median, p25_ms=p25, p75_ms=p75, iqr_ms=p75 - p25,
                   runs=len(ordered), device=device, dtype=dtype, batch=batch, threads=threads,
                   samples_ms=tuple(float(s) for s in samples_ms))

    def to_dict(self, samples: bool = False) -> dict:
        """JSON-serialisable fields; the raw samples only when ``samples`` is true.

        Example:
            >>> s = LatencyStats.from_samples([1.0, 2.0], device="cpu", dtype="fp32", batch=4)
            >>> s.to_dict()["batch"], "samples_ms" in s.to_dict()
            (4, False)
        """
        out = asdict(self)
        out["samples_ms"] = list(self.samples_ms)
        if not samples:
            del out["samples_ms"]
        return out


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def resolve_device(device: str | torch.device) -> torch.device:
    """Check that ``device`` exists here; raise :class:`DeviceUnavailableError` if it does not.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise BenchError(f"unknown device {device!r}: use 'cpu' or 'cuda[:index]'") from err
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise BenchError(f"device {device!r} is not supported: use 'cpu' or 'cuda[:index]'")
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device {device!r} requested but CUDA is unavailable here "
            f"(torch.cuda.is_available() is False, torch {torch.__version__}); "
            "measure on device='cpu' or run on a machine with a CUDA GPU")
    index = resolved.index if resolved.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise DeviceUnavailableError(f"device {device!r} requested but only "
                                     f"{torch.cuda.device_count()} CUDA device(s) exist")
    return torch.device("cuda", index)


def _check_dtype(dtype: str, device: torch.device) -> None:
    if dtype not in DTYPES:
        raise BenchError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise BenchError(f"dtype 'bf16' is not supported by {torch.cuda.get_device_name(device)}")


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in nested tuples, lists and dicts; other values are kept.

    Example:
        >>> map_tensors((torch.ones(1), {"a": torch.ones(2)}, 3), lambda t: t * 2)[1]["a"]
        tensor([2., 2.])
    """
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [map_tensors(v, fn) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def _tensors(value: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    map_tensors(value, lambda t: found.append(t) or t)
    return found


def batch_of(example_inputs: Any) -> int | None:
    """The batch size: dim 0 of the first tensor input (``None`` without such a tensor).

    Example:
        >>> batch_of((torch.randn(8, 3), 0.5))
        8
    """
    tensors = [t for t in _tensors(example_inputs) if t.dim() >= 1]
    return int(tensors[0].shape[0]) if tensors else None


def resize_batch(example_inputs: Any, batch: int) -> Any:
    """Every tensor input (dim >= 1) repeated or cut along dim 0 to ``batch`` rows.

    Example:
        >>> resize_batch((torch.randn(2, 3),), 5)[0].shape
        torch.Size([5, 3])
    """
    if batch < 1:
        raise BenchError(f"batch sizes must be at least 1, got {batch}")

    def resize(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0 or t.shape[0] == 0:
            return t
        copies = -(-batch // t.shape[0])
        return t.repeat(copies, *([1] * (t.dim() - 1)))[:batch].clone()

    return map_tensors(example_inputs, resize)


def fold_batch_norms(module: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy with every BatchNorm that follows a conv folded into it (as ONNX
    Runtime, TensorRT and ``torch.jit.freeze`` do when deploying): the deployed form of a model.

    Raises :class:`BenchError` when the model cannot be traced by ``torch.fx``.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
        >>> folded = fold_batch_norms(m)
        >>> any(isinstance(x, torch.nn.BatchNorm2d) for x in folded.modules())
        False
    """
    from torch.fx.experimental.optimization import fuse
    try:
        return fuse(copy.deepcopy(module).eval(), inplace=True)
    except Exception as err:  # torch.fx raises many types
        raise BenchError(f"cannot fold norms of {type(module).__name__}: torch.fx could not trace it "
                         f"({type(err).__name__}: {err}); time it without fold_norms") from err


class ModelRunner:
    """An eval-mode copy of a model, placed on a device with its inputs, timed one call at a time.

    ``module`` is the plain copy (before ``torch.compile``); ``forward`` is what gets timed.

    Example:
        >>> runner = ModelRunner(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
        >>> with timing_session(runner.device):
        ...     runner.time_once() > 0
        True
    """

    def __init__(self, model: torch.nn.Module, example_inputs: Any, device: str = "cpu",
                 dtype: str = "fp32", channels_last: bool = False, compile: bool | str = False,
                 fold_norms: bool = False):
        self.device = resolve_device(device)
        _check_dtype(dtype, self.device)
        self.dtype = dtype
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        self.batch = batch_of(inputs)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        self.module = (fold_batch_norms(model) if fold_norms else copy.deepcopy(model).eval()).to(self.device)
        if channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)

        def place(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().to(self.device)
            return t.contiguous(memory_format=layout) if t.dim() == 4 else t

        self.inputs = map_tensors(inputs, place)
        self.forward: Callable = self.module
        if compile:
            backend = compile if isinstance(compile, str) else "inductor"
            self.forward = torch.compile(self.module, backend=backend)

    def _autocast(self) -> contextlib.AbstractContextManager:
        low = DTYPES[self.dtype]
        if low is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=low)

    def run_once(self) -> Any:
        """One untimed forward call (for warm-up)."""
        with self._autocast():
            return self.forward(*self.inputs)

    def time_once(self) -> float:
        """Milliseconds of one forward call, measured with the device's clock."""
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            with self._autocast():
                start.record()
                self.forward(*self.inputs)
                end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        with self._autocast():
            begin = time.perf_counter()
            self.forward(*self.inputs)
            return (time.perf_counter() - begin) * 1e3

    def warm_up(self, calls: int) -> None:
        """Run ``calls`` untimed calls (compilation, caches, clocks), then wait for the device."""
        for _ in range(calls):
            self.run_once()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@contextlib.contextmanager
def timing_session(device: torch.device, threads: int | None = None) -> Iterator[int]:
    """Inference mode, a fixed CPU thread count and no garbage collection, all restored after.

    Yields the thread count in use.

    Example:
        >>> with timing_session(torch.device("cpu"), threads=1) as n:
        ...     n, torch.is_inference_mode_enabled()
        (1, True)
    """
    if threads is not None and threads < 1:
        raise BenchError(f"threads must be at least 1, got {threads}")
    previous_threads = torch.get_num_threads()
    gc_was_enabled = gc.isenabled()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        gc.collect()
        gc.disable()
        with torch.inference_mode():
            yield torch.get_num_threads()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        if gc_was_enabled:
            gc.enable()
        torch.set_num_threads(previous_threads)


def check_counts(warmup: int, runs: int) -> None:
    """Reject a negative warm-up or fewer than one timed run.

    Example:
        >>> check_counts(0, 1) is None
        True
    """
    if warmup < 0 or runs < 1:
        raise BenchError(f"need warmup >= 0 and runs >= 1, got warmup={warmup}, runs={runs}")


def measure(model: torch.nn.Module, example_inputs: Any, device: str = "cpu",
            dtype: str = "fp32", channels_last: bool = False, compile: bool | str = False,
            warmup: int = 10, runs: int = 50, threads: int | None = None,
            fold_norms: bool = False) -> LatencyStats:
    """Median and quartiles of the latency of ``model(*example_inputs)``, in milliseconds.

    ``dtype``: ``"fp32"``, or ``"fp16"``/``"bf16"`` through ``torch.autocast`` (weights stay
    fp32). ``channels_last`` converts the model and 4-D inputs. ``compile``: ``True`` for
    ``torch.compile`` (inductor) or a backend name. ``threads``: CPU threads during the run
    (default: the current setting); the previous setting is restored. ``device="cuda"`` raises
    :class:`DeviceUnavailableError` when CUDA is unavailable. The caller's model (device, mode,
    dtype, parameters) is not changed: a private eval-mode copy is timed. ``fold_norms`` folds
    conv→BatchNorm pairs first (:func:`fold_batch_norms`), as deployment runtimes do.

    Example:
        >>> import torch
        >>> stats = measure(torch.nn.Linear(64, 64), (torch.randn(8, 64),), warmup=1, runs=3)
        >>> stats.runs, stats.batch, stats.median_ms > 0
        (3, 8, True)
    """
    check_counts(warmup, runs)
    runner = ModelRunner(model, example_inputs, device, dtype, channels_last, compile, fold_norms)
    with timing_session(runner.device, threads) as used_threads:
        runner.warm_up(warmup)
        samples = [runner.time_once() for _ in range(runs)]
    return LatencyStats.from_samples(samples, device=str(runner.device), dtype=dtype,
                                     batch=runner.batch, threads=used_threads)


def batch_sweep(model: torch.nn.Module, example_inputs: Any, batch_sizes: Sequence[int],
                **measure_options: Any) -> list[LatencyStats]:
    """:func:`measure` at each batch size; inputs are resized along dim 0 (see :func:`resize_batch`).

    Example:
        >>> import torch
        >>> sweep = batch_sweep(torch.nn.Linear(8, 8), (torch.randn(1, 8),), [1, 4], runs=3)
        >>> [s.batch for s in sweep]
        [1, 4]
    """
    return [measure(model, resize_batch(example_inputs, b), **measure_options)
            for b in batch_sizes]
