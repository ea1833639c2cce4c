"""Where a coupling group's channels can be switched off (masks) or scaled (gates) in a user's model.

A group's channels are made by its producers, carried by its passengers and member tensors, and
read by its consumers (see ``fxprune.coupling.groups``). Two placements are offered, both with
forward hooks on the user's modules:

* ``"exit"`` (masks of dynamic pruning): the channels are scaled where they leave the group, at
  the inputs of the modules that read them (forward pre-hooks on the consumers). Everything
  inside the group stays dense: norms see the dense conv output, so their statistics stay
  meaningful, and with the straight-through estimator the gradient reaches every producer,
  norm and bias of a masked channel through the activations (a mask before a ReLU would stop
  it: ``relu'(0) = 0``). A group whose channels leave through a function (not a module) or
  through a module called at several places falls back to ``"affine"``.
* ``"affine"`` (gates of C2S2): the output of the *last* affine module on the channel's path is
  scaled (the BatchNorm after a conv; the conv itself when no norm follows), which equals
  scaling that module's per-channel parameters, so gates fold exactly (``fold_targets``).
  Parameters used functionally (``F.conv2d(x, self.weight)``) or owned by a module called at
  several places are scaled through ``torch.nn.utils.parametrize`` on their channel rows.

``ChannelSites.detach()`` takes every hook and parametrization off again.

Example:
    >>> import fxprune, torch
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
    ...                         torch.nn.Conv2d(4, 2, 1))
    >>> p = fxprune.plan(m, fxprune.Policy(ratio=0.0), (torch.randn(1, 1, 6, 6),))
    >>> sorted(ChannelSites(p, m, [p.groups[0]], placement="affine").modules)   # the norm, not the conv
    ['1']
    >>> sorted(ChannelSites(p, m, [p.groups[0]], placement="exit").inputs)      # the reader
    ['3']
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

# (per-channel factor of a group, straight-through?) or None when the group is left untouched
Provider = Callable[[int], Optional[tuple[torch.Tensor, bool]]]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)
_AFFINE = (nn.modules.conv._ConvNd, nn.Linear)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (the model otherwise)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def foldable(module: nn.Module) -> bool:
    """True when scaling the module's output per channel equals scaling its own parameters."""
    if isinstance(module, _AFFINE):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(module, _NORMS) and weight is not None and weight.dim() == 1


def owner_and_name(model: nn.Module, target: str) -> tuple[nn.Module, str]:
    *path, name = target.split(".")
    return (model.get_submodule(".".join(path)) if path else model), name


def dense_tensor(model: nn.Module, target: str) -> torch.Tensor:
    """A parameter or buffer by qualified name, without any parametrization applied."""
    owner, name = owner_and_name(model, target)
    if parametrize.is_parametrized(owner, name):
        return owner.parametrizations[name].original
    return getattr(owner, name)


@dataclasses.dataclass(frozen=True)
class Site:
    """One group's channels at one place: tensor positions along ``dim`` and the group channel of each."""

    gid: int
    dim: int
    positions: torch.Tensor
    channels: torch.Tensor


def _site(gid: int, dim: int, positions, channels) -> Site:
    return Site(gid, dim, torch.tensor(positions, dtype=torch.long), torch.tensor(channels, dtype=torch.long))


