"""Example inputs against the model's ``forward`` signature, checked before tracing.

An extra positional input is otherwise dropped without a word, and a missing one surfaces
later as a stage error far from its cause.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

from .errors import InputError

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def inner_model(model: Any) -> Any:
    """The model inside ``torch.compile``, ``nn.DataParallel`` and ``DistributedDataParallel``
    wrappers (the one fxprune traces), so its signature and module names are the user's.

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> inner_model(torch.nn.DataParallel(lin)) is lin
        True
    """
    while isinstance(model, torch.nn.Module):
        if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None),
                                                                     torch.nn.Module):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            break
    return model


def _signature(model: torch.nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):  # builtins, C extensions: nothing to check against
        return None


def check_arity(model: torch.nn.Module, inputs: tuple, concrete_args: dict | None = None) -> None:
    """Raise :class:`fxprune.InputError` when ``inputs`` (positional example inputs) do not fit
    ``model.forward``: more than it takes, or fewer than its required positional parameters.

    Parameters fixed by ``concrete_args`` are not counted; a ``*args`` parameter accepts any
    number of extra inputs; a signature that cannot be read is not checked.

    Example:
        >>> import torch
        >>> check_arity(torch.nn.Linear(2, 2), (torch.zeros(1, 2),))
        >>> check_arity(torch.nn.Linear(2, 2), (torch.zeros(1, 2), torch.zeros(1, 2)))
        Traceback (most recent call last):
        ...
        fxprune.errors.InputError: 2 example inputs given, but Linear.forward(input) takes 1 positional input; pass a tuple of one input per positional parameter
    """
    model = inner_model(model)
    sig = _signature(model) if isinstance(model, torch.nn.Module) else None
    if sig is None:  # not a module (tracing says so) or a signature that cannot be read
        return
    fixed = set(concrete_args or ())
    params = [p for p in sig.parameters.values() if p.name not in fixed]
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        most = None
    else:
        most = sum(p.kind in _POSITIONAL for p in params)
    required = [p for p in params if p.kind in _POSITIONAL and p.default is inspect.Parameter.empty]
    required_kw = [p.name for p in params
                   if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty]
    shown = f"{type(model).__name__}.forward{_plain(sig)}"
    given = len(inputs)
    advice = "pass a tuple of one input per positional parameter"
    if most is not None and given > most:
        raise InputError(f"{given} example input{'s' * (given != 1)} given, but {shown} takes {most} "
                         f"positional input{'s' * (most != 1)}; {advice}")
    if given < len(required):
        missing = ", ".join(p.name for p in required[given:])
        raise InputError(f"{given} example input{'s' * (given != 1)} given, but {shown} needs "
                         f"{len(required)} (missing: {missing}); {advice}, or fix arguments with "
                         "concrete_args={'name': value}")
    if required_kw:
        raise InputError(f"{shown} has required keyword-only parameter(s) {', '.join(required_kw)}, "
                         "which example inputs cannot pass: give them with concrete_args={'name': value}")


def _plain(sig: inspect.Signature) -> str:
    """The signature as written, without annotations (shorter messages)."""
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))
