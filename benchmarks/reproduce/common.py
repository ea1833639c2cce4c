"""Helpers shared by the criteria reproduction scripts: baselines, subsets, cost counting, output.

Example:
    >>> import torch
    >>> from benchmarks.reproduce.models import LeNet5
    >>> macs, params = measure(LeNet5(), torch.zeros(1, 1, 28, 28))
    >>> macs, params
    (416520, 61706)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.reproduce.datasets import Splits, load as load_dataset
from benchmarks.reproduce.train_baselines import (CACHE_DIR, RECIPES, build_model, checkpoint_path,
                                                  load_or_train)
from fxprune.cost import count
from fxprune.shapes import propagate
from fxprune.training import evaluate, finetune

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
EVAL_BATCH = 500


def set_threads(n: int) -> None:
    """Use ``n`` CPU threads (1 is fastest on a shared machine: no spinning against other work)."""
    torch.set_num_threads(max(1, n))


def load_data(data_name: str, data_root: str | None = None) -> Splits:
    """The named data set; ``data_root`` is the CIFAR-10 folder for ``cifar10``."""
    return load_dataset(data_name, **({"root": data_root} if data_name == "cifar10" else {}))


def subset(dataset: TensorDataset, n: int | None, seed: int = 0) -> TensorDataset:
    """``n`` samples drawn without replacement by a seeded permutation (all when ``n`` is None).

    Example:
        >>> ds = TensorDataset(torch.arange(10.0), torch.arange(10))
        >>> len(subset(ds, 3)), torch.equal(subset(ds, 3).tensors[1], subset(ds, 3, seed=0).tensors[1])
        (3, True)
    """
    x, y = dataset.tensors
    if n is None or n >= len(y):
        return dataset
    index = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    return TensorDataset(x[index], y[index])


def batches(dataset: TensorDataset, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The dataset as a list of ``(inputs, targets)`` batches, in order."""
    x, y = dataset.tensors
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]


def accuracy(model: torch.nn.Module, test: TensorDataset) -> float:
    return evaluate(model, DataLoader(test, batch_size=EVAL_BATCH))


def measure(model: torch.nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """``(MACs, parameters)`` of ``model`` for one ``example`` batch, counted from its FX graph."""
    gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
    propagate(gm, (example,))
    cost = count(gm)
    return cost["macs"], cost["params"]


def baseline(model_name: str, data_name: str, epochs: int, seed: int, splits: Splits, *,
             cache_dir: Path = CACHE_DIR, data_root: str | None = None,
             tiny_if_absent: int | None = None) -> tuple[torch.nn.Module, str]:
    """The trained dense model and where it came from.

    The cached checkpoint is used when it was trained with these settings (the check
    ``load_or_train`` makes); otherwise ``load_or_train`` trains and caches it, unless
    ``tiny_if_absent`` is given (fast/test mode): then a throw-away
    baseline is trained for one epoch on that many training images and nothing is cached.
    """
    path = checkpoint_path(model_name, data_name, seed, cache_dir)
    shape, classes = tuple(splits.test.tensors[0].shape[1:]), int(splits.train.tensors[1].max()) + 1
    saved = cached_checkpoint(path, epochs, seed, RECIPES[model_name])
    if saved is not None:  # what load_or_train would load, without reading the data set again
        model = build_model(model_name, shape, classes)
        model.load_state_dict(saved["state_dict"])
        return model.eval(), f"cached checkpoint {path.name} ({epochs} epochs, seed {seed})"
    if tiny_if_absent is not None:
        torch.manual_seed(seed)
        model = build_model(model_name, shape, classes)
        recipe = RECIPES[model_name]
        train = DataLoader(subset(splits.train, tiny_if_absent, seed), batch_size=64, shuffle=True)
        finetune(model, train, epochs=1, lr=recipe["lr"], weight_decay=recipe["weight_decay"],
                 progress=False, seed=seed)
        return model.eval(), f"tiny: 1 epoch on {tiny_if_absent} training images (no cached checkpoint)"
    trained = load_or_train(model_name, data_name, epochs, seed, cifar_root=data_root, cache_dir=cache_dir)
    return trained.model.eval(), f"trained now, cached as {trained.checkpoint.name} ({epochs} epochs, seed {seed})"


def cached_checkpoint(path: Path, epochs: int, seed: int, recipe: dict) -> dict | None:
    """The cached checkpoint when it was trained with these settings (as load_or_train checks)."""
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    settings = (saved.get("epochs"), saved.get("seed"), saved.get("recipe"))
    return saved if settings == (epochs, seed, recipe) else None


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation.

    Example:
        >>> mean_std([1.0, 3.0])
        (2.0, 1.0)
    """
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if len(values) > 1 else 0.0


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