def _factor(sites: list[Site], provider: Provider, size: int, like: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """The per-position factor vector of one tensor dim (ones where no site applies)."""
    vec, ste = None, False
    for s in sites:
        got = provider(s.gid)
        if got is None:
            continue
        values, straight = got
        vec = torch.ones(size, dtype=like.dtype, device=like.device) if vec is None else vec
        src = values.to(device=like.device, dtype=like.dtype)[s.channels.to(like.device)]
        vec = vec.index_copy(0, s.positions.to(like.device), src)
        ste = ste or straight
    return None if vec is None else (vec, ste)


def scale(tensor: torch.Tensor, dim: int, vec: torch.Tensor, ste: bool) -> torch.Tensor:
    """``tensor * vec`` along ``dim``; with ``ste`` the backward pass ignores the factor."""
    dim = dim % tensor.dim()
    shape = [1] * tensor.dim()
    shape[dim] = -1
    scaled = tensor * vec.view(shape)
    return tensor + (scaled - tensor).detach() if ste else scaled


class _ParamScale(nn.Module):
    """Parametrization: the channel rows of a parameter times its groups' factors."""

    def __init__(self, sites: list[Site], dim: int, provider: Provider):
        super().__init__()
        self.sites, self.dim, self.provider = sites, dim, provider

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        got = _factor(self.sites, self.provider, tensor.shape[self.dim], tensor)
        return tensor if got is None else scale(tensor, self.dim, *got)


class ChannelSites:
    """Hooks (and parametrizations where hooks cannot reach) that scale groups' channels.

    ``inputs``: ``{module name: [(argument index, Site)]}`` whose inputs are scaled ("exit"
    placement); ``modules``: ``{module name: [Site]}`` whose outputs are scaled; ``params``:
    ``{parameter name: [Site]}`` scaled through a parametrization. ``attach(provider)`` installs
    them on ``model`` (``provider(group id) -> (factor[group.size], straight_through) | None``);
    ``detach()`` removes them all. ``fold_targets(gid)`` lists the parameter rows whose scaling
    equals the group's factor (used to fold gates).

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> p = fxprune.plan(m, fxprune.Policy(ratio=0.0), (torch.randn(2, 3),))
        >>> sites = ChannelSites(p, m, [p.groups[0]], placement="affine")
        >>> sites.attach(lambda gid: (torch.tensor([1.0, 0.0, 1.0, 0.0]), True))
        >>> (m[0](torch.randn(5, 3))[:, 1] == 0).all().item()
        True
        >>> sites.detach(); len(m[0]._forward_hooks)
        0
    """

    def __init__(self, plan, model: nn.Module, groups: list, placement: str = "affine"):
        if placement not in ("exit", "affine"):
            raise ValueError(f"placement must be 'exit' or 'affine', got {placement!r}")
        self.model = unwrap(model)
        self.inputs: dict[str, list[tuple[int, Site]]] = {}
        self.modules: dict[str, list[Site]] = {}
        self.params: dict[str, list[Site]] = {}
        self.param_dims: dict[str, int] = {}
        self._fold: dict[int, list[tuple[str, int, Site]]] = {}
        self._handles: list = []
        self._parametrized: list[tuple[nn.Module, str]] = []
        traced_modules = dict(plan.traced.named_modules())
        real = {n for n, _ in self.model.named_parameters()}
        calls: dict[str, list[fx.Node]] = {}
        for node in plan.traced.graph.nodes:
            if node.op == "call_module":
                calls.setdefault(node.target, []).append(node)
        nodes = {n.name: n for n in plan.traced.graph.nodes}
        for g in groups:
            if placement == "affine" or not self._place_exits(g, calls, nodes):
                self._place(g, calls, traced_modules, real)

    def _place_exits(self, g, calls: dict, nodes: dict) -> bool:
        """Pre-hook sites on every module that reads the group's channels (a consumer, even one
        whose output is in the group again, or any module outside the group); False (nothing
        placed) when some reader is not a module called once with the tensor as a positional
        argument."""
        members = {m.node: m for m in g.members}
        readers = {pm.owner for pm in g.consumers}
        weights = {pm.target for pm in g.consumers}
        found: list[tuple[str, int, Site]] = []
        for name, m in members.items():
            node = nodes[name]
            for user in node.users:
                if user.op == "call_module" and user.target in readers:
                    pass
                elif user.name in members:
                    if _functional_reader(user, weights):
                        return False
                    continue
                elif user.op == "output" or _reads_metadata(user):
                    continue
                places = [i for i, a in enumerate(user.args) if a is node]
                if user.op != "call_module" or len(calls[user.target]) > 1 or not places \
                        or any(v is node for v in user.kwargs.values()):
                    return False
                found.extend((user.target, i, _site(g.id, m.dim, m.positions, m.channels)) for i in places)
        for target, i, site in found:
            self.inputs.setdefault(target, []).append((i, site))
        return True

    def _place(self, g, calls: dict, traced_modules: dict, real: set) -> None:
        members = {m.node: m for m in g.members}
        owners = list(dict.fromkeys(pm.owner for pm in g.params if pm.role != "consumer"))
        eligible = {o for o in owners if o in calls and foldable(traced_modules[o])
                    and any(n.name in members for n in calls[o])}
        fallback = set()
        for owner in owners:
            if owner not in calls:
                fallback.add(owner)  # parameters used functionally
            elif owner in eligible and len(calls[owner]) > 1:
                fallback.add(owner)  # one hook cannot tell the call sites apart
        for owner in sorted(eligible - fallback):
            node = calls[owner][0]
            if node.name not in members:
                continue
            if node.users and all(u.op == "call_module" and u.target in eligible for u in node.users):
                continue  # feeds a norm (or conv) of the same group: that one is masked instead
            m = members[node.name]
            self.modules.setdefault(owner, []).append(_site(g.id, m.dim, m.positions, m.channels))
        for pm in g.params:
            if pm.role == "consumer" or pm.target not in real:
                continue
            site = _site(g.id, pm.dim, pm.positions, pm.channels)
            if pm.owner in fallback:
                self.params.setdefault(pm.target, []).append(site)
                self.param_dims[pm.target] = pm.dim
            if pm.owner in fallback or any(s.gid == g.id for s in self.modules.get(pm.owner, ())):
                self._fold.setdefault(g.id, []).append((pm.target, pm.dim, site))

    def groups_placed(self) -> dict[int, str]:
        """``{group id: "exit" | "affine"}``: where each group's channels are scaled."""
        out = {s.gid: "affine" for sites in [*self.modules.values(), *self.params.values()] for s in sites}
        out.update({s.gid: "exit" for sites in self.inputs.values() for _i, s in sites})
        return out

    @property
    def attached(self) -> bool:
        return bool(self._handles or self._parametrized)

    def attach(self, provider: Provider) -> None:
        """Install the hooks and parametrizations on the model (replacing any installed before)."""
        self.detach()
        for name, entries in self.inputs.items():
            by_arg: dict[tuple[int, int], list[Site]] = {}
            for i, s in entries:
                by_arg.setdefault((i, s.dim), []).append(s)
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_pre_hook(_input_hook(by_arg, provider)))
        for name, sites in self.modules.items():
            by_dim: dict[int, list[Site]] = {}
            for s in sites:
                by_dim.setdefault(s.dim, []).append(s)
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_hook(_output_hook(by_dim, provider)))
        for target, sites in self.params.items():
            owner, name = owner_and_name(self.model, target)
            parametrize.register_parametrization(owner, name, _ParamScale(sites, self.param_dims[target], provider))
            self._parametrized.append((owner, name))

    def detach(self) -> None:
        """Remove every hook and parametrization this object installed; the parameters are the
        dense originals again (the same ``Parameter`` objects, so optimizers stay valid)."""
        for handle in self._handles:
            handle.remove()
        for owner, name in self._parametrized:
            if parametrize.is_parametrized(owner, name):
                parametrize.remove_parametrizations(owner, name, leave_parametrized=False)
        self._handles, self._parametrized = [], []

    def fold_targets(self, gid: int) -> list[tuple[str, int, Site]]:
        """``(parameter name, dim, site)`` whose rows, scaled by the group's factor, reproduce the
        scaling of the group's outputs (norm weight and bias; conv/linear weight rows and bias)."""
        return list(self._fold.get(gid, []))


