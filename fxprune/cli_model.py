"""The model a command works on: built by name or ``module:factory``, weights loaded safely.

``module:factory`` is imported with the current folder first on ``sys.path`` (as ``python -m``
does), so ``fxprune prune mypkg.nets:small`` finds ``./mypkg/nets.py`` whether it runs as the
installed ``fxprune`` script or as ``python -m fxprune``. ``--state-dict`` is read with
``torch.load(weights_only=True)`` and compared key by key with the model before loading, so
weights of another architecture are one error naming the keys that differ.

Example:
    >>> import argparse
    >>> args = argparse.Namespace(model="resnet18", state_dict=None, input_size=32, input_shape=None, batch=2)
    >>> model, (x,) = load_model(args)
    >>> type(model).__name__, tuple(x.shape)
    ('ResNet', (2, 3, 32, 32))
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from typing import Any

import torch

from .cli_args import CliError

SHOWN = 4  # keys named per kind of difference


def build_model(name: str) -> torch.nn.Module:
    """A torchvision model by name (no weights are downloaded), a timm model name when timm is
    installed, or ``module:factory`` (``factory()`` is called with no arguments; the current
    folder is searched first for ``module``).

    Example:
        >>> type(build_model("resnet18")).__name__
        'ResNet'
    """
    if ":" in name:
        return _from_factory(name)
    import torchvision
    known = torchvision.models.list_models()
    if name not in known:
        try:
            import timm
        except ImportError:
            timm = None
        if timm is not None and name in timm.list_models():
            return timm.create_model(name, pretrained=False)
        raise CliError(f"unknown model {name!r}; give a torchvision model name ({', '.join(sorted(known))})"
                       + ("" if timm is None else ", any name of timm.list_models()")
                       + " or module:factory")
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, weights=None, **kwargs)


def _from_factory(name: str) -> torch.nn.Module:
    module_name, factory_name = name.split(":", 1)
    if not module_name or not factory_name:
        raise CliError(f"MODEL {name!r}: write module:factory, e.g. mypkg.nets:small_net")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:  # the installed script does not search the cwd
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise CliError(f"MODEL {name!r}: no module named {err.name!r} in the current folder ({cwd}) or on "
                           "sys.path; run fxprune from the folder that holds it, or add its folder to "
                           "PYTHONPATH") from None
        raise CliError(f"MODEL {name!r}: importing {module_name!r} failed: {err}; install what it needs") from err
    factory = getattr(module, factory_name, None)
    if factory is None or not callable(factory):
        found = "has no" if factory is None else "has a non-callable"
        raise CliError(f"MODEL {name!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) {found} "
                       f"attribute {factory_name!r}; name a function or class that builds the model")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"MODEL {name!r}: {factory_name}() returned {type(model).__name__}, not a "
                       "torch.nn.Module; make the factory return the model")
    return model


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``--state-dict`` file, read with ``torch.load(weights_only=True)``: a file
    that holds pickled code or objects is refused, not run. A checkpoint that wraps the weights
    under ``"state_dict"``, ``"model_state_dict"`` or ``"model"`` is unwrapped.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> torch.save({"state_dict": torch.nn.Linear(2, 1).state_dict(), "epoch": 3}, path)
        >>> sorted(read_state_dict(path))
        ['bias', 'weight']
    """
    if not os.path.exists(path):
        raise CliError(f"--state-dict {path}: the file does not exist")
    if os.path.isdir(path):
        raise CliError(f"--state-dict {path}: is a folder; give the file written by torch.save(model.state_dict())")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
        why = _why_unreadable(err)
        todo = ("copy or save it again" if why.startswith("the file is truncated") else
                "save the weights with torch.save(model.state_dict(), path) (if you trust a file holding a "
                "whole model, load it in Python and save its state_dict)")
        raise CliError(f"--state-dict {path}: cannot be read as weights only ({why}); {todo}") from None
    if isinstance(obj, dict) and not _all_tensors(obj):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict) and _all_tensors(obj[key]):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not _all_tensors(obj):
        what = type(obj).__name__ if not isinstance(obj, dict) else "a dict whose values are not all tensors"
        raise CliError(f"--state-dict {path}: holds {what}, not a state_dict; save it with "
                       "torch.save(model.state_dict(), path)")
    return obj


