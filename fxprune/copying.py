"""A deep copy of a GraphModule's modules made without ``copy.deepcopy``'s generic machinery.

``copy.deepcopy`` reduces and rebuilds every attribute of every module; for the plain
``torch.nn`` modules that make up a network that is most of the rewrite's time. Here a module
whose class keeps the default copy protocol is rebuilt from its ``__dict__``: immutable values
are shared, parameters and buffers go through the memo (so a caller can map a tensor to its
replacement), submodules recurse, and any other value goes through ``copy.deepcopy`` with the
same memo. A class that customises copying or pickling is copied by ``copy.deepcopy`` itself.
"""
from __future__ import annotations

import collections
import copy
import enum
import functools
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

_IMMUTABLE = (int, float, bool, complex, str, bytes, type(None), type, torch.dtype, torch.device,
              torch.layout, torch.memory_format, enum.Enum)


_EMPTY_COPYABLE = frozenset((dict, collections.OrderedDict, set, list))
_TENSOR_TABLES = frozenset(("_parameters", "_buffers"))
_IMMUTABLE_TYPES = frozenset(t for t in _IMMUTABLE if t is not enum.Enum)


def _immutable(value: Any) -> bool:
    kind = type(value)
    if kind in _IMMUTABLE_TYPES:
        return True
    if kind is tuple:
        return all(_immutable(v) for v in value)
    return isinstance(value, _IMMUTABLE)


def _copied_tensor(tensor: torch.Tensor, memo: dict) -> torch.Tensor:
    hit = memo.get(id(tensor))
    return copy.deepcopy(tensor, memo) if hit is None else hit


@functools.lru_cache(maxsize=None)
def _default_protocol(cls: type) -> bool:
    """True when ``copy.deepcopy`` of an instance amounts to deep-copying its ``__dict__``.

    ``__setstate__`` methods defined by torch.nn itself (``_ConvNd``, the RNNs, ...) only fill
    in attributes that old pickles lack; a live instance has them all, so they count as default.
    """
    setstate = cls.__setstate__
    return (getattr(cls, "__deepcopy__", None) is None
            and cls.__getstate__ is nn.Module.__getstate__
            and (setstate is nn.Module.__setstate__ or getattr(setstate, "__module__", "").startswith("torch.nn."))
            and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__)


def copy_module(module: nn.Module, memo: dict) -> nn.Module:
    """What ``copy.deepcopy(module, memo)`` returns, built faster for default-protocol modules.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        >>> c = copy_module(m, {})
        >>> c[0] is not m[0], torch.equal(c[0].weight, m[0].weight), c[0].weight is m[0].weight
        (True, True, False)
    """
    hit = memo.get(id(module))
    if hit is not None:
        return hit
    cls = type(module)
    if not _default_protocol(cls):
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state = module.__dict__.copy()  # immutable values stay shared; every other one is replaced below
    for key, value in module.__dict__.items():
        kind = type(value)
        if kind in _IMMUTABLE_TYPES:
            continue
        if key in _TENSOR_TABLES:
            state[key] = {n: (None if t is None else _copied_tensor(t, memo)) for n, t in value.items()}
        elif key == "_modules":
            state[key] = {n: (None if c is None else copy_module(c, memo)) for n, c in value.items()}
        elif kind in _EMPTY_COPYABLE and not value:  # the hook tables of almost every module
            state[key] = kind()
        elif not _immutable(value):
            state[key] = copy.deepcopy(value, memo)
    new.__dict__.update(state)
    return new


def copy_graph_module(gm: fx.GraphModule, memo: dict | None = None, codegen: bool = True) -> fx.GraphModule:
    """A deep copy of ``gm`` as a plain ``torch.fx.GraphModule`` with its code generated (also
    when ``gm`` defers code generation); tensors found in ``memo`` (by id) are mapped as it says.
    ``codegen=False`` leaves code generation to the caller, who edits the graph and must call
    ``recompile()`` before the copy runs (one code generation instead of two).

    Example:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))
        >>> c = copy_graph_module(gm, {id(gm.get_submodule("0").weight): gm.get_submodule("0").weight})
        >>> c.get_submodule("0").weight is gm.get_submodule("0").weight, c.get_submodule("0") is gm.get_submodule("0")
        (True, False)
    """
    memo = {} if memo is None else memo
    for child in gm._modules.values():
        if child is not None:
            copy_module(child, memo)
    state = copy.deepcopy(gm.__dict__, memo)
    copied = fx.GraphModule.__new__(fx.GraphModule)  # a class of its own, as GraphModule() makes
    copied.__dict__.update(state)  # the module tree was copied whole: no attribute walk needed
    copied.__class__.__name__ = type(gm).__name__
    if codegen:
        copied.graph = state["_graph"]  # owning module, code generation
    else:
        copied._graph = state["_graph"]
        copied._graph.owning_module = copied
    return copied


def eval_copy(module: nn.Module) -> nn.Module:
    """A private deep copy of ``module`` in eval mode, sharing the plan a pruned module carries in
    ``meta["fxprune"]`` (read-only; copying it would copy the traced model and its graph too).

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2)).train()
        >>> c = eval_copy(m)
        >>> c is not m, c.training, m.training
        (True, False, True)
    """
    meta = getattr(module, "meta", None)
    plan = meta.get("fxprune") if isinstance(meta, dict) else None
    return copy.deepcopy(module, {} if plan is None else {id(plan): plan}).eval()
