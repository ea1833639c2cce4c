"""Stage 6: build the pruned GraphModule."""
from .apply import apply

__all__ = ["apply"]
