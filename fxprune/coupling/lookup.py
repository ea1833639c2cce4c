"""The op table as the rules see it.

A rule sometimes asks which rule another node has (is the next op elementwise? does it move
dims?). The table (``ops.py``) imports every rule module, so a rule module importing the table
back would make an import cycle; instead ``ops.py`` installs its lookups here when it loads,
and rules read them through this module, which imports nothing of fxprune.

Example:
    >>> import fxprune.coupling.ops  # installs the table
    >>> from fxprune.coupling import lookup
    >>> import torch.nn.functional as F
    >>> lookup.function_rule(F.relu) is not None
    True
"""
from __future__ import annotations

from typing import Any, Callable

_TABLE: dict[str, Any] = {}


def install(**entries: Any) -> None:
    """Called by ``ops.py``: ``rule_for``, ``FUNCTION_RULES``, ``METHOD_RULES``, ``MODULE_RULES``,
    ``elementwise_rules`` (see ``is_elementwise``), ``param_use`` (the module)."""
    _TABLE.update(entries)


def _get(key: str) -> Any:
    if key not in _TABLE:
        raise RuntimeError("fxprune.coupling.ops is not loaded: rules run from fxprune.coupling.build.analyse")
    return _TABLE[key]


def rule_for(an: Any, node: Any) -> Callable | None:
    """The rule of ``node`` (``ops.rule_for``)."""
    return _get("rule_for")(an, node)


def function_rule(target: Any) -> Callable | None:
    """The row of a function target in the function table, or None."""
    return _get("FUNCTION_RULES").get(target)


def method_rule(name: str) -> Callable | None:
    """The row of a method name in the method table, or None."""
    return _get("METHOD_RULES").get(name)


def param_use() -> Any:
    """``fxprune.coupling.param_use`` (linear/elementwise readers of computed parameters)."""
    return _get("param_use")


def module_rules() -> dict:
    """The module-type table (``ops.MODULE_RULES``)."""
    return _get("MODULE_RULES")


def layout_rule(name: str) -> Callable:
    """A layout rule by method name (``"permute"``, ``"transpose"``), for rules that follow moved dims."""
    return _get("METHOD_RULES")[name]


def is_elementwise(rule: Any) -> bool:
    """``rule`` keeps every element where it is: the broadcasting elementwise rule, or a copy or
    cast (``clone``, ``.float()``, ``.to(dtype)``: a parameter's own table, else elementwise)."""
    return rule in _get("elementwise_rules")
