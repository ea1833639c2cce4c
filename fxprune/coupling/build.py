"""Stage 3: run every node's rule once, in graph order, and collect the coupling state."""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from .ops import rule_for
from .outputs import check_selection
from .rules import describe, opaque
from .state import Analysis
from ..errors import StageError


def analyse(gm: fx.GraphModule, prune_outputs: Any = False) -> Analysis:
    """Couple the channel spaces of a shape-annotated GraphModule; ``prune_outputs`` (a
    ``Policy.prune_outputs`` value) says which model outputs may lose channels.

    Example:
        >>> import torch
        >>> from fxprune.shapes import propagate
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 2, 1)))
        >>> _ = propagate(gm, (torch.randn(1, 3, 4, 4),))
        >>> sorted(k for k in analyse(gm).params)
        [('0.bias', 0), ('0.weight', 0), ('0.weight', 1), ('1.bias', 0), ('1.weight', 0), ('1.weight', 1)]
    """
    check_selection(gm.graph, prune_outputs)
    an = Analysis(gm)
    an.prune_outputs = prune_outputs  # read by the output rule (fxprune.coupling.outputs)
    for node in gm.graph.nodes:
        rule = rule_for(an, node)
        try:
            an.info[node.name] = rule(an, node) if rule is not None else opaque(an, node)
        except StageError:
            raise
        except Exception as err:
            raise StageError("coupling", node.name, f"{describe(node)}: {type(err).__name__}: {err}") from err
    an.settle_deferred()  # a second channel dim no contraction took up stays whole
    for (target, dim), ps in an.params.items():
        if target in an.frozen_params:
            an.units.pin(ps.units, f"{target} is also used by an op fxprune cannot slice "
                                   f"({an.frozen_params[target]})")
    return an
