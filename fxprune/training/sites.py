"""Where a coupling group's channels can be switched off (masks) or scaled (gates) in a user's model.

A group's channels are made by its producers and carried by its passengers (see
``fxprune.coupling.groups``). A channel is truly off when the output of the *last* affine module
on its path (the norm after a conv, or the conv itself when no norm follows) is zero, so the
mask or gate of a group is applied there, by a forward hook on that module:

* the conv that feeds a BatchNorm of the same group is left alone, the BatchNorm's output is
  masked, so the norm's statistics are those of the dense conv output and a masked channel's
  conv weights still receive a gradient (the straight-through estimator of dynamic pruning);
* parameters used functionally (``F.conv2d(x, self.weight)``) or owned by a module called at
  several places cannot be reached by an output hook: they are masked or gated through
  ``torch.nn.utils.parametrize`` on the parameter's channel rows instead.

Scaling the output of an affine module (BatchNorm, LayerNorm, GroupNorm, conv, linear) by a
per-channel factor equals scaling its per-channel parameters, which is how C2S2 folds its gates.
``ChannelSites.detach()`` takes every hook and parametrization off again.

Example:
    >>> import fxprune, torch
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    >>> p = fxprune.plan(m, fxprune.Policy(ratio=0.0), (torch.randn(1, 1, 6, 6),))
    >>> sites = ChannelSites(p, m, [p.groups[0]])
    >>> sorted(sites.modules)   # the BatchNorm output, not the conv's
    ['1']
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
    """Output hooks (and parametrizations where hooks cannot reach) that scale groups' channels.

    ``modules``: ``{module name: [Site]}`` whose outputs are scaled; ``params``:
    ``{parameter name: [Site]}`` scaled through a parametrization. ``attach(provider)`` installs
    them on ``model`` (``provider(group id) -> (factor[group.size], straight_through) | None``);
    ``detach()`` removes them all. ``fold_targets(gid)`` lists the parameter rows whose scaling
    equals the group's factor (used to fold gates).

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> p = fxprune.plan(m, fxprune.Policy(ratio=0.0), (torch.randn(2, 3),))
        >>> sites = ChannelSites(p, m, [p.groups[0]])
        >>> sites.attach(lambda gid: (torch.tensor([1.0, 0.0, 1.0, 0.0]), True))
        >>> (m[0](torch.randn(5, 3))[:, 1] == 0).all().item()
        True
        >>> sites.detach(); len(m[0]._forward_hooks)
        0
    """

    def __init__(self, plan, model: nn.Module, groups: list):
        self.model = unwrap(model)
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
        for g in groups:
            self._place(g, calls, traced_modules, real)

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

    @property
    def attached(self) -> bool:
        return bool(self._handles or self._parametrized)

    def attach(self, provider: Provider) -> None:
        """Install the hooks and parametrizations on the model (replacing any installed before)."""
        self.detach()
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


def _output_hook(by_dim: dict[int, list[Site]], provider: Provider):
    def hook(module: nn.Module, inputs, output):
        if not isinstance(output, torch.Tensor):
            return output
        for dim, sites in by_dim.items():
            got = _factor(sites, provider, output.shape[dim], output)
            if got is not None:
                output = scale(output, dim, *got)
        return output
    return hook
