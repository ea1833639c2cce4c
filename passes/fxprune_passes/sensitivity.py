"""Second-order channel sensitivity (OBD/OBS family): a channel's sensitivity is the sum of its
weights' sensitivities ``½ · w² · H_ww`` (see shared/METHODS.md, seed 5).

Reconstructed choices ([I]), each an option:

=====================  ==============  ========================================================
option                 default         meaning
=====================  ==============  ========================================================
``hessian``            ``"diag"``      ``"diag"``: layer-wise Hessian Ψ = E[x xᵀ] of each
                                       conv/linear (unlabelled calibration inputs);
                                       ``"fisher"``: E[g²] of the loss gradient;
                                       ``"hutchinson"``: E[z ⊙ Hz], Rademacher probes
                                       (both need ``(inputs, targets)`` batches and ``loss_fn``)
``sensitivity_terms``  ``"both"``      weights counted for channel c: its producer rows and
                                       its consumer columns; ``"producer"``; ``"consumer"``
``hutchinson_probes``  ``2``           probes per batch
``seed``               ``0``           probe seed
``max_batches``        ``None``        calibration batches read (``None``: all)
``layer_rates``        ``"policy"``    ``"policy"``: each layer's rate comes from the Policy
                                       (its ratio, scope and normalisation); ``"hessian"``:
                                       per-layer rates from one ranking of raw saliencies;
                                       ``"hessian-mean"``: the same after dividing each
                                       layer's saliencies by their mean (see below)
=====================  ==============  ========================================================

Per-layer rates from the layer Hessian (``layer_rates="hessian"``): under the second-order
model a channel's saliency ``S_c = Σ ½ w² H_ww`` estimates the loss increase its removal
causes, in the same unit in every layer, and the increases of several removals add up. The
removal of a given number of channels (or, with ``flops=``/``params=``, of a given cost) that
raises the estimated loss least is then one ranking of all channels by raw ``S_c``; each
layer's rate is whatever share of its channels falls under the threshold. The option does
exactly that: ``select`` runs with ``scope="global"`` and ``normalize="none"`` (recorded in
``plan.selection["selection_policy"]``), the policy's ratio or budget, ``min_channels``,
``round_to`` and overrides unchanged. Layers whose Hessian (input second moments) and weights
are small lose most of their channels; the paper's own allocation rule is not published in
the abstract, so this is the reconstruction, not a quotation.

Measured caveat (``benchmarks/reproduce/criteria_resnet20_fmnist.py``): with BatchNorm after
each conv, the layer-wise Hessians of different layers are not on one scale (a norm rescales
what its conv's errors cost), so the raw ranking can strip a stage to ``min_channels`` and lose
the model. ``"hessian-mean"`` ranks ``S_c / mean_layer(S)`` instead (``normalize="mean"``): a
layer's rate then follows how unevenly its saliency is spread, which survives the rescaling.

With ``"diag"`` the Hessian diagonal of weight ``W[o, c, u, v]`` is ``E[x²]`` of the input
element it multiplies, summed over output positions and averaged over samples (the exact
diagonal over unfolded patches, zero padding included; transposed convs use the per-channel
second moment). A channel whose activations are zero on the calibration data therefore has
zero consumer-side sensitivity. Biases are not counted.
"""
from __future__ import annotations

import dataclasses

import torch

from .base import Criterion, cached
from .hessian import fisher_diagonal, hutchinson_diagonal, layer_diagonal
from .weights import channel_sum


def weight_targets(ctx, roles: tuple[str, ...]) -> set[str]:
    """Every producer/consumer weight of the removable groups, for the given roles.

    Example:
        >>> import fxprune
        >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        >>> p = fxprune.plan(m, fxprune.Policy("l1", 0.5), (torch.randn(5, 3),))
        >>> sorted(weight_targets(fxprune.ImportanceContext(p.traced, p.groups, ()), ("consumer",)))
        ['1.weight']
    """
    return {pm.target for g in ctx.groups if not g.blocked for pm in g.params if pm.role in roles}


class Sensitivity(Criterion):
    """Second-order sensitivity ``Σ ½ w² H_ww`` over each channel's weights (needs calibration).

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
        >>> x = torch.randn(2, 3, 8, 8)
        >>> p = fxprune.plan(m, fxprune.Policy("sensitivity", 0.5), (x,), calibration=[x])
        >>> p.groups[0].kept
        4
    """

    name = "sensitivity"
    defaults = {"hessian": "diag", "sensitivity_terms": "both", "hutchinson_probes": 2, "seed": 0,
                "max_batches": None, "layer_rates": "policy"}
    choices = {"hessian": ("diag", "fisher", "hutchinson"),
               "sensitivity_terms": ("both", "producer", "consumer"),
               "layer_rates": ("policy", "hessian", "hessian-mean")}

    def selection_policy(self, policy, ctx):
        """With ``layer_rates="hessian"``, one global ranking of the unnormalised saliencies
        (see the module docstring); otherwise the policy as given.

        Example:
            >>> import fxprune, torch
            >>> ctx = fxprune.ImportanceContext(None, [], (), options={"layer_rates": "hessian"})
            >>> p = sensitivity.selection_policy(fxprune.Policy("sensitivity", 0.5), ctx)
            >>> p.scope, p.normalize
            ('global', 'none')
        """
        rates = self.option(ctx, "layer_rates")
        if rates == "policy":
            return policy
        return dataclasses.replace(policy, scope="global", normalize="none" if rates == "hessian" else "mean")

    def _roles(self, ctx) -> tuple[str, ...]:
        terms = self.option(ctx, "sensitivity_terms")
        return ("producer", "consumer") if terms == "both" else (terms,)

    def per_weight(self, ctx) -> dict[str, torch.Tensor]:
        """``{weight target: ½ w² H_ww}`` (float64, shaped like the weight), once per plan."""
        def compute():
            targets = weight_targets(ctx, self._roles(ctx))
            kind, limit = self.option(ctx, "hessian"), self.option(ctx, "max_batches")
            who = f"{self.name} (hessian={kind!r})"
            if kind == "diag":
                h = layer_diagonal(ctx, targets, who, limit)
            elif kind == "fisher":
                h = fisher_diagonal(ctx, targets, who, limit)
            else:
                h = hutchinson_diagonal(ctx, targets, who, int(self.option(ctx, "hutchinson_probes")),
                                        int(self.option(ctx, "seed")), limit)
            return {t: 0.5 * ctx.param(t).detach().to(torch.float64) ** 2 * h[t] for t in targets}
        key = ("sensitivity", self.option(ctx, "hessian"), self.option(ctx, "sensitivity_terms"))
        return cached(ctx, key, compute)

    def score(self, group, ctx) -> torch.Tensor:
        sens = self.per_weight(ctx)
        roles = self._roles(ctx)
        out = torch.zeros(group.size, dtype=torch.float64)
        for pm in group.params:
            if pm.role in roles:
                out += channel_sum(group, pm, sens[pm.target])
        return out


sensitivity = Sensitivity()
