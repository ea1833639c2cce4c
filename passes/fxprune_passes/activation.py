"""Activation-aware channel importance: weight column norms scaled by how large the activations
they multiply are on calibration data (structured Wanda / FLAP, one score per group channel).

Magnitude criteria look at weights only; on a language model a small weight column can still
carry a large signal when its input channel has large activations (LLMs have a few channels with
outlier activations). Wanda (Sun et al., ICLR 2024) scores a weight ``W_ij`` by ``|W_ij| · ‖X_j‖₂``,
the norm of input feature ``j`` over the calibration tokens; its structured variants and FLAP
(An et al., AAAI 2024) score a whole input column ``j`` of a consumer layer, which is what a
removed channel takes away. For a group channel ``c`` and each of the group's conv/linear
*consumers* ``q`` (the layers that contract over ``c``: ``down_proj`` for an MLP group,
``o_proj`` for an attention-head group, every projection reading the residual stream and
``lm_head`` for the hidden size), with ``j`` running over the columns of ``q`` that belong to
``c`` (one column for an MLP channel, ``head_dim`` columns for a head)::

    score_q(c) = Σ_j ‖W_q[:, j]‖_p · s_j

    s_j = sqrt(E[x_j²])            statistic="rms"          (Wanda: ‖X_j‖₂ per token)
    s_j = sqrt(Var[x_j])           statistic="fluctuation"  (FLAP's fluctuation metric)

where ``x_j`` is the input of ``q`` at column ``j``, the expectation running over every token
(or spatial position) of the calibration batches. The channel's score is the mean (option:
sum) of ``score_q(c)`` over the group's consumers. With ``statistic="fluctuation"`` and ``p=2``
each column's term is the square root of FLAP's ``Var[x_j] · ‖W[:, j]‖₂²``, which ranks single
columns identically; a head (several columns) sums the square roots. FLAP's bias compensation
(adding the removed channels' mean contribution to the consumer's bias) is not done: it needs
a bias the model may not have, and a pure scorer does not add parameters.

Reconstructed choices ([I]), each an option:

==================  ===========  ===========================================================
option              default      meaning
==================  ===========  ===========================================================
``statistic``       ``"rms"``    ``"rms"``: root mean square of the input channel (Wanda);
                                 ``"fluctuation"``: its standard deviation (FLAP)
``weight_norm``     ``1``        ``p`` of the column norm ``‖W[:, j]‖_p`` (1: Wanda's |W|)
``reduction``       ``"mean"``   how consumers' scores combine: ``"mean"`` or ``"sum"``
``max_batches``     ``None``     calibration batches read (``None``: all)
==================  ===========  ===========================================================

Needs unlabelled calibration batches (``calibration=[inputs, ...]``; ``(inputs, targets)``
pairs are accepted, targets ignored). Consumers that are neither ``nn.Linear``/``F.linear`` nor
an ungrouped conv (grouped and depthwise convs mix column and channel indices) are left out;
a group with none left (e.g. one consumed only by attention matmuls or a normalisation) is
scored by the L1 norm of its producer rows, the magnitude default.
"""
from __future__ import annotations

import torch

from .base import Criterion, cached
from .data import observe
from .hessian import weight_calls
from .weights import channel_sum


def _channel_moments(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``(3, C)`` float64: count, Σx, Σx² of ``x`` per channel along ``dim``, over everything else."""
    flat = x.detach().to(torch.float64).movedim(dim, -1).reshape(-1, x.shape[dim])
    return torch.stack([torch.full((flat.shape[1],), float(flat.shape[0]), dtype=torch.float64),
                        flat.sum(0), (flat ** 2).sum(0)])


def _usable(spec: dict) -> bool:
    return spec["kind"] == "linear" or spec.get("groups", 1) == 1


class Activation(Criterion):
    """Structured Wanda/FLAP: consumer column norms times calibration input-channel statistics.

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
        >>> x = torch.randn(8, 4)
        >>> p = fxprune.plan(m, fxprune.Policy("activation", 0.5), (x,), calibration=[x])
        >>> p.groups[0].kept
        3
    """

    name = "activation"
    defaults = {"statistic": "rms", "weight_norm": 1, "reduction": "mean", "max_batches": None}
    choices = {"statistic": ("rms", "fluctuation"), "reduction": ("mean", "sum")}

    def input_moments(self, ctx) -> dict[str, torch.Tensor]:
        """``{consumer weight target: (3, C_in)}`` count, Σx, Σx² of its input, once per plan."""
        def compute():
            calls = weight_calls(ctx.module)
            targets = {pm.target for g in ctx.groups if not g.blocked for pm in g.consumers
                       if pm.target in calls and all(_usable(spec) for _, spec in calls[pm.target])}
            acc: dict[str, torch.Tensor] = {}

            def watcher(target: str, spec: dict):
                channel_dim = -1 if spec["kind"] == "linear" else 1

                def record(node, args, result):
                    moments = _channel_moments(args[0], channel_dim)
                    acc[target] = acc[target] + moments if target in acc else moments
                return record

            watch = {node.name: watcher(t, spec) for t in targets for node, spec in calls[t]}
            if watch:
                observe(ctx, self.name, watch, self.option(ctx, "max_batches"))
            return acc
        return cached(ctx, ("activation moments", self.option(ctx, "max_batches")), compute)

    def _statistic(self, moments: torch.Tensor, ctx) -> torch.Tensor:
        count, total, squares = moments
        second = squares / count.clamp(min=1)
        if self.option(ctx, "statistic") == "rms":
            return second.sqrt()
        mean = total / count.clamp(min=1)
        return (second - mean ** 2).clamp(min=0).sqrt()

    def score(self, group, ctx) -> torch.Tensor:
        moments = self.input_moments(ctx)
        p = float(self.option(ctx, "weight_norm"))
        terms = []
        for pm in group.consumers:
            if pm.target not in moments:
                continue
            w = ctx.param(pm.target).detach().to(torch.float64)
            columns = w.movedim(pm.dim, 0).reshape(w.shape[pm.dim], -1).norm(p=p, dim=1)
            per_column = columns * self._statistic(moments[pm.target], ctx)
            out = torch.zeros(group.size, dtype=torch.float64)
            out.index_add_(0, torch.tensor(pm.channels, dtype=torch.long), per_column[list(pm.positions)])
            terms.append(out)
        if not terms:  # no usable consumer: the magnitude default on the producer rows
            out = torch.zeros(group.size, dtype=torch.float64)
            for pm in group.producers:
                out += channel_sum(group, pm, ctx.param(pm.target).detach().abs())
            return out
        stacked = torch.stack(terms)
        return stacked.mean(0) if self.option(ctx, "reduction") == "mean" else stacked.sum(0)


activation = Activation()
