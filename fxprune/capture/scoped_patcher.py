"""torch.fx's module patches, made on the traced model's own module classes.

While ``torch.fx.Tracer.trace`` runs it replaces ``nn.Module.__call__`` and ``__getattr__`` (to
see submodule calls and parameter reads), and puts them back afterwards. Assigning an attribute
of a class makes CPython invalidate the attribute caches of the class and of every subclass:
``nn.Module`` has one subclass per layer class imported in the process (~1,300 with timm loaded,
~1,650 with transformers and ultralytics too), so those four assignments cost 5-7 ms a trace,
as much as tracing a small network.

``scoped_module_patches(classes)`` makes the same patches on ``classes`` instead: the types of
the modules of the model being traced that inherit ``nn.Module``'s ``__call__``/``__getattr__``
(a class defining its own is not reached by torch.fx's patch either). Each is undone by deleting
the class's own attribute again, so the class inherits ``nn.Module``'s as before. A module whose
class is not in the model (one built inside ``forward``) is then traced through instead of
being recorded as a call.

Example:
    >>> import torch
    >>> from fxprune.capture.fx_trace import LeafTracer
    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> before = torch.nn.Module.__dict__["__call__"]
    >>> with scoped_module_patches((torch.nn.Sequential, torch.nn.Linear)):
    ...     graph = torch.fx.Tracer().trace(m)
    >>> [n.op for n in graph.nodes], torch.nn.Module.__dict__["__call__"] is before
    (['placeholder', 'call_module', 'output'], True)
    >>> "__call__" in torch.nn.Linear.__dict__
    False
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch.fx._symbolic_trace as _st
import torch.nn as nn

_MODULE_PATCHES = ("__call__", "__getattr__")


class _PatchedClassAttr(_st._PatchedFn):
    """``new_fn`` set on a class that inherits ``fn_name``; reverting deletes it again."""

    def revert(self) -> None:
        if self.fn_name in vars(self.frame_dict):  # idempotent: the patcher may revert twice
            delattr(self.frame_dict, self.fn_name)

    def patch(self) -> None:
        setattr(self.frame_dict, self.fn_name, self.new_fn)


class _ScopedPatcher(_st._Patcher):
    """torch.fx's ``_Patcher`` whose patches of ``nn.Module`` go to ``classes`` instead."""

    def __init__(self, classes: tuple) -> None:
        super().__init__()
        self.classes = classes

    def patch_method(self, cls: type, name: str, new_fn: Callable[..., Any], deduplicate: bool = True) -> None:
        if cls is not nn.Module or name not in _MODULE_PATCHES:
            return super().patch_method(cls, name, new_fn, deduplicate)
        inherited = getattr(nn.Module, name)
        for c in self.classes:
            if getattr(c, name) is inherited:  # torch.fx's patch of nn.Module would reach it
                self.patches_made.append(_PatchedClassAttr(c, name, inherited, new_fn))
                self.patches_made[-1].patch()


@contextlib.contextmanager
def scoped_module_patches(classes: Iterable[type]) -> Iterator[None]:
    """While inside, torch.fx traces patch ``classes`` (module types) instead of ``nn.Module``
    itself (see the module docstring). Callers serialise traces (fxprune's capture lock): the
    switch is made on torch.fx's module, as its own patches are.

    Example:
        >>> import torch
        >>> with scoped_module_patches([nn.ReLU]):
        ...     gm = torch.fx.symbolic_trace(nn.ReLU())
        >>> "__call__" in nn.ReLU.__dict__
        False
    """
    scoped = tuple(c for c in dict.fromkeys(classes) if isinstance(c, type) and issubclass(c, nn.Module))
    original = _st._new_patcher

    @contextlib.contextmanager
    def new_patcher() -> Iterator[_st._Patcher]:  # torch.fx's _new_patcher, with the scoped patcher
        prior = _st.CURRENT_PATCHER
        patcher = _ScopedPatcher(scoped)
        _st.CURRENT_PATCHER = patcher
        try:
            yield patcher
        finally:
            patcher.revert_all_patches()
            _st.CURRENT_PATCHER = prior

    _st._new_patcher = new_patcher
    try:
        yield
    finally:
        _st._new_patcher = original


__all__ = ["scoped_module_patches"]
