"""Diagonal curvature estimates for weights, one tensor per weight shaped like the weight.

* ``layer_diagonal`` — the layer-wise Hessian of a conv/linear output error, Ψ = E[x xᵀ] over the
  unfolded input patches; its diagonal is ``E[x²]`` of the input element each weight multiplies,
  summed over output positions and averaged over samples. Needs unlabelled inputs only.
* ``fisher_diagonal`` — ``E[g²]`` of the loss gradient (empirical Fisher, one gradient per batch).
* ``hutchinson_diagonal`` — ``E[z ⊙ Hz]`` with Rademacher probes ``z`` (double backward).
"""
from __future__ import annotations

import itertools

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxprune

from .data import loss_batches, observe

_CONV_FUNCTIONS = {F.conv1d: False, F.conv2d: False, F.conv3d: False,
                   F.conv_transpose1d: True, F.conv_transpose2d: True, F.conv_transpose3d: True}


def _tuple(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _arg(node: fx.Node, pos: int, name: str, default=None):
    return node.args[pos] if len(node.args) > pos else node.kwargs.get(name, default)


def weight_calls(gm: fx.GraphModule) -> dict[str, list[tuple[fx.Node, dict]]]:
    """``{weight target: [(node, conv/linear hyper-parameters), ...]}`` for every conv/linear call.

    Example:
        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(3, 2)))
        >>> sorted(weight_calls(gm))
        ['0.weight']
    """
    out: dict[str, list] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, nn.modules.conv._ConvNd):
                spec = dict(kind="conv", transposed=m.transposed, stride=m.stride, dilation=m.dilation,
                            padding=m.padding, groups=m.groups, padding_mode=m.padding_mode,
                            reversed_padding=getattr(m, "_reversed_padding_repeated_twice", None))
                out.setdefault(f"{node.target}.weight", []).append((node, spec))
            elif isinstance(m, nn.Linear):
                out.setdefault(f"{node.target}.weight", []).append((node, dict(kind="linear")))
            elif isinstance(m, nn.Embedding):
                out.setdefault(f"{node.target}.weight", []).append((node, dict(kind="embedding")))
        elif node.op == "call_function" and (node.target in _CONV_FUNCTIONS or node.target is F.linear):
            w = _arg(node, 1, "weight")
            if not (isinstance(w, fx.Node) and w.op == "get_attr"):
                continue
            if node.target is F.linear:
                out.setdefault(w.target, []).append((node, dict(kind="linear")))
                continue
            transposed = _CONV_FUNCTIONS[node.target]
            names = ("stride", "padding", "output_padding", "groups", "dilation") if transposed else \
                ("stride", "padding", "dilation", "groups")
            defaults = {"stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1}
            spec = {k: _arg(node, 3 + i, k, defaults[k]) for i, k in enumerate(names)}
            out.setdefault(w.target, []).append((node, dict(kind="conv", transposed=transposed,
                                                            padding_mode="zeros", **spec)))
    return out


def _pads(padding, kernel: tuple, dilation: tuple) -> list[tuple[int, int]]:
    n = len(kernel)
    if padding == "valid":
        return [(0, 0)] * n
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in _tuple(padding, n)]


