"""Errors raised by fxprune. Every error names what failed and what to do about it."""
from __future__ import annotations


class FxPruneError(Exception):
    """Base class of every fxprune error.

    Example:
        >>> try:
        ...     raise FxPruneError("something went wrong")
        ... except FxPruneError as err:
        ...     str(err)
        'something went wrong'
    """


class TraceError(FxPruneError):
    """The model could not be traced by ``torch.fx``.

    Example:
        >>> issubclass(TraceError, FxPruneError)
        True
    """


class InputError(FxPruneError, ValueError):
    """The example inputs were rejected by the model (the model's own message is kept)."""


class PolicyError(FxPruneError, ValueError):
    """A policy value is invalid; the message lists the valid choices."""


class StageError(FxPruneError):
    """A pipeline stage failed; the message names the stage and the node.

    Example:
        >>> str(StageError("coupling", "conv1", "boom"))
        "stage 'coupling' failed at node 'conv1': boom"
    """

    def __init__(self, stage: str, node: str | None, why: str):
        self.stage, self.node, self.why = stage, node, why
        where = f" at node {node!r}" if node else ""
        super().__init__(f"stage {stage!r} failed{where}: {why}")


class VerificationError(FxPruneError):
    """The pruned model does not match the mask oracle, or its shapes are not the planned ones."""
