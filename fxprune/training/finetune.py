"""Fine-tuning and accuracy evaluation for classification models, e.g. to recover accuracy after a prune."""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

Batch = Sequence[Any]
EpochCallback = Callable[[int, nn.Module, dict], Any]
Regularizer = Callable[[nn.Module], torch.Tensor]

DEFAULT_LR = {"sgd": 0.01, "adamw": 1e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 1e-2}


def finetune(model: nn.Module, train_loader: Iterable[Batch], epochs: int = 1,
             optimizer: str = "sgd", lr: float | None = None, weight_decay: float | None = None,
             momentum: float = 0.9,
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
             device: str | torch.device = "cpu", eval_loader: Iterable[Batch] | None = None,
             on_epoch_end: EpochCallback | None = None, regularizer: Regularizer | None = None,
             progress: bool = True, seed: int | None = None) -> list[dict]:
    """Train ``model`` in place with a cosine learning-rate schedule and return per-epoch metrics.

    Each batch is ``(inputs, targets, ...)``; the loss is ``loss_fn(model(inputs), targets)``, plus
    ``regularizer(model)`` when given (a scalar tensor, e.g. an L1 penalty on BN scales). The learning
    rate starts at ``lr`` and follows a half cosine down to 0 over all ``epochs * len(train_loader)``
    steps. ``optimizer`` is ``"sgd"`` (with ``momentum``) or ``"adamw"``; ``lr`` and ``weight_decay``
    default to ``DEFAULT_LR`` / ``DEFAULT_WEIGHT_DECAY`` for it. ``seed`` seeds torch's global
    generator first, which also fixes a shuffling ``DataLoader``'s order. The model is moved to
    ``device`` and left in training mode.

    Each epoch's dict has ``epoch`` (1-based), ``loss`` (mean total loss), ``lr`` (after the epoch's
    last step), ``seconds``, plus ``regularizer`` (its mean) when given and ``eval_accuracy`` when
    ``eval_loader`` is given. ``on_epoch_end(epoch, model, metrics)`` is then called; returning
    ``True`` stops training early.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> x = torch.randn(256, 2); y = (x[:, 0] > 0).long()
        >>> loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
        >>> model = torch.nn.Linear(2, 2)
        >>> history = finetune(model, loader, epochs=3, lr=0.1, eval_loader=loader, progress=False, seed=0)
        >>> history[-1]["eval_accuracy"] > 0.9
        True
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if seed is not None:
        torch.manual_seed(seed)
    steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    if steps_per_epoch == 0:
        raise ValueError("train_loader is empty")
    device = torch.device(device)
    model.to(device)
    opt = _make_optimizer(model, optimizer, lr, weight_decay, momentum)
    total_steps = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cosine_factor(step, total_steps))

    history: list[dict] = []
    for epoch in range(1, epochs + 1):
        model.train()
        started = time.perf_counter()
        loss_sum = regularizer_sum = 0.0
        bar = tqdm(train_loader, total=steps_per_epoch, desc=f"epoch {epoch}/{epochs}",
                   disable=not progress, leave=False)
        for step, batch in enumerate(bar, start=1):
            inputs, targets = _to_device(batch[0], device), _to_device(batch[1], device)
            loss = loss_fn(model(inputs), targets)
            if regularizer is not None:
                penalty = regularizer(model)
                loss = loss + penalty
                regularizer_sum += float(penalty.detach())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch}, step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            loss_sum += float(loss.detach())
            if progress:
                bar.set_postfix(loss=f"{loss_sum / step:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        bar.close()
        metrics: dict[str, Any] = {"epoch": epoch, "loss": loss_sum / steps_per_epoch,
                                   "lr": opt.param_groups[0]["lr"]}
        if regularizer is not None:
            metrics["regularizer"] = regularizer_sum / steps_per_epoch
        if eval_loader is not None:
            metrics["eval_accuracy"] = evaluate(model, eval_loader, device=device)
        metrics["seconds"] = time.perf_counter() - started
        history.append(metrics)
        if on_epoch_end is not None and on_epoch_end(epoch, model, metrics) is True:
            break
    return history


def evaluate(model: nn.Module, loader: Iterable[Batch], device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` over ``loader``'s ``(inputs, targets, ...)`` batches, in [0, 1].

    Runs in eval mode without gradients, then restores every submodule's previous training flag.
    The model must already be on ``device``.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> x = torch.randn(64, 2); y = (x[:, 0] > 0).long()
        >>> model = torch.nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]])); _ = model.bias.zero_()
        >>> evaluate(model, DataLoader(TensorDataset(x, y), batch_size=16))
        1.0
    """
    device = torch.device(device)
    training_flags = [(module, module.training) for module in model.modules()]
    correct = seen = 0
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                inputs, targets = _to_device(batch[0], device), _to_device(batch[1], device)
                predictions = model(inputs).argmax(dim=1)
                correct += int((predictions == targets).sum())
                seen += targets.numel()
    finally:
        for module, flag in training_flags:
            module.training = flag
    if seen == 0:
        raise ValueError("loader yielded no samples")
    return correct / seen


def cosine_factor(step: int, total_steps: int) -> float:
    """Multiplier of the base learning rate after ``step`` of ``total_steps``: 1 at 0, 0 at the end."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def _make_optimizer(model: nn.Module, name: str, lr: float | None, weight_decay: float | None,
                    momentum: float) -> torch.optim.Optimizer:
    name = name.lower()
    if name not in DEFAULT_LR:
        raise ValueError(f"optimizer must be one of {sorted(DEFAULT_LR)}, got {name!r}")
    lr = DEFAULT_LR[name] if lr is None else lr
    weight_decay = DEFAULT_WEIGHT_DECAY[name] if weight_decay is None else weight_decay
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(item, device) for item in value)
    return value
