"""Importance passes for fxprune beyond the built-in ``l1`` / ``l2``.

Installed with fxprune and registered through the entry-point group ``"fxprune.importance"``,
so every criterion is selectable by name without importing this package:

==================  ==========================================================  ==============
name                criterion                                                   needs
==================  ==========================================================  ==============
``scp``             Similar Channel Pruning, with weight compensation (edits)   weights only
``cpmc``            multi-criteria: magnitude, MACs, params, global min-max     weights only
``sensitivity``     second-order sensitivity (diag / fisher / hutchinson)       calibration
``bn_scale``        BatchNorm ``|γ|`` (network slimming)                        weights only
``fpgm``            distance to the geometric median                            weights only
``random``          seeded uniform baseline                                     nothing
``taylor``          first-order Taylor ``(Σ g·w)²``                             data + loss
``hrank``           average feature-map rank                                    calibration
``lamp``            LAMP normalisation of a base criterion (``lamp_base``)      as the base
==================  ==========================================================  ==============

Options go through ``fxprune.plan(..., importance_options={...})``; each module documents
its own, with defaults. For global ranking (``Policy(scope="global")``) the policy's
``normalize`` makes scores comparable across groups; ``cpmc`` and ``lamp`` scores are
comparable already (use ``normalize="none"``).

Example:
    >>> import fxprune, torch
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
    >>> x = (torch.randn(1, 3, 8, 8),)
    >>> pruned = fxprune.transform(m, fxprune.Policy("cpmc", 0.5), x)
    >>> pruned.get_submodule("2").in_channels
    4
"""
from .base import Criterion, DataRequiredError, cached, lamp
from .cpmc import cpmc
from .hrank import hrank
from .scp import scp
from .sensitivity import sensitivity
from .standard import bn_scale, fpgm, lamp_criterion, random
from .taylor import taylor

CRITERIA = {c.name: c for c in (scp, cpmc, sensitivity, bn_scale, fpgm, random, taylor, hrank, lamp_criterion)}

__all__ = ["CRITERIA", "Criterion", "DataRequiredError", "cached", "lamp", "scp", "cpmc", "sensitivity",
           "bn_scale", "fpgm", "random", "taylor", "hrank", "lamp_criterion"]
