"""Checks on the user's model before capture: what tracing would drop or fxprune cannot slice.

Tracing keeps the computation of ``forward`` only. Some model features live outside it and
would be lost silently (forward hooks on the root or on an inlined submodule), or rebuild a
tensor on every call from tensors fxprune does not slice (legacy ``spectral_norm`` /
``weight_norm``, parametrizations without ``right_inverse``), or are not float channels at all
(FX-quantized models, parameters on the ``meta`` device). ``check_model`` refuses all of them
with one ``ModelError`` that names each module and what to do; ``unwrap`` takes the model out
of ``torch.compile``, ``DataParallel`` and ``DistributedDataParallel`` wrappers.

Example:
    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> check_model(unwrap(torch.nn.DataParallel(m))) is None
    True
"""
from __future__ import annotations

import functools
import warnings
from typing import Iterable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import ModelError, ModelWarning

_QUANTIZED_PACKAGES = ("torch.ao.nn.quantized", "torch.ao.nn.qat", "torch.ao.nn.intrinsic.qat",
                       "torch.ao.nn.intrinsic.quantized", "torch.nn.quantized", "torch.nn.qat",
                       "torch.nn.intrinsic.qat", "torch.nn.intrinsic.quantized", "torch.ao.quantization")
_REMOVE_PARAMETRIZATION = ("torch.nn.utils.parametrize.remove_parametrizations(module, {name!r}, "
                           "leave_parametrized=True)")


