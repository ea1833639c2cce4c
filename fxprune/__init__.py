"""fxprune: structured channel pruning as a torch.fx compiler pass.

Example:
    >>> import fxprune, torch, torchvision
    >>> model = torchvision.models.resnet18()
    >>> x = torch.randn(1, 3, 64, 64)
    >>> pruned = fxprune.transform(model, fxprune.Policy(importance="l1", ratio=0.5), (x,))
    >>> fxprune.verify(pruned).ok
    True
"""
from ._version import __version__
from .api import plan, transform
from .atomic import DiskFullError
from .coupling.ops import register_module_rule
from .errors import (BudgetWarning, FxPruneError, InputError, ModelWarning, PolicyError, PolicyNameError,
                     StageError, TraceError, VerificationError)
from .exporters import ExportError, LoadError, SaveError, check_onnx, export, load, save
from .importance import ImportanceContext, register as register_importance
from .plan import Plan
from .recalibrate import recalibrate
from .policy import Policy
from .report import explain
from .rewrite import apply
from .serialize import (EditedWeightsWarning, PlanFormatError, PlanMismatchError, check_plan, load_plan,
                        rebuild, save_plan)
from .verify import verify

__all__ = [
    "__version__", "plan", "apply", "transform", "verify", "explain", "Policy", "Plan",
    "register_importance", "register_module_rule", "ImportanceContext", "FxPruneError",
    "TraceError", "InputError", "PolicyError", "StageError", "VerificationError",
    "export", "save", "load", "check_onnx", "ExportError", "LoadError",
    "save_plan", "load_plan", "rebuild", "PlanMismatchError", "recalibrate",
    "PolicyNameError", "BudgetWarning", "ModelWarning", "SaveError", "check_plan", "PlanFormatError",
    "EditedWeightsWarning", "DiskFullError",
]
