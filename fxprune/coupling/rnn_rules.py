"""Channel semantics of the recurrent layers ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``, as leaf
modules (torch.fx) and as the ATen ops ``aten.lstm`` / ``aten.gru`` / ``aten.rnn_tanh`` /
``aten.rnn_relu`` that torch.export inlines them into (their flat weight list read through
``get_attr``).

What may shrink, exactly under the mask oracle:

- **The input features** (the last dim of the input, batch_first or not, batched or not) are
  contracted by layer 0's ``weight_ih_l0`` (and ``weight_ih_l0_reverse`` when bidirectional)
  alone: a zeroed input channel adds nothing to any gate, so removing column j of those weights
  is exact. Layers above 0 read the hidden state below them, never the input.
- **The hidden units are not prunable.** The output, ``h_n`` (and ``c_n``) carry the hidden units
  (or the ``proj_size`` projection), which feed back into every gate through ``weight_hh`` at the
  next time step: zeroing a hidden channel after the layer (the oracle) is not removing that unit.
  These outputs are new channel spaces pinned with that reason (listed in ``plan.blocked_ops``;
  with no producer weight they count as no prunable channels); a given initial state ``h_0``
  (``c_0``) is pinned alike.

Example:
    >>> import torch, fxprune
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc, self.rnn = torch.nn.Linear(3, 8), torch.nn.LSTM(8, 4, batch_first=True)
    ...     def forward(self, x):
    ...         return self.rnn(self.fc(x))[0]
    >>> pruned = fxprune.transform(Net(), fxprune.Policy(ratio=0.5), (torch.randn(2, 5, 3),))
    >>> pruned.rnn.input_size, tuple(pruned.rnn.weight_ih_l0.shape), fxprune.verify(pruned).ok
    (4, (16, 4), True)
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .rules import arg, describe, ndim, opaque
from .state import Analysis, ChannelInfo, ParamRef
from ..shapes import is_tensor_shape

aten = torch.ops.aten

# ATen overloads of the recurrent layers on a padded tensor input and their initial-state
# argument: (input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first).
ATEN_OPS = (aten.lstm.input, aten.gru.input, aten.rnn_tanh.input, aten.rnn_relu.input)


def hidden_reason(node: fx.Node, where: str | None = None) -> str:
    """Why the hidden channels of a recurrent layer stay (names the node and, when known, the module).

    Example:
        >>> g = fx.Graph(); n = g.call_function(torch.relu, ())
        >>> hidden_reason(n, "rnn")[:60]
        "call_function relu at node 'relu' (module rnn): its output, "
    """
    at = f"{describe(node)}" + (f" (module {where})" if where else "")
    return (f"{at}: its output, h_n and c_n channels are hidden units of a recurrent layer, which "
            "feed back into every gate through weight_hh (recurrent state): zeroing one after the "
            "layer is not removing that unit, so none can go")


def _fresh_last(an: Analysis, node: fx.Node, shape: Any, reason: str) -> Any:
    """New pinned units along the last dim of every tensor in ``shape`` (nested like the output)."""
    if is_tensor_shape(shape):
        if not shape:
            return None
        d = len(shape) - 1
        units = an.units.new_atom(("out", node.name, d), shape[d], "opaque")
        an.units.pin(units, reason)
        return ChannelInfo(d, units)
    if isinstance(shape, (tuple, list)):
        return tuple(_fresh_last(an, node, s, reason) for s in shape)
    return None


def _pin_nodes(an: Analysis, value: Any, reason: str) -> None:
    """Pin the channels of every node in a (nested) argument."""
    nodes: list = []
    fx.node.map_arg(value, nodes.append)
    for n in nodes:
        an.pin_value(an.value(n), reason)


def _consume_input(an: Analysis, node: fx.Node, x: Any, weights: tuple[str, ...], owner: str, why: str) -> None:
    """Layer 0's input-to-hidden weights contract the input's last dim: their columns follow its
    channels; channels tracked anywhere else (or of another width) are pinned."""
    v, nd = an.tensor_info(x), ndim(an, x)
    width = an.param_tensor(weights[0]).shape[1]
    if v is not None and nd is not None and v.dim == nd - 1 and len(v.units) == width:
        for w in weights:
            an.slice_param(w, 1, "consumer", v.units, owner, why)
        return
    an.pin_value(an.value(x), f"{why}: its input's channels are not tracked on the feature (last) dim "
                              "its weight_ih_l0 contracts")
    for w in weights:
        an.frozen_params.setdefault(w, f"{why} reads all of its input features")


def _recurrent(an: Analysis, node: fx.Node, x: Any, hx: Any, weights: tuple[str, ...], owner: str,
               where: str | None) -> Any:
    why = describe(node) + (f" (module {where})" if where else "")
    if not is_tensor_shape(an.shape(x)):
        return opaque(an, node, f"{why}: its input is not a plain tensor (a PackedSequence?)")
    reason = hidden_reason(node, where)
    an.blocked_ops.append((node.name, reason))  # listed under the plan's blocked channel spaces
    _consume_input(an, node, x, weights, owner, why)
    if hx is not None:
        _pin_nodes(an, hx, reason)
    return _fresh_last(an, node, an.shape(node), reason)


def rnn_module(an: Analysis, node: fx.Node) -> Any:
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` as a leaf module: the input features are consumed by
    ``weight_ih_l0`` (and ``weight_ih_l0_reverse``); ``(output, h_n)`` / ``(output, (h_n, c_n))``
    carry new, pinned hidden channels (see the module docstring). The rewrite's fixer keeps
    ``input_size`` and the module's cached flat weights in step (``fxprune.rewrite.slicers``).

    Example:
        >>> import torch, fxprune
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.GRU(6, 4))
        >>> p = fxprune.plan(net, fxprune.Policy(ratio=0.5), (torch.randn(5, 2, 3),))
        >>> [(g.size, g.kept) for g in p.groups if g.removed]
        [(6, 3)]
    """
    m = an.modules[node.target]
    t = node.target
    weights = (f"{t}.weight_ih_l0",) + ((f"{t}.weight_ih_l0_reverse",) if m.bidirectional else ())
    hx = arg(node, 1, "hx")
    return _recurrent(an, node, arg(node, 0, "input"), hx, weights, t, None)