def _reads_metadata(node: fx.Node) -> bool:
    """``x.shape`` / ``x.size()`` / ``x.dim()``: reads no channel values."""
    return (node.op == "call_function" and node.target is getattr) or \
        (node.op == "call_method" and node.target in ("size", "dim"))


def _functional_reader(node: fx.Node, weights: set) -> bool:
    """A function call that contracts over the group's channels with one of its consumer weights."""
    args = [*node.args, *node.kwargs.values()]
    return node.op in ("call_function", "call_method") and any(
        isinstance(a, fx.Node) and a.op == "get_attr" and a.target in weights for a in args)


def _input_hook(by_arg: dict[tuple[int, int], list[Site]], provider: Provider):
    def hook(module: nn.Module, args: tuple):
        args = list(args)
        for (i, dim), sites in by_arg.items():
            x = args[i]
            if isinstance(x, torch.Tensor):
                got = _factor(sites, provider, x.shape[dim], x)
                if got is not None:
                    args[i] = scale(x, dim, *got)
        return tuple(args)
    hook.fxprune_mask_hook = True  # fxprune's own: model checks let it through
    return hook


def _output_hook(by_dim: dict[int, list[Site]], provider: Provider):
    def hook(module: nn.Module, inputs, output):
        if not isinstance(output, torch.Tensor):
            return output
        for dim, sites in by_dim.items():
            got = _factor(sites, provider, output.shape[dim], output)
            if got is not None:
                output = scale(output, dim, *got)
        return output
    hook.fxprune_mask_hook = True  # fxprune's own: model checks let it through
    return hook
