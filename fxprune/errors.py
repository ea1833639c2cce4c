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


class ModelError(FxPruneError, ValueError):
    """The model has a feature fxprune cannot prune exactly (hooks, legacy spectral/weight norm,
    some parametrizations, quantized modules, meta tensors); raised before capture.

    ``problems`` lists ``(where, what to do)`` for each module found.

    Example:
        >>> err = ModelError("cannot prune", [("'conv' (Conv2d)", "forward hooks ...")])
        >>> isinstance(err, FxPruneError), err.problems[0][0]
        (True, "'conv' (Conv2d)")
    """

    def __init__(self, message: str, problems: list | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


class ModelWarning(UserWarning):
    """The model has a feature fxprune keeps but cannot analyse (forward hooks on leaf modules:
    they are copied into the pruned model and run there on fewer channels).

    Example:
        >>> issubclass(ModelWarning, UserWarning)
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


class PolicyNameError(PolicyError):
    """A module name or name pattern in ``Policy.ignore`` / ``Policy.overrides`` matches no module
    of the model (or names a container, whose children it would not reach).

    ``problems`` maps each offending entry to the closest module names of the model.

    Example:
        >>> err = PolicyNameError("ignore names 'fc2', no module of the model", {"fc2": ["fc"]})
        >>> isinstance(err, PolicyError), err.problems
        (True, {'fc2': ['fc']})
    """

    def __init__(self, message: str, problems: dict | None = None):
        super().__init__(message)
        self.problems = dict(problems or {})


class BudgetWarning(UserWarning):
    """A ``flops``/``params``/``latency`` budget could not be met; the message says what was
    asked, what was reached and why. ``plan.selection["met"]`` is then False.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warnings.warn("params budget not met", BudgetWarning)
        >>> caught[0].category.__name__
        'BudgetWarning'
    """


class BlockedWarning(UserWarning):
    """More than half of a plan's prunable channels are blocked; the message names the first op
    to teach fxprune and how (``fxprune.blocked``). Raised by ``fxprune.explain`` and the CLI.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warnings.warn("more than half of the prunable channels are blocked", BlockedWarning)
        >>> caught[0].category.__name__
        'BlockedWarning'
    """