def rnn_aten(an: Analysis, node: fx.Node) -> Any:
    """``aten.lstm.input`` / ``aten.gru.input`` / ``aten.rnn_tanh.input`` / ``aten.rnn_relu.input``
    (torch.export's form of the layers): the flat weight list holds, per layer and direction,
    ``w_ih, w_hh[, b_ih, b_hh][, w_hr]``; layer 0's ``w_ih`` of each direction consumes the input
    features, the outputs are pinned hidden channels. Weights that are not ``get_attr`` tensors
    block the call.

    Example:
        >>> import torch, fxprune
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.RNN(6, 4, bidirectional=True))
        >>> p = fxprune.plan(net, fxprune.Policy(ratio=0.5), (torch.randn(5, 2, 3),), capture="export")
        >>> [(g.size, g.kept) for g in p.groups if g.removed]
        [(6, 3)]
    """
    from ..capture.relift import innermost_module
    x, hx, params = arg(node, 0, "input"), arg(node, 1, "hx"), arg(node, 2, "params")
    layers, bidirectional = arg(node, 4, "num_layers"), arg(node, 7, "bidirectional")
    origin = innermost_module(node)
    where = origin[0] if origin and origin[0] else None
    refs = [an.value(p) for p in params] if isinstance(params, (list, tuple)) else []
    dirs = 2 if bidirectional else 1
    if not refs or not all(isinstance(r, ParamRef) for r in refs) or not isinstance(layers, int) \
            or layers < 1 or len(refs) % (layers * dirs):
        return opaque(an, node, f"{describe(node)}: its weights are not a flat list of get_attr tensors "
                                f"({layers} layer(s), {dirs} direction(s))")
    stride = len(refs) // (layers * dirs)
    weights = tuple(refs[d * stride].target for d in range(dirs))
    owner = weights[0].rpartition(".")[0] or weights[0]
    return _recurrent(an, node, x, hx, weights, owner, where)
