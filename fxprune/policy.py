"""The pruning policy: a frozen, serialisable description of what to remove."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch

from .errors import PolicyError


@dataclasses.dataclass(frozen=True)
class Policy:
    """What to prune and how much.

    Args:
        importance: a registered criterion name (see ``fxprune.importance.available()``)
            or an object with ``__call__(group, ctx) -> Tensor`` scoring a group's channels.
        ratio: fraction of each group's channels to remove, in [0, 1].
        ignore: module names (``"layer1.0.conv1"``) or module types (``torch.nn.Linear``)
            whose output channels are never removed (their input channels may still shrink).
        min_channels: no group is left narrower than this (default 1).
        round_to: the kept width of every group is a multiple of this (``None``: no rounding).
        exact_only: prune only groups whose removal is exact (no channel-mixing op on the way).

    Example:
        >>> p = Policy(importance="l1", ratio=0.5, round_to=8)
        >>> p.ratio
        0.5
        >>> Policy(ratio=1.5)
        Traceback (most recent call last):
        ...
        fxprune.errors.PolicyError: ratio must be in [0, 1], got 1.5
    """

    importance: Any = "l1"
    ratio: float = 0.5
    ignore: tuple = ()
    min_channels: int = 1
    round_to: int | None = None
    exact_only: bool = False

    def __post_init__(self):
        if isinstance(self.ignore, (str, type)):
            object.__setattr__(self, "ignore", (self.ignore,))
        else:
            object.__setattr__(self, "ignore", tuple(self.ignore))
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
            raise PolicyError(f"ratio must be a number in [0, 1], got {self.ratio!r}")
        if not 0.0 <= float(self.ratio) <= 1.0:
            raise PolicyError(f"ratio must be in [0, 1], got {self.ratio!r}")
        if not isinstance(self.min_channels, int) or self.min_channels < 1:
            raise PolicyError(f"min_channels must be an integer >= 1, got {self.min_channels!r}")
        if self.round_to is not None and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise PolicyError(f"round_to must be None or an integer >= 1, got {self.round_to!r}")
        for item in self.ignore:
            if not (isinstance(item, str) or (isinstance(item, type) and issubclass(item, torch.nn.Module))):
                raise PolicyError(
                    f"ignore entries must be module names (str) or torch.nn.Module subclasses, got {item!r}")
        if isinstance(self.importance, str):
            from .importance.registry import check_name
            check_name(self.importance)
        elif not callable(self.importance):
            raise PolicyError(f"importance must be a registered name or a callable, got {self.importance!r}")

    def ignores(self, module_name: str, module: torch.nn.Module | None) -> bool:
        """True when ``module_name``/``module`` is listed in ``ignore``.

        Example:
            >>> Policy(ignore=("fc",)).ignores("fc", None)
            True
        """
        for item in self.ignore:
            if isinstance(item, str) and item == module_name:
                return True
            if isinstance(item, type) and module is not None and isinstance(module, item):
                return True
        return False

    def to_dict(self) -> dict:
        """A JSON-friendly description of the policy.

        Example:
            >>> Policy(ratio=0.25).to_dict()["ratio"]
            0.25
        """
        def name(x: Any) -> Any:
            if isinstance(x, type):
                return f"{x.__module__}.{x.__qualname__}"
            return x if isinstance(x, (str, int, float, bool, type(None))) else repr(x)
        out = dataclasses.asdict(self)
        out["importance"] = name(self.importance)
        out["ignore"] = [name(i) for i in self.ignore]
        return out


def kept_width(size: int, ratio: float, min_channels: int, round_to: int | None, floor: int = 0) -> int:
    """How many channels a group of ``size`` keeps under a ratio, rounding and minimum width.

    ``floor`` is the number of channels that cannot be removed (they reach an output, ...).

    Example:
        >>> kept_width(64, 0.5, 1, None)
        32
        >>> kept_width(64, 0.6, 1, 8)   # 25.6 kept -> rounded up to 32
        32
        >>> kept_width(4, 1.0, 1, None)
        1
    """
    import math
    keep = size - int(math.floor(ratio * size + 1e-9))
    keep = max(keep, min_channels, floor)
    if round_to and round_to > 1:
        keep = int(math.ceil(keep / round_to) * round_to)
    return min(keep, size)


def as_tuple(x: Iterable | Any) -> tuple:
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)