def _wrapped(model: nn.Module) -> nn.Module | None:
    """The module a wrapper holds, or None when ``model`` is no known wrapper."""
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        return model._orig_mod
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` (``OptimizedModule._orig_mod``), ``nn.DataParallel`` and
    ``DistributedDataParallel`` (``.module``) wrappers, through any nesting of them.

    A wrapper with forward hooks of its own is refused (``ModelError``): they would be dropped.

    Example:
        >>> import torch
        >>> inner = torch.nn.Linear(2, 2)
        >>> unwrap(torch.nn.DataParallel(inner)) is inner, unwrap(inner) is inner
        (True, True)
    """
    while isinstance(model, nn.Module):
        inner = _wrapped(model)
        if inner is None:
            return model
        problems = list(_hook_problems(model, f"the {type(model).__name__} wrapper", dropped=True))
        if problems:
            raise ModelError(_message(problems), problems)
        model = inner
    return model


def _hook_names(hooks: dict) -> str:
    names = [getattr(h, "__qualname__", None) or type(h).__name__ for h in hooks.values()]
    return ", ".join(names)


def _hook_problems(module: nn.Module, where: str, dropped: bool) -> Iterator[tuple[str, str]]:
    """(module, problem) for each kind of forward hook on ``module``."""
    tables = (("forward hook", module._forward_hooks), ("forward pre-hook", module._forward_pre_hooks))
    for kind, hooks in tables:
        hooks = {k: h for k, h in hooks.items() if not getattr(h, "fxprune_mask_hook", False)}
        if not hooks:
            continue
        if dropped:
            yield where, (f"{kind}s {_hook_names(hooks)}: tracing inlines this module's forward and "
                          "drops its hooks; remove them (handle.remove()) before pruning and register "
                          "them again on the pruned model if needed")
        else:
            yield where, (f"{kind}s {_hook_names(hooks)} are kept and run on the pruned module, with "
                          "fewer channels; fxprune cannot see what they compute (a hook holding "
                          "per-channel values fails on the first call): remove them before pruning "
                          "if they depend on the channel count")


def _legacy_reparametrization(module: nn.Module) -> str | None:
    """The advice for a legacy ``spectral_norm``/``weight_norm`` pre-hook, or None."""
    if not module._forward_pre_hooks:
        return None
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, SpectralNorm):
            return (f"legacy torch.nn.utils.spectral_norm on {hook.name!r} rebuilds it from "
                    f"{hook.name}_orig on every call; call torch.nn.utils.remove_spectral_norm(module, "
                    f"{hook.name!r}) first and apply spectral norm again to the pruned model if you "
                    "train it further")
        if isinstance(hook, WeightNorm):
            return (f"legacy torch.nn.utils.weight_norm on {hook.name!r} rebuilds it from "
                    f"{hook.name}_g and {hook.name}_v on every call; call torch.nn.utils."
                    f"remove_weight_norm(module, {hook.name!r}) first, or use "
                    "torch.nn.utils.parametrizations.weight_norm, which fxprune prunes exactly")
    return None


def _parametrization_problems(module: nn.Module) -> Iterator[str]:
    """Parametrizations fxprune cannot slice exactly: one without ``right_inverse`` cannot take
    a sliced tensor; spectral norm and orthogonal maps change the values of a sliced tensor."""
    if "parametrizations" not in module._modules:  # where parametrize registers them (most modules: none)
        return
    from torch.nn.utils import parametrizations as P
    from torch.nn.utils import parametrize
    if not parametrize.is_parametrized(module):
        return
    for name, plist in module.parametrizations.items():
        for p in plist:
            fix = _REMOVE_PARAMETRIZATION.format(name=name)
            if isinstance(p, (P._SpectralNorm, P._Orthogonal)):
                what = "has another spectral norm" if isinstance(p, P._SpectralNorm) else "is not orthogonal"
                yield (f"parametrization {type(p).__name__} of {name!r}: a sliced tensor {what}, so "
                       f"pruning would change the kept channels; call {fix} first")
            elif not hasattr(p, "right_inverse"):
                yield (f"parametrization {type(p).__name__} of {name!r} has no right_inverse, so the "
                       f"pruned tensor cannot be assigned to it; add right_inverse or call {fix} first")


@functools.lru_cache(maxsize=None)
def _quantized_type(cls: type) -> bool:
    """An observer, fake-quantize or quantized/QAT module class (read once per class)."""
    from torch.ao.quantization import FakeQuantizeBase, ObserverBase
    if issubclass(cls, (ObserverBase, FakeQuantizeBase)):
        return True
    path = cls.__module__
    return any(path == p or path.startswith(p + ".") for p in _QUANTIZED_PACKAGES)


def _own_tensor_kinds(module: nn.Module) -> tuple[bool, bool]:
    """(a parameter or buffer of the module's own is quantized, one is on the meta device)."""
    quantized = meta = False
    for table in (module._parameters, module._buffers):
        for t in table.values():
            if isinstance(t, torch.Tensor):
                quantized, meta = quantized or t.is_quantized, meta or t.is_meta
    return quantized, meta


def _module_problems(model: nn.Module, leaf_modules: Iterable, kept: list, found: dict) -> Iterator[tuple[str, str]]:
    """Problems module by module, in one walk; ``found["meta"]`` says whether some module holds
    a tensor on the meta device (named by ``_meta_problems``)."""
    leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
    leaf_names = {m for m in leaf_modules if isinstance(m, str)}
    tracer = None  # made for the first hooked module (most models have none)
    for name, module in model.named_modules():
        hooked = module._forward_hooks or module._forward_pre_hooks
        quantized, meta = _own_tensor_kinds(module)
        found["meta"] = found["meta"] or meta
        quantized = quantized or _quantized_type(type(module))
        if not (hooked or quantized or "parametrizations" in module._modules):
            continue  # the common case: nothing to check further, nothing to name
        where = f"{name!r} ({type(module).__name__})" if name else f"the model ({type(module).__name__})"
        if quantized:
            yield where, ("quantized, QAT or observer module: fxprune prunes float models; prune the "
                          "float model first, then quantize the pruned one")
            continue
        legacy = _legacy_reparametrization(module)
        if legacy is not None:
            yield where, legacy
            continue
        for problem in _parametrization_problems(module):
            yield where, problem
        if not hooked:
            continue  # no hooks to keep or drop: whether it is a leaf does not matter
        tracer = fx.Tracer() if tracer is None else tracer
        leaf = bool(name) and (name in leaf_names or (leaf_types and isinstance(module, leaf_types))
                               or tracer.is_leaf_module(module, name))
        if leaf:
            kept.extend(_hook_problems(module, where, dropped=False))
        else:
            yield from _hook_problems(module, where, dropped=True)


def _meta_problems(model: nn.Module) -> Iterator[tuple[str, str]]:
    names = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        yield "the model", (f"parameters/buffers on the 'meta' device have no values ({shown}); "
                            "materialise them first, e.g. model.to_empty(device='cpu') then "
                            "model.load_state_dict(weights)")


def _global_hook_problems() -> Iterator[tuple[str, str]]:
    from torch.nn.modules import module as M
    for kind, hooks in (("forward hook", M._global_forward_hooks),
                        ("forward pre-hook", M._global_forward_pre_hooks)):
        if hooks:
            yield "every module", (f"global {kind}s {_hook_names(hooks)} (torch.nn.modules.module."
                                   f"register_module_{kind.replace(' ', '_').replace('-', '_')}): "
                                   "tracing drops them; remove them before pruning")


def _message(problems: list[tuple[str, str]]) -> str:
    lines = [f"  {where}: {what}" for where, what in problems[:10]]
    more = [f"  ... and {len(problems) - 10} more"] if len(problems) > 10 else []
    return "\n".join(["fxprune cannot prune this model exactly as it is:", *lines, *more])


def check_model(model: nn.Module, leaf_modules: Iterable = ()) -> None:
    """Refuse, with one ``ModelError`` naming every module and what to do, a model whose pruned
    copy would silently compute something else or crash on its first call:

    - forward hooks and pre-hooks on the root and on inlined submodules (tracing drops them),
      and global forward hooks;
    - legacy ``torch.nn.utils.spectral_norm`` / ``weight_norm`` (pre-hooks that rebuild the
      weight); parametrizations without ``right_inverse``, spectral-norm and orthogonal ones
      (``parametrizations.weight_norm`` and invertible custom ones prune exactly);
    - quantized, QAT and observer modules (FX or eager quantization);
    - parameters or buffers on the ``meta`` device.

    Forward hooks on leaf modules are kept (the traced and the pruned module call them, so the
    mask oracle sees them) but fxprune cannot see what they compute: a ``ModelWarning`` names
    them. ``leaf_modules`` are the types or names the tracer keeps as leaves (besides torch.nn's).

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> _ = m.register_forward_hook(lambda mod, args, out: out * 2)
        >>> try:
        ...     check_model(m)
        ... except ModelError as err:
        ...     print(err.problems[0][0])
        the model (Sequential)
    """
    if not isinstance(model, nn.Module):
        return  # the capture stage says what it expected
    kept: list[tuple[str, str]] = []
    found = {"meta": False}
    by_module = list(_module_problems(model, leaf_modules, kept, found))
    problems = [*(_meta_problems(model) if found["meta"] else ()), *_global_hook_problems(), *by_module]
    if problems:
        raise ModelError(_message(problems), problems)
    if kept:
        warnings.warn(ModelWarning("\n".join(["forward hooks on leaf modules:",
                                                *(f"  {where}: {what}" for where, what in kept)])),
                      stacklevel=2)
