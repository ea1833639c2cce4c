"""What every criterion of this package shares: named options with defaults, a per-plan cache,
errors for missing data; and the LAMP-style normalisation used by the ``lamp`` criterion."""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch

import fxprune

_CACHE: dict[int, tuple[weakref.ref, dict]] = {}


class DataRequiredError(fxprune.FxPruneError, ValueError):
    """A criterion needs calibration data (or a loss function) that the plan was not given.

    Example:
        >>> issubclass(DataRequiredError, fxprune.FxPruneError)
        True
    """


def cached(ctx, key: Any, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per importance context (one plan) and ``key``; later calls reuse it.

    Criteria that look at the whole network (global normalisation, calibration statistics)
    compute once for all groups. The cache entry dies with the context.

    Example:
        >>> ctx = fxprune.ImportanceContext(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)), [], ())
        >>> cached(ctx, "answer", lambda: 42), cached(ctx, "answer", lambda: 0)
        (42, 42)
    """
    entry = _CACHE.get(id(ctx))
    if entry is None or entry[0]() is not ctx:
        _CACHE[id(ctx)] = entry = (weakref.ref(ctx, lambda _r, k=id(ctx): _CACHE.pop(k, None)), {})
    store = entry[1]
    if key not in store:
        store[key] = compute()
    return store[key]


def lamp(scores: torch.Tensor) -> torch.Tensor:
    """LAMP-style normalisation: ``s_c**2 / sum of s_j**2 over every j ranked at or above c``.

    Order within a group is kept (ties go to the lower index first, as in selection), and
    the values become comparable across groups of different sizes and scales (Lee et al.,
    ICLR 2021, applied to channel scores). Negative scores are first shifted so the minimum is 0.

    Example:
        >>> lamp(torch.tensor([1.0, 3.0, 2.0]))
        tensor([0.0714, 1.0000, 0.3077], dtype=torch.float64)
    """
    s = scores.detach().to(torch.float64).reshape(-1)
    if s.numel() == 0:
        return s
    s = s - s.min().clamp(max=0)
    order = sorted(range(s.numel()), key=lambda c: (s[c].item(), c))
    sq = s[order] ** 2
    tail = sq.flip(0).cumsum(0).flip(0)
    out = torch.empty_like(s)
    out[order] = sq / tail.clamp(min=torch.finfo(torch.float64).tiny)
    return out


class Criterion:
    """Base of the criteria in this package: ``criterion(group, ctx) -> Tensor[group.size]``.

    Subclasses set ``name``, ``defaults`` (every option and its default; options come from
    ``fxprune.plan(..., importance_options={...})``) and optionally ``choices`` (allowed values),
    and implement ``score(group, ctx)``.

    Example:
        >>> class Ones(Criterion):
        ...     name, defaults = "ones", {"scale": 1.0}
        ...     def score(self, group, ctx):
        ...         return torch.ones(group.size) * self.option(ctx, "scale")
        >>> Ones().option(fxprune.ImportanceContext(None, [], (), options={"scale": 2.0}), "scale")
        2.0
    """

    name: str = "criterion"
    defaults: dict[str, Any] = {}
    choices: dict[str, tuple] = {}

    @property
    def __name__(self) -> str:  # registries and reports name criteria by __name__
        return self.name

    def option(self, ctx, key: str) -> Any:
        """The option ``key`` from ``ctx.options`` or its default, checked against ``choices``."""
        if key not in self.defaults:
            raise KeyError(f"{self.name}: no option {key!r}")
        value = (ctx.options or {}).get(key, self.defaults[key])
        allowed = self.choices.get(key)
        if allowed is not None and value not in allowed:
            raise fxprune.PolicyError(
                f"importance {self.name!r}: option {key}={value!r} is not one of {', '.join(map(repr, allowed))}")
        return value

    def score(self, group, ctx) -> torch.Tensor:
        """Scores of ``group``'s channels, lower = removed first (implemented by each criterion)."""
        raise NotImplementedError

    def __call__(self, group, ctx) -> torch.Tensor:
        return torch.as_tensor(self.score(group, ctx), dtype=torch.float64).reshape(-1)

    def __repr__(self) -> str:
        return f"<importance {self.name!r}>"
