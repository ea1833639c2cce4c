"""The importance registry: criteria by name, including passes installed through entry points."""
from __future__ import annotations

import dataclasses
from importlib.metadata import entry_points
from typing import Any, Callable, Iterable

import torch

from ..errors import PolicyError

ENTRY_POINT_GROUP = "fxprune.importance"
_REGISTRY: dict[str, Callable] = {}
_loaded_entry_points = False


@dataclasses.dataclass
class ImportanceContext:
    """What a criterion may read: the traced original, all groups, example inputs, calibration data.

    Example:
        >>> ctx = ImportanceContext(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)), [], ())
        >>> ctx.param("weight").shape
        torch.Size([2, 2])
    """

    module: torch.fx.GraphModule
    groups: list
    example_inputs: tuple
    calibration: Iterable | None = None
    loss_fn: Callable | None = None
    policy: Any = None
    options: dict = dataclasses.field(default_factory=dict)
    edits: dict = dataclasses.field(default_factory=dict)
    modules: dict | None = dataclasses.field(default=None, repr=False)  # module's named_modules, if known

    def param(self, target: str) -> torch.Tensor:
        """A parameter or buffer of the traced original, by qualified name (never edited)."""
        path, _, name = target.rpartition(".")
        owners = self.modules
        if owners is None:  # the traced module does not change while criteria read it
            owners = self.modules = dict(self.module.named_modules())
        owner = owners.get(path)
        return getattr(owner if owner is not None else self.module.get_submodule(path), name)

    def current(self, target: str) -> torch.Tensor:
        """The parameter with the edits made so far by this plan's criterion (see ``plan.edits``)."""
        return self.edits[target] if target in self.edits else self.param(target)


def register(name: str, fn: Callable | None = None):
    """Register a criterion under ``name`` (usable as a decorator).

    Example:
        >>> @register("ones_example")
        ... def ones(group, ctx):
        ...     return torch.ones(group.size)
        >>> "ones_example" in available()
        True
    """
    def deco(f: Callable) -> Callable:
        _REGISTRY[name] = f
        return f
    return deco(fn) if fn is not None else deco


def _load_entry_points() -> None:
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY:
            try:
                _REGISTRY[ep.name] = ep.load()
            except Exception as err:  # a broken plugin must not break the others
                _REGISTRY.setdefault(f"{ep.name}", _broken(ep.name, err))


def _broken(name: str, err: Exception) -> Callable:
    def fail(group, ctx):
        raise PolicyError(f"importance {name!r} failed to load: {type(err).__name__}: {err}")
    return fail


def available() -> list[str]:
    """Names of all registered criteria.

    Example:
        >>> "l1" in available()
        True
    """
    _load_entry_points()
    return sorted(_REGISTRY)


def check_name(name: str) -> None:
    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY:
        raise PolicyError(f"unknown importance {name!r}; registered: {', '.join(available())}")


def get(importance: Any) -> Callable:
    """The criterion for a name or a callable.

    Example:
        >>> get("l1").__name__
        'l1'
    """
    if callable(importance):
        return importance
    check_name(importance)
    return _REGISTRY[importance]
