"""What the coupling stage knows about each value and parameter."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torch.fx as fx

from .units import UnitTable
from ..shapes import shape


@dataclasses.dataclass(frozen=True)
class ChannelInfo:
    """The channel dim of a tensor value and the unit behind each position along it."""

    dim: int
    units: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ParamRef:
    """A parameter or buffer fetched with ``get_attr`` (its channel dims are decided by its users)."""

    target: str


@dataclasses.dataclass
class ParamSlice:
    """One dim of one parameter/buffer that shrinks with channel units.

    ``role`` is "producer" (rows that make channels), "consumer" (columns that contract
    over channels) or "passenger" (per-channel values: norms, biases, PReLU, ...).
    """

    target: str
    dim: int
    role: str
    units: tuple[int, ...]
    owner: str  # the module (or get_attr target) that owns it


@dataclasses.dataclass(frozen=True)
class ParamExpr:
    """A tensor computed from parameters keeping the rows of ``sources`` apart.

    ``row_dim`` is where the rows lie in this value (None: no rows, a constant); ``sources`` are
    ``(parameter, dim of its rows, start)``: rows ``start, start + 1, ...`` of this value come from
    that parameter's rows in order; ``literals`` are ``(node name, kind, entry, start, count)``: a literal
    at ``entry`` of ``node``'s shape or size holding the count of rows ``start .. start + count``
    (``kind`` the rewriter in ``fxprune.rewrite.literals``: ``"shape_entry"`` for a reshape,
    ``"creation_size"`` for ``torch.zeros``); ``mixes`` says why the entries of a row are mixed
    (None: they are not).

    Example:
        >>> e = ParamExpr((4, 3), 0, (("w", 0, 0),))
        >>> e.rows
        4
    """

    shape: tuple
    row_dim: int | None
    sources: tuple = ()
    literals: tuple = ()
    mixes: str | None = None

    @property
    def rows(self) -> int:
        return 1 if self.row_dim is None else self.shape[self.row_dim]


class Analysis:
    """Mutable state of the coupling stage, shared by the op rules.

    Example:
        >>> a = Analysis(torch.fx.symbolic_trace(torch.nn.Identity()))
        >>> a.units.new_atom(("out", "x", 1), 2, "input")
        (0, 1)
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.units = UnitTable()
        self.info: dict[str, Any] = {}
        self.params: dict[tuple[str, int], ParamSlice] = {}
        self.frozen_params: dict[str, str] = {}
        self.modules = dict(gm.named_modules())
        self.blocked_ops: list[tuple[str, str]] = []
        self.resized: dict[str, str] = {}
        self.mask_sites: set[tuple[str, int]] = set()
        self.module_widths: dict[str, tuple[int, ...]] = {}
        self.literals: dict[str, tuple[str, Any]] = {}
        # A contraction's second channel dim, left for its one user (a contraction) to settle:
        # node -> (dim, units, why they are pinned if it cannot); see contraction_rules.contract_labels
        self.deferred: dict[str, tuple[int, tuple[int, ...], str]] = {}
        self.second_dims: dict[str, tuple[int, tuple[int, ...]]] = {}  # every such dim that was settled
        self.prune_outputs: Any = False  # Policy.prune_outputs: which model outputs may lose channels
        self._aliases: dict[str, tuple[str, ...]] | None = None

    # -- values -------------------------------------------------------------------------
    def value(self, arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            return self.info.get(arg.name)
        return None

    def tensor_info(self, arg: Any) -> ChannelInfo | None:
        v = self.value(arg)
        return v if isinstance(v, ChannelInfo) else None

    def fresh(self, node: fx.Node, out_shape: Any, kind: str, reason: str | None = None, dim: int | None = None) -> Any:
        """New units for every tensor in ``out_shape`` (pinned with ``reason`` when given)."""
        if isinstance(out_shape, tuple) and all(isinstance(d, int) for d in out_shape):
            if len(out_shape) == 0:
                return None
            d = dim if dim is not None else (1 if len(out_shape) >= 2 else 0)
            units = self.units.new_atom(("out", node.name, d), out_shape[d], kind)
            if reason:
                self.units.pin(units, reason)
            return ChannelInfo(d, units)
        if isinstance(out_shape, (tuple, list)):
            return type(out_shape)(self.fresh(node, s, kind, reason) for s in out_shape)
        if isinstance(out_shape, dict):
            return {k: self.fresh(node, s, kind, reason) for k, s in out_shape.items()}
        return None

    def pin_value(self, value: Any, reason: str) -> None:
        """Pin every unit reachable in a (nested) value; freeze get_attr parameters."""
        if isinstance(value, ChannelInfo):
            self.units.pin(value.units, reason)
        elif isinstance(value, ParamRef):
            self.frozen_params.setdefault(value.target, reason)
        elif isinstance(value, (tuple, list)):
            for v in value:
                self.pin_value(v, reason)
        elif isinstance(value, dict):
            for v in value.values():
                self.pin_value(v, reason)

    def pin_args(self, node: fx.Node, reason: str) -> None:
        for arg in node.all_input_nodes:
            self.pin_value(self.value(arg), reason)
            self.settle_deferred(arg.name)
        if node.op == "output":  # the last node: every use of every parameter has been seen
            self.tie_aliases()

    def settle_deferred(self, name: str | None = None) -> None:
        """Pin the deferred second channel dim of node ``name`` (of every node when None) with
        its reason: a deferral nobody took up is never left removable."""
        for key in [name] if name is not None else list(self.deferred):
            entry = self.deferred.pop(key, None)
            if entry is not None:
                self.units.pin(entry[1], entry[2])

    # -- parameters ---------------------------------------------------------------------
    def slice_param(self, target: str, dim: int, role: str, units: Sequence[int], owner: str, why: str) -> None:
        """Declare that ``target``'s ``dim`` follows ``units``; a second declaration couples them,
        and so does a declaration of a tied name of the same tensor (``dec.weight = emb.weight``)."""
        key = (target, dim)
        units = tuple(units)
        if key in self.params:
            prior = self.params[key]
            self.units.union(prior.units, units, "shared", f"{target} used at several places ({why})")
            if prior.role != role and "producer" in (prior.role, role):
                prior.role = "producer"
        else:
            self.params[key] = ParamSlice(target, dim, role, units, owner)
        for other in self.aliases().get(target, ()):
            if other != target and (other, dim) in self.params:
                self.units.union(self.params[(other, dim)].units, units, "shared",
                                 f"{target} and {other} are one tensor ({why})")

    def aliases(self) -> dict[str, tuple[str, ...]]:
        """Every name of each parameter/buffer that has several (tied weights), by name.

        Example:
            >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
            >>> m[1].weight = m[0].weight
            >>> Analysis(torch.fx.symbolic_trace(m)).aliases()["1.weight"]
            ('0.weight', '1.weight')
        """
        if self._aliases is None:
            names: dict[int, list[str]] = {}
            for prefix, m in self.modules.items():
                for name, t in (*m._parameters.items(), *m._buffers.items()):
                    if t is not None:
                        names.setdefault(id(t), []).append(f"{prefix}.{name}" if prefix else name)
            self._aliases = {n: tuple(group) for group in names.values() if len(group) > 1 for n in group}
        return self._aliases

    def tie_aliases(self) -> None:
        """Once every node is seen: a tied tensor is sliced once for all its names, so a dim that
        one name slices and another used name does not (its op reads the whole tensor, e.g. an
        opaque ``nn.Embedding`` sharing a decoder's weight) is pinned, and a name frozen by an op
        fxprune cannot slice freezes every name of the tensor."""
        aliases = self.aliases()
        if not aliases:
            return
        used = {n.target for n in self.gm.graph.nodes if n.op in ("call_module", "get_attr")}
        for group in set(aliases.values()):
            frozen = next((self.frozen_params[n] for n in group if n in self.frozen_params), None)
            dims = {d for (t, d) in self.params if t in group}
            for n in group:
                if frozen is not None:
                    self.frozen_params.setdefault(n, frozen)
                parts = n.split(".")
                if not any(".".join(parts[:i]) in used for i in range(1, len(parts) + 1)):
                    continue  # no node reads this name: nothing to keep consistent with
                for d in dims:
                    if (n, d) not in self.params:
                        owner = next(o for o in group if (o, d) in self.params)
                        self.units.pin(self.params[(owner, d)].units,
                                       f"{owner} is tied to {n}, whose user reads all of dim {d}")

    def size_module(self, target: str, units: Sequence[int], why: str) -> None:
        """Declare that module ``target``'s size attributes follow ``units`` (needed when it has
        no tensor to slice, e.g. ``GroupNorm(affine=False)``); a second call couples them."""
        units = tuple(units)
        if target in self.module_widths:
            self.units.union(self.module_widths[target], units, "shared", f"{target} called at several places ({why})")
        else:
            self.module_widths[target] = units

    def rewrite_literal(self, node: fx.Node | str, kind: str, payload: Any) -> None:
        """Ask the rewrite to update a literal argument of ``node`` (a node or its name; see
        ``fxprune.rewrite.literals``)."""
        self.literals[node if isinstance(node, str) else node.name] = (kind, payload)

    def mask_at(self, target: str, dim: int) -> None:
        """Channels that no node output shows (inside a leaf module or a wrapped function, e.g.
        attention q/k/v) are masked at their producer: the oracle zeroes the removed positions
        of ``target`` along ``dim`` (declared with ``slice_param`` first)."""
        self.mask_sites.add((target, dim))

    def producer_units(self, target: str, dim: int, size: int, key: Any) -> tuple[int, ...]:
        """The output units of a producer weight: new ones, or the existing ones of a shared module."""
        if (target, dim) in self.params:
            return self.params[(target, dim)].units
        return self.units.new_atom(key, size, "producer")

    def param_tensor(self, target: str) -> torch.Tensor:
        """The tensor at ``target`` ("path.to.module.name"), read from the module table (rules ask
        for the same few tensors many times; ``get_submodule`` walks the path every time)."""
        path, _, name = target.rpartition(".")
        owner = self.modules.get(path)
        if owner is None:
            owner = self.gm.get_submodule(path)
        if name in owner._parameters:
            return owner._parameters[name]
        if name in owner._buffers:
            return owner._buffers[name]
        return getattr(owner, name)

    def shape(self, node: fx.Node) -> Any:
        return shape(node)
