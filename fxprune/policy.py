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
            For attention heads (kinds ``head``, ``kv-group``, ``query-heads``) it applies to the
            channel width, ``kept heads x head_dim``: the fewest heads whose q/k/v/o widths are all
            multiples of ``round_to``, rounded up; where no whole number of heads in the group
            allows that, the nearest whole number of heads at or above the rounded width is kept
            and the group's note says why.
        exact_only: prune only groups whose removal is exact (no channel-mixing op on the way).
        scope: ``"local"`` removes ``ratio`` of every group; ``"global"`` ranks all channels
            together after ``normalize`` and removes ``ratio`` of all removable channels.
        normalize: how scores are made comparable across groups in global scope:
            ``"mean"`` (score / group mean, default), ``"max"``, ``"lamp"`` (LAMP: s_i^2 over the
            sum of s_j^2 of channels at least as important), ``"none"``.
        flops: fraction of MACs to keep (e.g. 0.5); the ratio is then searched for (local:
            one ratio for all groups; global: one threshold) and ``ratio`` is ignored.
        params: fraction of parameters to keep, like ``flops`` (give at most one of the two).
        allocation: ``"uniform"``, or ``"cost"``: each group's share of the cut weighted by the
            MACs one of its channels costs (cheap-to-keep groups are cut less).
        latency: fraction of the measured latency to keep, predicted from a latency lookup table
            (``fxprune.latency_lut``) measured once per device and cached; ``device`` picks it.
        device: the device the latency table is measured on (``"cpu"`` or ``"cuda"``).
        overrides: ``{key: ratio}`` per layer, where key is a module type, a module-name pattern
            (``"layer4.*"``, fnmatch) or a module name. Precedence: policy < structures < type <
            pattern < name. A group takes the smallest override among its producers; an
            overridden group keeps its ratio when a budget is searched.
        structures: ``{kind: ratio}`` per group kind (``fxprune.group_kinds``): ``"channel"``
            (conv channels), ``"head"`` (attention heads), ``"kv-group"`` (a key/value head with
            the query heads sharing it), ``"hidden"`` (the residual stream / embedding width),
            ``"mlp"`` (a transformer MLP's intermediate width). Keys may be singular or plural
            (``"heads"``, ``"kv-groups"``). Kinds not named use ``ratio``; 0.0 leaves that kind
            whole. Named kinds keep their ratio in global scope (they are not ranked with the
            rest) and under a budget (the search sets the others), like overrides; module
            overrides beat them. ``fxprune.explain`` shows each group's kind.
            Grouped-query attention (Llama, Mistral, Qwen2) loses whole kv groups (a key/value
            head with its query heads) by default; naming ``"query-heads"`` instead removes the
            same number of query heads from every kv group and keeps every key/value head
            (``{"query-heads": 0.5}`` with 4 query heads per kv head: each kv group keeps 2;
            ``q_proj`` rows and ``o_proj`` columns go, ``repeat_kv``'s ``n_rep`` is rewritten).
            A count that does not split evenly is rounded up to one that does, with a note.
        prune_outputs: channels that reach a model output are kept by default (``False``): the
            width of every output stays what it was. ``True`` lets groups that reach an output
            be pruned too (that output then has fewer channels; ``fxprune.verify`` compares its
            kept channels); a list of output indices (position in the returned tuple/list) or
            names (keys of a returned dict / ``ModelOutput``) narrows only those outputs.

    Example:
        >>> p = Policy(importance="l1", ratio=0.5, round_to=8)
        >>> p.ratio
        0.5
        >>> Policy(ratio=1.5)
        Traceback (most recent call last):
        ...
        fxprune.errors.PolicyError: ratio must be in [0, 1]; got 1.5 (float)
        >>> Policy(exact_only="no")
        Traceback (most recent call last):
        ...
        fxprune.errors.PolicyError: exact_only must be True or False (a bool); got 'no' (str)
        >>> Policy(ratio=0.5, structures={"heads": 0.25, "mlp": 0.0}).structure_ratio("head")
        0.25
        >>> Policy(structures={"query_heads": 0.5}).structures   # GQA: query heads in every kv group
        (('query-heads', 0.5),)
        >>> Policy(prune_outputs=[1, "logits"]).prune_outputs
        (1, 'logits')
    """

    importance: Any = "l1"
    ratio: float = 0.5
    ignore: tuple = ()
    min_channels: int = 1
    round_to: int | None = None
    exact_only: bool = False
    scope: str = "local"
    normalize: str = "mean"
    flops: float | None = None
    params: float | None = None
    allocation: str = "uniform"
    overrides: Any = ()
    latency: float | None = None
    device: str = "cpu"
    structures: Any = ()
    prune_outputs: Any = False

    def __post_init__(self):
        for field, accepts, expected in _FIELD_RULES:
            value = getattr(self, field)
            if not accepts(value):
                raise PolicyError(f"{field} {expected}; got {_shown(value)}")
        if sum(getattr(self, f) is not None for f in ("flops", "params", "latency")) > 1:
            raise PolicyError("give one budget: flops, params or latency")
        object.__setattr__(self, "ignore", _checked_ignore(self.ignore))
        object.__setattr__(self, "overrides", _checked_overrides(self.overrides))
        object.__setattr__(self, "structures", _checked_structures(self.structures))
        object.__setattr__(self, "prune_outputs", _checked_prune_outputs(self.prune_outputs))
        if isinstance(self.importance, str):
            from .importance.registry import check_name
            check_name(self.importance)
        elif not callable(self.importance):
            raise PolicyError(f"importance must be a registered name (str) or a callable "
                              f"(group, ctx) -> scores; got {_shown(self.importance)}")

    @property
    def budget(self) -> tuple[str, float] | None:
        """``("macs", f)`` or ``("params", f)`` when a budget is set."""
        if self.flops is not None:
            return "macs", float(self.flops)
        if self.params is not None:
            return "params", float(self.params)
        if self.latency is not None:
            return "latency", float(self.latency)
        return None

    def override_for(self, module_name: str, module: torch.nn.Module | None) -> float | None:
        """The override ratio of one module by precedence name > pattern > type, or None.

        Example:
            >>> p = Policy(overrides={"layer4.*": 0.2, "layer4.0.conv1": 0.0, torch.nn.Linear: 0.1})
            >>> p.override_for("layer4.1.conv2", None), p.override_for("layer4.0.conv1", None)
            (0.2, 0.0)
        """
        import fnmatch
        by_type = by_pattern = None
        for key, ratio in self.overrides:
            if isinstance(key, str) and key == module_name:
                return float(ratio)
            if isinstance(key, str) and any(c in key for c in "*?[") and fnmatch.fnmatchcase(module_name, key):
                by_pattern = float(ratio) if by_pattern is None else by_pattern
            elif isinstance(key, type) and module is not None and isinstance(module, key):
                by_type = float(ratio) if by_type is None else by_type
        return by_pattern if by_pattern is not None else by_type

    def structure_ratio(self, kind: str) -> float | None:
        """The ratio ``structures`` gives groups of ``kind``, or None when the kind is not named.

        Example:
            >>> p = Policy(structures={"mlp": 0.0})
            >>> p.structure_ratio("mlp"), p.structure_ratio("head")
            (0.0, None)
        """
        return next((float(r) for k, r in self.structures if k == kind), None)

    def narrows_output(self, index: int, name: str | None = None) -> bool:
        """True when ``prune_outputs`` lets model output ``index`` (named ``name``) lose channels.

        Example:
            >>> Policy().narrows_output(0), Policy(prune_outputs=True).narrows_output(3)
            (False, True)
            >>> Policy(prune_outputs=["aux"]).narrows_output(1, "aux"), Policy(prune_outputs=[0]).narrows_output(1)
            (True, False)
        """
        from .coupling.outputs import narrowed
        return narrowed(self.prune_outputs, index, name)

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
        out["overrides"] = [[name(k), r] for k, r in self.overrides]
        out["structures"] = dict(self.structures)
        out["prune_outputs"] = self.prune_outputs if isinstance(self.prune_outputs, bool) else list(self.prune_outputs)
        return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fraction(v: Any) -> bool:
    return v is None or (_is_number(v) and 0.0 < float(v) <= 1.0)


def _one_of(*valid: str):
    return lambda v: isinstance(v, str) and v in valid


# (field, accepts(value), what it must be): checked in this order; ``importance``, ``ignore``
# and ``overrides`` have checks of their own (they are also normalised).
_FIELD_RULES = (
    ("ratio", _is_number, "must be a number (int or float) in [0, 1]"),
    ("ratio", lambda v: 0.0 <= float(v) <= 1.0, "must be in [0, 1]"),
    ("min_channels", lambda v: _is_int(v) and v >= 1, "must be an integer >= 1 (an int, not a bool)"),
    ("round_to", lambda v: v is None or (_is_int(v) and v >= 1),
     "must be None or an integer >= 1 (an int, not a bool)"),
    ("exact_only", lambda v: isinstance(v, bool), "must be True or False (a bool)"),
    ("scope", _one_of("local", "global"), "must be one of local, global"),
    ("normalize", _one_of("mean", "max", "lamp", "none"), "must be one of mean, max, lamp, none"),
    ("allocation", _one_of("uniform", "cost"), "must be one of uniform, cost"),
    ("flops", _fraction, "is the fraction to keep, in (0, 1], or None"),
    ("params", _fraction, "is the fraction to keep, in (0, 1], or None"),
    ("latency", _fraction, "is the fraction to keep, in (0, 1], or None"),
    ("device", lambda v: isinstance(v, str) and bool(v), "must be a device name such as 'cpu' or 'cuda'"),
)


def _shown(value: Any) -> str:
    """``repr`` of a rejected value with its type, so ``'no'`` and ``no`` are told apart."""
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _is_key(key: Any) -> bool:
    return isinstance(key, str) or (isinstance(key, type) and issubclass(key, torch.nn.Module))


def _checked_ignore(ignore: Any) -> tuple:
    """``ignore`` as a tuple of module names and ``torch.nn.Module`` subclasses."""
    if isinstance(ignore, str) or (isinstance(ignore, type) and issubclass(ignore, torch.nn.Module)):
        return (ignore,)
    if not isinstance(ignore, (tuple, list, set, frozenset)):
        raise PolicyError("ignore must be a module name, a torch.nn.Module subclass or a tuple/list "
                          f"of those (() for none); got {_shown(ignore)}")
    for item in ignore:
        if not _is_key(item):
            raise PolicyError("ignore entries must be module names (str) or torch.nn.Module "
                              f"subclasses; got {_shown(item)}")
    return tuple(ignore)


def _checked_overrides(overrides: Any) -> tuple:
    """``overrides`` as a tuple of ``(key, ratio)`` pairs."""
    expected = ("overrides must be a dict {module name, name pattern or torch.nn.Module subclass: "
                "ratio in [0, 1]} or a sequence of such (key, ratio) pairs")
    if isinstance(overrides, dict):
        pairs = tuple(overrides.items())
    elif isinstance(overrides, (tuple, list)):
        if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in overrides):
            raise PolicyError(f"{expected}; got {_shown(overrides)}")
        pairs = tuple(tuple(p) for p in overrides)
    else:
        raise PolicyError(f"{expected}; got {_shown(overrides)}")
    for key, ratio in pairs:
        if not _is_key(key):
            raise PolicyError("override keys are module names, name patterns or torch.nn.Module "
                              f"subclasses; got {_shown(key)}")
        if not (_is_number(ratio) and 0.0 <= float(ratio) <= 1.0):
            raise PolicyError(f"override ratio for {key!r} in overrides must be a number in [0, 1]; "
                              f"got {_shown(ratio)}")
    return pairs


def _checked_structures(structures: Any) -> tuple:
    """``structures`` as a tuple of ``(kind, ratio)`` pairs in ``KINDS`` order, keys spelled canonically."""
    from .group_kinds import KINDS, canonical_kind
    allowed = "channel(s), head(s), kv-group(s), hidden, mlp, query-heads"
    if isinstance(structures, dict):
        pairs = list(structures.items())
    elif isinstance(structures, (tuple, list)) and all(isinstance(p, (tuple, list)) and len(p) == 2
                                                       for p in structures):
        pairs = [tuple(p) for p in structures]
    else:
        raise PolicyError(f"structures must be a dict {{group kind: ratio in [0, 1]}} with kinds {allowed}; "
                          f"got {_shown(structures)}")
    found: dict[str, Any] = {}
    for key, ratio in pairs:
        kind = canonical_kind(key)
        if kind is None:
            raise PolicyError(f"structures: {_shown(key)} is no group kind; the kinds are {allowed}")
        if kind in found:
            raise PolicyError(f"structures names the kind {kind!r} twice ({key!r} and another spelling)")
        if not (_is_number(ratio) and 0.0 <= float(ratio) <= 1.0):
            raise PolicyError(f"structures ratio for {key!r} must be a number in [0, 1]; got {_shown(ratio)}")
        found[kind] = ratio
    return tuple((k, found[k]) for k in KINDS if k in found)


def _checked_prune_outputs(value: Any) -> bool | tuple:
    """``prune_outputs`` as a bool or a tuple of distinct output indices (int >= 0) and names (str)."""
    expected = ("prune_outputs must be True, False or a list of model output indices (int >= 0) "
                "or names (str)")
    if isinstance(value, bool):
        return value
    if not isinstance(value, (tuple, list)):
        raise PolicyError(f"{expected}; got {_shown(value)}")
    for item in value:
        if not ((_is_int(item) and item >= 0) or (isinstance(item, str) and item)):
            raise PolicyError(f"{expected}; the entry {_shown(item)} is neither")
    if len(set(value)) != len(value):
        raise PolicyError(f"prune_outputs names an output twice: {list(value)!r}")
    return tuple(value)


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
