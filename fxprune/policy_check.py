"""Plan-time checks of a policy against one model: names in ``ignore`` and ``overrides`` must
name modules of the model.

A :class:`fxprune.Policy` does not know the model it will be used on, so a typo
(``ignore=("layer1.0.conv_1",)``) cannot be caught when it is built; ``fxprune.plan`` calls
:func:`check_names` before tracing. Module *types* matching nothing are not an error (a policy
may be written for several models); names and name patterns are.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Collection, Mapping

import torch

from .errors import PolicyNameError
from .input_check import inner_model


def _is_pattern(key: str) -> bool:
    return any(c in key for c in "*?[")


def _is_container(module: Any) -> bool:
    """A module with no parameter of its own whose children hold some (``layer1``, ``features``):
    ``ignore`` and ``overrides`` act on the module owning a weight, so naming it reaches nothing."""
    if not isinstance(module, torch.nn.Module) or next(module.parameters(recurse=False), None) is not None:
        return False
    return next(module.parameters(), None) is not None


def _close(key: str, names: list[str]) -> list[str]:
    return difflib.get_close_matches(key, names, n=3, cutoff=0.6)


def check_names(policy, modules: torch.nn.Module | Mapping[str, Any] | Collection[str]) -> None:
    """Raise :class:`fxprune.errors.PolicyNameError` when a name in ``policy.ignore`` or a name
    or pattern in ``policy.overrides`` matches no module of the model, or names a container.

    ``modules`` is the model (inside ``torch.compile``/``DataParallel`` wrappers), a mapping name -> module (``dict(model.named_modules())``) or a
    collection of names (containers are then not detected); anything else is not checked
    (tracing rejects a model that is no ``torch.nn.Module``). The error lists every offending entry with the
    closest module names (``difflib.get_close_matches``).

    Example:
        >>> import torch, fxprune
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
        >>> check_names(fxprune.Policy(ignore=("1",), overrides={"*": 0.2}), m)
        >>> check_names(fxprune.Policy(ignore=("l",)), m)
        Traceback (most recent call last):
        ...
        fxprune.errors.PolicyNameError: ignore: 'l' is no module of the model (module names look like '0', '1')
    """
    entries = [("ignore", item) for item in policy.ignore if isinstance(item, str)]
    entries += [("overrides", key) for key, _ in policy.overrides if isinstance(key, str)]
    if not entries:
        return  # nothing to look up (most policies): no walk of the model
    if isinstance(modules, torch.nn.Module):
        table = dict(inner_model(modules).named_modules())
    elif isinstance(modules, Mapping):
        table = dict(modules)
    elif isinstance(modules, (list, tuple, set, frozenset)):
        table = {name: None for name in modules}
    else:
        return
    table.pop("", None)  # the model itself
    names = list(table)
    problems: dict[str, list[str]] = {}
    lines: list[str] = []
    for field, key in entries:
        if field == "overrides" and _is_pattern(key):
            if any(fnmatch.fnmatchcase(name, key) for name in names):
                continue
            what = f"{field}: pattern {key!r} matches no module of the model"
        elif key in table:
            if not _is_container(table[key]):
                continue
            kind = type(table[key]).__name__
            inner = [n for n in names if n.startswith(key + ".") and not _is_container(table[n])][:3]
            fix = (f"use the pattern {key + '.*'!r}" if field == "overrides"
                   else "list the layers to keep, e.g. " + ", ".join(map(repr, inner)))
            lines.append(f"{field}: {key!r} is a {kind} that owns no weight of its own; {field} acts on "
                         f"the module owning a weight, not on its children: {fix}")
            problems[key] = inner
            continue
        else:
            what = f"{field}: {key!r} is no module of the model"
        close = _close(key, names)
        problems[key] = close
        hint = (f"did you mean {' or '.join(map(repr, close))}?" if close
                else "module names look like " + ", ".join(map(repr, names[:3])))
        lines.append(f"{what} ({hint})" if not close else f"{what}; {hint}")
    if lines:
        raise PolicyNameError("\n".join(lines), problems)
