"""Collectives for training-time pruning under ``torch.distributed`` (DDP); no-ops in one process.

Masks and gates must be identical on every rank, or the ranks would prune different channels and
DDP would average gradients of different architectures. The pruners therefore all-reduce
data-dependent scores (:func:`all_reduce_mean_`), average their own parameters that DDP does not
see (C2S2 gates), and broadcast every decision from rank 0 (:func:`broadcast_`).

Example:
    >>> import torch
    >>> t = torch.tensor([1.0, 2.0])
    >>> all_reduce_mean_(t) is t, broadcast_([t])[0] is t   # one process: unchanged
    (True, True)
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _through_backend(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """A tensor the backend accepts: bool goes as uint8; CPU tensors stay on the CPU (gloo)."""
    dtype = tensor.dtype
    work = tensor.to(torch.uint8) if dtype == torch.bool else tensor
    if dist.get_backend() == "nccl" and work.device.type != "cuda":
        work = work.cuda()
    return work, dtype


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over all ranks, in place; returns it.

    Example:
        >>> all_reduce_mean_(torch.ones(2))
        tensor([1., 1.])
    """
    if not is_distributed():
        return tensor
    work, _ = _through_backend(tensor)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    work /= dist.get_world_size()
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0) -> list[torch.Tensor]:
    """Overwrite every tensor with rank ``src``'s value, in place (bool tensors included).

    Example:
        >>> broadcast_([torch.tensor([True, False])])
        [tensor([ True, False])]
    """
    tensors = list(tensors)
    if not is_distributed():
        return tensors
    for tensor in tensors:
        work, dtype = _through_backend(tensor)
        dist.broadcast(work, src=src)
        if work is not tensor:
            tensor.copy_(work.to(dtype))
    return tensors


def all_reduce_scores_(scores: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Average per-group importance scores over all ranks (one collective per group, sorted by
    group id so every rank issues the same sequence)."""
    for gid in sorted(scores):
        all_reduce_mean_(scores[gid])
    return scores


def mean_scalar(value: float) -> float:
    """The mean of a Python float over all ranks (e.g. the task loss of a window of steps)."""
    if not is_distributed():
        return float(value)
    return float(all_reduce_mean_(torch.tensor([float(value)], dtype=torch.float64))[0])
