"""Tied tensors in the rewrite: one tensor held under several names (``dec.weight = emb.weight``,
a buffer shared by two modules) is cut once and the same new tensor is put under every name, so
the pruned module keeps the tie and has no more parameters than the original.

Example:
    >>> import torch, fxprune
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 8, 1), torch.nn.ReLU(),
    ...                         torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(8, 2, 1))
    >>> m[3].weight = m[1].weight
    >>> pruned = fxprune.transform(m, fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 4, 4),))
    >>> pruned.get_submodule("3").weight is pruned.get_submodule("1").weight
    True
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..errors import StageError


def holders(modules: dict[str, nn.Module]) -> dict[int, list[tuple[nn.Module, str]]]:
    """``(owner, name)`` of every registered parameter/buffer held under several names, by the
    tensor's id (``modules``: a ``named_modules`` table).

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> m[1].weight = m[0].weight
        >>> [name for _, name in holders(dict(m.named_modules()))[id(m[0].weight)]]
        ['weight', 'weight']
    """
    table: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in modules.values():
        for name, t in (*m._parameters.items(), *m._buffers.items()):
            if t is not None:
                table.setdefault(id(t), []).append((m, name))
    return {k: v for k, v in table.items() if len(v) > 1}


def merge_cuts(modules: dict[str, nn.Module], slices: list) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """The cuts of every tensor under one of its names: tied names are coupled by the analysis,
    so they cut a dim at the same positions; names that disagree are a ``StageError``."""
    by_id: dict[Any, tuple[str, dict[int, torch.Tensor]]] = {}
    for target, dim, index in slices:
        path, _, name = target.rpartition(".")
        owner = modules[path]
        tensor = owner._parameters.get(name, owner._buffers.get(name))
        # registered tensors by identity; anything else (a parametrized tensor is computed anew
        # on every read, a plain attribute) by name
        first, cuts = by_id.setdefault(target if tensor is None else id(tensor), (target, {}))
        if dim in cuts and not torch.equal(cuts[dim], index):
            raise StageError("rewrite", None, f"{target} and {first} are one tensor but were planned "
                                              f"to lose different positions of dim {dim}")
        cuts[dim] = index
    return {target: sorted(cuts.items()) for target, cuts in by_id.values()}


def share(tied: dict[int, list[tuple[nn.Module, str]]], old: torch.Tensor, owner: nn.Module,
          name: str) -> list[nn.Module]:
    """Put ``owner.name`` (the replacement of ``old``) under every other name of ``old``; returns
    the other owners (their size attributes need fixing too)."""
    new = getattr(owner, name)
    others = []
    for m, n in tied.get(id(old), ()):
        if m is owner and n == name:
            continue
        table = m._parameters if n in m._parameters else m._buffers
        table[n] = new
        others.append(m)
    return others
