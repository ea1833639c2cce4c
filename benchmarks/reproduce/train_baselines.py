"""Train (or load from cache) the dense baseline models that the pruning experiments start from.

Checkpoints go to ``benchmarks/reproduce/.cache/{model}_{data}_seed{seed}.pt`` and are reused while
the recorded training settings match.

Usage:
    python benchmarks/reproduce/train_baselines.py --model lenet5 --data mnist --epochs 3

Example:
    >>> baseline = load_or_train("lenet5", "mnist", epochs=3, seed=0)  # doctest: +SKIP
    >>> baseline.test_accuracy > 0.98  # doctest: +SKIP
    True
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.reproduce.datasets import DATASETS, load as load_dataset  # noqa: E402
from benchmarks.reproduce.models import MODELS  # noqa: E402
from fxprune.training import evaluate, finetune  # noqa: E402

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
EVAL_BATCH_SIZE = 1000

# Training settings per model; SGD with momentum 0.9 and a cosine schedule in every case.
RECIPES = {
    "lenet5": {"batch_size": 128, "optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4},
    "resnet20": {"batch_size": 128, "optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4},
}


class Baseline(NamedTuple):
    model: nn.Module
    test_accuracy: float
    checkpoint: Path
    train_seconds: float


def build_model(model_name: str, sample_shape: tuple[int, ...], num_classes: int = 10) -> nn.Module:
    """A freshly initialised ``model_name`` for inputs of shape ``(C, H, W)``."""
    if model_name not in MODELS:
        raise KeyError(f"unknown model {model_name!r}; choose one of {sorted(MODELS)}")
    channels, height, width = sample_shape
    if model_name == "lenet5" and (height, width) != (28, 28):
        raise ValueError(f"lenet5 expects 28x28 inputs, this data set has {height}x{width}")
    return MODELS[model_name](num_classes=num_classes, in_channels=channels)


def checkpoint_path(model_name: str, data_name: str, seed: int, cache_dir: Path = CACHE_DIR) -> Path:
    return Path(cache_dir) / f"{model_name}_{data_name}_seed{seed}.pt"


def load_or_train(model_name: str, data_name: str, epochs: int, seed: int = 0, *,
                  cifar_root: str | Path | None = None, retrain: bool = False,
                  progress: bool = False, cache_dir: Path = CACHE_DIR) -> Baseline:
    """The trained baseline ``model_name`` on ``data_name``, from the cache or trained now and cached.

    A cached checkpoint is used when its epochs, seed and recipe match; otherwise (or with
    ``retrain``) the model is trained with ``RECIPES[model_name]`` and the checkpoint rewritten.
    The returned model is on the CPU in eval mode.
    """
    recipe = RECIPES[model_name]
    path = checkpoint_path(model_name, data_name, seed, cache_dir)
    loader_kwargs = {"root": cifar_root} if data_name == "cifar10" else {}
    splits = load_dataset(data_name, **loader_kwargs)
    sample_shape = tuple(splits.test.tensors[0].shape[1:])
    num_classes = int(splits.train.tensors[1].max()) + 1

    if path.is_file() and not retrain:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if (saved.get("epochs"), saved.get("seed"), saved.get("recipe")) == (epochs, seed, recipe):
            model = build_model(model_name, sample_shape, num_classes)
            model.load_state_dict(saved["state_dict"])
            return Baseline(model.eval(), saved["test_accuracy"], path, saved["train_seconds"])

    torch.manual_seed(seed)
    model = build_model(model_name, sample_shape, num_classes)
    train_loader = DataLoader(splits.train, batch_size=recipe["batch_size"], shuffle=True,
                              generator=torch.Generator().manual_seed(seed))
    test_loader = DataLoader(splits.test, batch_size=EVAL_BATCH_SIZE)
    started = time.perf_counter()
    history = finetune(model, train_loader, epochs=epochs, optimizer=recipe["optimizer"],
                       lr=recipe["lr"], weight_decay=recipe["weight_decay"], progress=progress,
                       seed=seed)
    train_seconds = time.perf_counter() - started
    model = model.cpu().eval()
    test_accuracy = evaluate(model, test_loader)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "model": model_name, "data": data_name,
                "epochs": epochs, "seed": seed, "recipe": recipe, "history": history,
                "test_accuracy": test_accuracy, "train_seconds": train_seconds}, path)
    return Baseline(model, test_accuracy, path, train_seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--data", required=True, choices=sorted(DATASETS))
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cifar-root", help="folder containing cifar-10-batches-py (for --data cifar10)")
    parser.add_argument("--retrain", action="store_true", help="ignore a cached checkpoint")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="where checkpoints are kept")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    baseline = load_or_train(args.model, args.data, args.epochs, args.seed,
                             cifar_root=args.cifar_root, retrain=args.retrain,
                             progress=not args.no_progress, cache_dir=args.cache_dir)
    wall = time.perf_counter() - started
    print(f"{args.model} on {args.data}, seed {args.seed}, {args.epochs} epochs: "
          f"test accuracy {baseline.test_accuracy:.2%} (training took {baseline.train_seconds:.1f} s, "
          f"this run {wall:.1f} s) -> {baseline.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
