"""Training-time pruning and fine-tuning, for a plain PyTorch loop (no trainer framework).

* ``DynamicPruner``: dynamic filter pruning with a straight-through forward, optional filter
  decorrelation (``DecorrelationRegularizer``);
* ``C2S2Pruner``: cost-aware channel sparse selection with per-group gates;
* ``NetworkSlimming`` / ``SlimmingRegularizer``: L1 on norm scales, then ``bn_scale`` pruning;
* ``finetune`` / ``evaluate``: a few epochs of SGD/AdamW with a cosine schedule, accuracy.

Each pruner wraps a model and a ``fxprune.Policy``; in the loop add ``pruner.regularizer()`` to
the loss and call ``pruner.step()`` after ``optimizer.step()``; ``pruner.finalize()`` returns the
physically pruned ``torch.fx.GraphModule`` through ``fxprune.plan``/``fxprune.apply``, so
``fxprune.verify`` holds. Under ``torch.distributed`` masks and gates are identical on all ranks.
"""
from .c2s2 import C2S2Pruner
from .decorrelation import DecorrelationRegularizer, filter_correlation
from .dynamic import DynamicPruner
from .finetune import evaluate, finetune
from .slimming import NetworkSlimming, SlimmingRegularizer, bn_scale_importance

__all__ = ["finetune", "evaluate", "DynamicPruner", "DecorrelationRegularizer", "filter_correlation",
           "C2S2Pruner", "NetworkSlimming", "SlimmingRegularizer", "bn_scale_importance"]