def patch_moments(x: torch.Tensor, kernel: tuple, stride, padding, dilation) -> torch.Tensor:
    """``(C, prod(kernel))``: Σ over samples and output positions of the squared input element
    that each kernel offset reads (zero padding), i.e. the diagonal of Σ x xᵀ over patches.

    Example:
        >>> patch_moments(torch.ones(1, 1, 3), (2,), 1, 0, 1)
        tensor([[2., 2.]], dtype=torch.float64)
    """
    n = len(kernel)
    stride, dilation = _tuple(stride, n), _tuple(dilation, n)
    pads = _pads(padding, kernel, dilation)
    x2 = x.detach().to(torch.float64) ** 2
    x2 = F.pad(x2, [p for pair in reversed(pads) for p in pair])
    size = x2.shape[2:]
    outs = [(size[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(n)]
    cols = []
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = [slice(None), slice(None)] + [
            slice(dilation[i] * offset[i], dilation[i] * offset[i] + stride[i] * (outs[i] - 1) + 1, stride[i])
            for i in range(n)]
        cols.append(x2[tuple(index)].sum(dim=[0] + list(range(2, 2 + n))))
    return torch.stack(cols, 1)


def _conv_diag(x: torch.Tensor, w: torch.Tensor, spec: dict) -> torch.Tensor:
    if spec["transposed"]:  # every input element meets each of its weights once (output crop ignored)
        per_in = (x.detach().to(torch.float64) ** 2).sum(dim=[0] + list(range(2, x.dim())))
        return per_in.view([-1] + [1] * (w.dim() - 1)).expand(w.shape).clone()
    kernel = tuple(w.shape[2:])
    padding = spec["padding"]
    if spec["padding_mode"] != "zeros":
        x = F.pad(x, spec["reversed_padding"], mode=spec["padding_mode"])
        padding = 0
    stats = patch_moments(x, kernel, spec["stride"], padding, spec["dilation"])  # (C_in, K)
    out_ch, per_group = w.shape[0], w.shape[1]
    groups = spec["groups"]
    rows = torch.arange(out_ch) // (out_ch // groups)
    index = rows[:, None] * per_group + torch.arange(per_group)[None, :]  # (O, C_in/g)
    return stats[index].reshape(w.shape)


def _embedding_diag(ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A lookup's output is ``W[ids]``: the layer-wise loss ||ΔW[ids]||² counts each row once
    per occurrence of its token, the same for every column."""
    counts = torch.bincount(ids.detach().reshape(-1).long(), minlength=w.shape[0]).to(torch.float64)
    return counts[:, None].expand(w.shape).clone()


def _linear_diag(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    per_in = (x.detach().to(torch.float64) ** 2).reshape(-1, x.shape[-1]).sum(0)
    return per_in[None, :].expand(w.shape).clone()


def layer_diagonal(ctx, targets: set[str], who: str, max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """``{target: diag of the layer-wise Hessian}`` for conv/linear weights, from calibration inputs.

    Example:
        >>> import fxprune
        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 1)))
        >>> x, y = torch.tensor([[1.0, 2.0]]), torch.zeros(1, 1)
        >>> ctx = fxprune.ImportanceContext(gm, [], (x,), calibration=[(x, y)], loss_fn=F.mse_loss)
        >>> layer_diagonal(ctx, {"0.weight"}, "example")["0.weight"]
        tensor([[1., 4.]], dtype=torch.float64)
    """
    calls = weight_calls(ctx.module)
    missing = sorted(t for t in targets if t not in calls)
    if missing:
        raise NotImplementedError(f"no layer-wise Hessian for weights used outside conv/linear/embedding: {missing}")
    acc = {t: torch.zeros(ctx.param(t).shape, dtype=torch.float64) for t in targets}

    def watcher(target: str, spec: dict):
        w = ctx.param(target)

        def record(node, args, result):
            x = args[0] if args else None
            kind = spec["kind"]
            diag = _linear_diag(x, w) if kind == "linear" else _embedding_diag(x, w) if kind == "embedding" \
                else _conv_diag(x, w, spec)
            acc[target] += diag
        return record

    watch = {node.name: watcher(t, spec) for t in targets for node, spec in calls[t]}
    samples = observe(ctx, who, watch, max_batches)
    return {t: v / max(samples, 1) for t, v in acc.items()}


def _params(gm: fx.GraphModule, targets: set[str]) -> tuple[list[str], list[torch.Tensor]]:
    names = sorted(targets)
    return names, [gm.get_parameter(t) for t in names]


def fisher_diagonal(ctx, targets: set[str], who: str, max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """``{target: E[g²]}`` over labelled calibration batches (one loss gradient per batch).

    Example:
        >>> import fxprune
        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 1)))
        >>> x, y = torch.tensor([[1.0, 2.0]]), torch.zeros(1, 1)
        >>> ctx = fxprune.ImportanceContext(gm, [], (x,), calibration=[(x, y)], loss_fn=F.mse_loss)
        >>> fisher_diagonal(ctx, {"0.weight"}, "example")["0.weight"].shape
        torch.Size([1, 2])
    """
    acc: dict[str, torch.Tensor] = {}
    count = 0
    for gm, loss in loss_batches(ctx, who, max_batches):
        names, params = _params(gm, targets)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for t, g in zip(names, grads):
            g2 = torch.zeros_like(params[names.index(t)]) if g is None else g.detach() ** 2
            acc[t] = acc.get(t, 0) + g2.to(torch.float64)
        count += 1
    return {t: v / max(count, 1) for t, v in acc.items()}


def hutchinson_diagonal(ctx, targets: set[str], who: str, probes: int = 2, seed: int = 0,
                        max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """``{target: E[z ⊙ Hz]}``: Hutchinson's estimate of the loss Hessian's diagonal.

    For a linear model under MSE the Hessian diagonal is ``2 x²``, and each probe gives it exactly
    plus cross terms ``±2 x_i x_j``, which average out over probes.

    Example:
        >>> import fxprune
        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 1)))
        >>> x, y = torch.tensor([[1.0, 2.0]]), torch.zeros(1, 1)
        >>> ctx = fxprune.ImportanceContext(gm, [], (x,), calibration=[(x, y)], loss_fn=F.mse_loss)
        >>> hutchinson_diagonal(ctx, {"0.weight"}, "example", probes=1)["0.weight"].shape
        torch.Size([1, 2])
    """
    gen = torch.Generator().manual_seed(seed)
    acc: dict[str, torch.Tensor] = {}
    count = 0
    for gm, loss in loss_batches(ctx, who, max_batches):
        names, params = _params(gm, targets)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        for _ in range(probes):
            zs = [torch.randint(0, 2, params[i].shape, generator=gen).to(params[i].dtype) * 2 - 1 for i in live]
            try:
                hz = torch.autograd.grad([grads[i] for i in live], [params[i] for i in live], zs,
                                         retain_graph=True, allow_unused=True)
            except RuntimeError as err:
                raise fxprune.PolicyError(
                    f"importance {who!r} needs Hessian-vector products, which this model does not "
                    f"support ({err}); use importance_options={{'hessian': 'fisher'}} or 'diag'") from err
            for i, z, h in zip(live, zs, hz):
                if h is not None:
                    acc[names[i]] = acc.get(names[i], 0) + (z * h).detach().to(torch.float64)
            count += 1
    per_probe = max(count, 1)
    return {t: (acc[t] / per_probe) if t in acc else torch.zeros(ctx.param(t).shape, dtype=torch.float64)
            for t in targets}

