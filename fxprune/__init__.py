"""fxprune: structured channel pruning as a torch.fx compiler pass.

Example:
    >>> import fxprune, torch, torchvision
    >>> model = torchvision.models.resnet18()
    >>> x = torch.randn(1, 3, 64, 64)
    >>> pruned = fxprune.transform(model, fxprune.Policy(importance="l1", ratio=0.5), (x,))
    >>> fxprune.verify(pruned).ok
    True

``import fxprune`` itself is light (it does not import torch): each public name is imported from
its module the first time it is used (PEP 562), so the ``fxprune`` command
(:mod:`fxprune.launcher`) can start, and be interrupted while it imports torch, without a
traceback. ``from fxprune import transform`` and ``fxprune.transform`` work as usual.
"""
import importlib
import sys
import types

from ._version import __version__

_EXPORTS = {  # public name: the module (relative to fxprune) that defines or re-exports it
    "plan": "api", "transform": "api",
    "DiskFullError": "atomic",
    "register_module_rule": "coupling.ops",
    "BlockedWarning": "errors", "BudgetWarning": "errors", "FxPruneError": "errors", "InputError": "errors",
    "ModelWarning": "errors",
    "PolicyError": "errors", "PolicyNameError": "errors", "StageError": "errors", "TraceError": "errors",
    "VerificationError": "errors",
    "ExportError": "exporters", "LoadError": "exporters", "SaveError": "exporters", "check_onnx": "exporters",
    "export": "exporters", "load": "exporters", "save": "exporters",
    "ImportanceContext": "importance", "register_importance": ("importance", "register"),
    "Plan": "plan",
    "recalibrate": "recalibrate",
    "Policy": "policy",
    "explain": "report",
    "apply": "rewrite",
    "EditedWeightsWarning": "serialize", "PlanFormatError": "serialize", "PlanMismatchError": "serialize",
    "check_plan": "serialize", "load_plan": "serialize", "rebuild": "serialize", "save_plan": "serialize",
    "verify": "verify",
}

__all__ = [
    "__version__", "plan", "apply", "transform", "verify", "explain", "Policy", "Plan",
    "register_importance", "register_module_rule", "ImportanceContext", "FxPruneError",
    "TraceError", "InputError", "PolicyError", "StageError", "VerificationError",
    "export", "save", "load", "check_onnx", "ExportError", "LoadError",
    "save_plan", "load_plan", "rebuild", "PlanMismatchError", "recalibrate",
    "PolicyNameError", "BudgetWarning", "ModelWarning", "SaveError", "check_plan", "PlanFormatError",
    "EditedWeightsWarning", "DiskFullError", "BlockedWarning",
]


def __getattr__(name: str):
    """A public name, imported from its module on first use (then cached); else a submodule."""
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    where = _EXPORTS.get(name)
    if where is not None:
        module, attribute = (where, name) if isinstance(where, str) else where
        value = getattr(importlib.import_module(f".{module}", __name__), attribute)
        globals()[name] = value  # straight into the dict: _Package.__setattr__ guards the rest
        return value
    try:  # `import fxprune; fxprune.errors` worked when __init__ imported everything: keep it
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps ``fxprune.plan``, ``fxprune.verify`` and ``fxprune.recalibrate`` the functions: importing
    the submodules of the same names would otherwise bind the modules over them."""

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
