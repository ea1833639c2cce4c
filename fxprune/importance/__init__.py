"""Importance criteria: pure scorers ``(group, ctx) -> Tensor`` (lower = pruned first)."""
from .registry import ImportanceContext, available, get, register
from . import magnitude  # noqa: F401  registers l1, l2

__all__ = ["ImportanceContext", "available", "get", "register"]
