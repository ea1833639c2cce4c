"""Training helpers for use after pruning: ``finetune`` a model and ``evaluate`` its accuracy."""
from .finetune import evaluate, finetune

__all__ = ["finetune", "evaluate"]
