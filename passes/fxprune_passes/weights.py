"""Per-channel views of a group's weights: channel matrices, per-channel sums, BatchNorm folding."""
from __future__ import annotations

import torch
import torch.fx as fx

from .base import cached


def channel_matrix(group, pm, tensor: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``(group.size, width)``: row ``c`` holds every slice of ``tensor`` along ``pm.dim``
    (or ``dim``, for a tensor such as a bias that lines up with that dim) that
    belongs to group channel ``c``, flattened and concatenated in position order; channels with
    fewer slices (or none) are zero-padded, so rows of different members can be concatenated.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> pm = NS(dim=1, positions=(0, 1, 2, 3), channels=(0, 0, 1, 1))
        >>> channel_matrix(NS(size=2), pm, torch.arange(8.).reshape(2, 4))
        tensor([[0., 4., 1., 5.],
                [2., 6., 3., 7.]])
    """
    rows = tensor.detach().movedim(pm.dim if dim is None else dim, 0)
    rows = rows.reshape(rows.shape[0], -1)
    slots: dict[int, list[int]] = {}
    for pos, ch in zip(pm.positions, pm.channels):
        slots.setdefault(ch, []).append(pos)
    k = max((len(v) for v in slots.values()), default=0)
    width = rows.shape[1]
    out = rows.new_zeros(group.size, k * width)
    for ch, positions in slots.items():
        out[ch, : len(positions) * width] = rows[positions].reshape(-1)
    return out


def channel_sum(group, pm, tensor: torch.Tensor) -> torch.Tensor:
    """``(group.size,)`` float64: the sum of ``tensor``'s entries that belong to each channel.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> pm = NS(dim=0, positions=(0, 1, 2), channels=(0, 1, 1))
        >>> channel_sum(NS(size=2), pm, torch.ones(3, 4))
        tensor([4., 8.], dtype=torch.float64)
    """
    per_pos = tensor.detach().movedim(pm.dim, 0).reshape(tensor.shape[pm.dim], -1).sum(1)
    out = torch.zeros(group.size, dtype=torch.float64)
    out.index_add_(0, torch.tensor(pm.channels, dtype=torch.long),
                   per_pos[list(pm.positions)].to(torch.float64))
    return out


def is_parameter(ctx, target: str) -> bool:
    """True when ``target`` is a parameter (not a buffer) of the traced module.

    Example:
        >>> import fxprune
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
        >>> p = fxprune.plan(m.eval(), fxprune.Policy("l1", 0.5), (torch.randn(1, 3, 4, 4),))
        >>> ctx = fxprune.ImportanceContext(p.traced, p.groups, p.example_inputs)
        >>> is_parameter(ctx, "1.weight"), is_parameter(ctx, "1.running_var")
        (True, False)
    """
    params = cached(ctx, "parameter names", lambda: {n for n, _ in ctx.module.named_parameters()})
    return target in params


def batch_norm_modules(ctx, group) -> dict[str, torch.nn.Module]:
    """The BatchNorm modules among the group's passengers, by module name.

    Example:
        >>> import fxprune
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
        >>> p = fxprune.plan(m.eval(), fxprune.Policy("l1", 0.5), (torch.randn(1, 3, 4, 4),))
        >>> ctx = fxprune.ImportanceContext(p.traced, p.groups, p.example_inputs)
        >>> list(batch_norm_modules(ctx, p.groups[0]))
        ['1']
    """
    out = {}
    for pm in group.passengers:
        try:
            m = ctx.module.get_submodule(pm.owner)
        except AttributeError:
            continue
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and pm.target.startswith(pm.owner + "."):
            out[pm.owner] = m
    return out


def _users_of_weight(ctx) -> dict[str, list[fx.Node]]:
    """weight owner (module name, or get_attr target of functional weights) -> call nodes."""
    def build():
        out: dict[str, list[fx.Node]] = {}
        for node in ctx.module.graph.nodes:
            if node.op == "call_module":
                out.setdefault(node.target, []).append(node)
            elif node.op == "call_function":
                for a in node.args[1:2]:
                    if isinstance(a, fx.Node) and a.op == "get_attr":
                        out.setdefault(a.target, []).append(node)
        return out
    return cached(ctx, "weight users", build)


def following_batch_norm(ctx, pm) -> str | None:
    """Name of the BatchNorm module that directly follows every call of producer ``pm``
    (its only user), or None.

    Example:
        >>> import fxprune
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
        >>> p = fxprune.plan(m.eval(), fxprune.Policy("l1", 0.5), (torch.randn(1, 3, 4, 4),))
        >>> ctx = fxprune.ImportanceContext(p.traced, p.groups, p.example_inputs)
        >>> following_batch_norm(ctx, p.groups[0].producers[0])
        '1'
    """
    names = set()
    for node in _users_of_weight(ctx).get(pm.owner, []):
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            return None
        m = ctx.module.get_submodule(users[0].target)
        if not isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            return None
        names.add(users[0].target)
    return names.pop() if len(names) == 1 else None


def producer_bias(ctx, group, pm) -> torch.Tensor | None:
    """The bias of producer ``pm`` (a passenger with the same owner), full length, or None.

    Example:
        >>> import fxprune
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
        >>> p = fxprune.plan(m.eval(), fxprune.Policy("l1", 0.5), (torch.randn(1, 3, 4, 4),))
        >>> ctx = fxprune.ImportanceContext(p.traced, p.groups, p.example_inputs)
        >>> producer_bias(ctx, p.groups[0], p.groups[0].producers[0]).shape
        torch.Size([4])
    """
    for p in group.passengers:
        if p.owner == pm.owner and p.target != pm.target and p.dim == 0:
            t = ctx.param(p.target)
            if t.dim() == 1 and t.shape[0] == ctx.param(pm.target).shape[pm.dim]:
                return t.detach()
    return None


def folded_producer(ctx, group, pm, fold_bn: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W~, b~)`` of producer ``pm``: its weight and bias (zeros when absent), BN-folded when a
    BatchNorm passenger of the group directly follows it and ``fold_bn``:
    ``s = gamma / sqrt(var + eps)``, ``W~ = s * W`` along the output dim, ``b~ = beta + (b - mean) * s``.

    Example:
        >>> import fxprune
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
        >>> p = fxprune.plan(m.eval(), fxprune.Policy("l1", 0.5), (torch.randn(1, 3, 4, 4),))
        >>> ctx = fxprune.ImportanceContext(p.traced, p.groups, p.example_inputs)
        >>> w, b = folded_producer(ctx, p.groups[0], p.groups[0].producers[0])
        >>> x = torch.randn(1, 3, 4, 4)
        >>> torch.allclose(m[1](m[0](x)), torch.nn.functional.conv2d(x, w, b), atol=1e-6)
        True
    """
    w = ctx.param(pm.target).detach()
    n = w.shape[pm.dim]
    b = producer_bias(ctx, group, pm)
    b = torch.zeros(n, dtype=w.dtype, device=w.device) if b is None else b.to(w.dtype)
    bn_name = following_batch_norm(ctx, pm) if fold_bn else None
    if bn_name is None or bn_name not in batch_norm_modules(ctx, group):
        return w, b
    bn = ctx.module.get_submodule(bn_name)
    if bn.running_var is None or bn.running_var.shape[0] != n:
        return w, b
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(bn.running_var)
    s = (gamma / torch.sqrt(bn.running_var + bn.eps)).to(w.dtype)
    view = [1] * w.dim()
    view[pm.dim] = n
    return w * s.view(view), beta.to(w.dtype) + (b - bn.running_mean.to(w.dtype)) * s