def _why_unreadable(err: Exception) -> str:
    """A short reason from torch.load's long weights-only error."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"(?:Unsupported global: |unsupported )GLOBAL ([\w.]+)", text)
    if found:
        return f"it holds pickled objects, not only tensors: {found.group(1)} would be imported and run"
    if "zip archive" in text or "central directory" in text or isinstance(err, EOFError):
        return "the file is truncated or corrupt"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(err).__name__}: {first[:160]}" if first else type(err).__name__


def _all_tensors(d: dict) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def _named(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN])
    return shown + (f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")


def check_state_dict(model: torch.nn.Module, state: dict, path: str, model_name: str) -> None:
    """Raise :class:`CliError` naming the missing, unexpected and mis-shaped keys when ``state``
    does not fit ``model``, and saying what to do.

    Example:
        >>> check_state_dict(torch.nn.Linear(2, 1), {"weight": torch.zeros(1, 3)}, "w.pt", "lin")
        Traceback (most recent call last):
        ...
        fxprune.cli_args.CliError: --state-dict w.pt does not fit MODEL 'lin' (...
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shaped):
        return
    parts = [f"{len(keys)} {kind}: {_named(keys)}" for kind, keys in
             (("missing", missing), ("unexpected", unexpected), ("with another shape (file vs model)", shaped))
             if keys]
    hint = ""
    if unexpected and all(k.startswith("module.") for k in unexpected):
        hint = " (the keys start with 'module.': strip that prefix, it comes from DataParallel/DDP)"
    raise CliError(f"--state-dict {path} does not fit MODEL {model_name!r} ({'; '.join(parts)}){hint}; the "
                   "weights belong to another architecture: give the MODEL they were trained for, or "
                   "weights saved from this one")


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, tuple]:
    """The model (eval mode, ``--state-dict`` loaded) and its example inputs from the shared arguments.

    Example:
        >>> args = argparse.Namespace(model="resnet18", state_dict=None, input_size=None,
        ...                           input_shape=[1, 3, 40, 48], batch=1)
        >>> tuple(load_model(args)[1][0].shape)
        (1, 3, 40, 48)
    """
    model = build_model(args.model).eval()
    if args.state_dict:
        state = read_state_dict(args.state_dict)
        check_state_dict(model, state, args.state_dict, args.model)
        model.load_state_dict(state)
    size = args.input_size or (299 if args.model == "inception_v3" else 224)
    x = torch.randn(args.batch, 3, size, size) if not args.input_shape else torch.randn(*args.input_shape)
    return model, (x,)


def load_pruned(path: str, trusted: bool) -> Any:
    """A pruned model saved by ``fxprune prune --out`` or :func:`fxprune.save`, in eval mode.

    A pickled module (``fxprune prune --format pickle``, ``torch.save(module)``) runs code stored in it
    while it is read: without ``trusted`` it is refused (:class:`CliError` saying to pass
    ``--trusted``). Files :func:`fxprune.load` reads without running code (its graph format)
    load either way.

    Example:
        >>> load_pruned("no/such/file.pt", trusted=False)
        Traceback (most recent call last):
        ...
        fxprune.cli_args.CliError: --pruned no/such/file.pt: the file does not exist
    """
    from fxprune import LoadError, load
    if not os.path.exists(path):
        raise CliError(f"--pruned {path}: the file does not exist")
    try:
        return load(path, trusted=trusted).eval()
    except LoadError as err:
        if trusted or "trusted" not in str(err):
            raise
        what = err.reason.split(";")[0]
        raise CliError(f"--pruned {path}: {what}; reading it would run that code, so it is refused: pass "
                       "--trusted if you made the file (e.g. with fxprune prune --out FILE --format pickle) or "
                       "trust its source") from None
