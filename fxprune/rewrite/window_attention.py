"""torchvision's ``shifted_window_attention`` calls in plain torch ops, for heads that no longer
match the width of the stream they read.

torchvision's function (kept whole in the traced graph by ``torch.fx.wrap``) derives the head
width from its input, ``head_dim = C // num_heads``, and reshapes the heads' output back to
``C``. Once heads are removed apart from the stream (``attention_rules.shifted_window_attention``)
those no longer hold, so the call is replaced by the ops of :func:`window_attention`, the same
computation with ``head_dim`` and ``num_heads`` given: traced with ``torch.fx`` and inlined into
the pruned graph, so the result references only torch. Sizes that depend on the input's height
and width (padding, the shift that torchvision drops when the window covers the padded map) stay
run-time values, so the pruned model takes every input size the original takes.

Example:
    >>> import torch, fxprune
    >>> from torchvision.models import SwinTransformer
    >>> m = SwinTransformer([4, 4], 16, [1, 1], [2, 2], [4, 4], num_classes=3).eval()
    >>> x = torch.randn(1, 3, 16, 16)
    >>> pruned = fxprune.transform(m, fxprune.Policy(ratio=0.5, exact_only=True), (x,))
    >>> "shifted_window_attention" in pruned.code, fxprune.verify(pruned).ok
    (False, True)
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..coupling.rules import arg

_TENSORS = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "qkv_bias", "proj_bias", "logit_scale")
_POSITIONS = {"input": 0, "qkv_weight": 1, "proj_weight": 2, "relative_position_bias": 3, "window_size": 4,
              "num_heads": 5, "shift_size": 6, "attention_dropout": 7, "dropout": 8, "qkv_bias": 9,
              "proj_bias": 10, "logit_scale": 11, "training": 12}
_DEFAULTS = {"attention_dropout": 0.0, "dropout": 0.0, "training": True}


def _shift_mask(pad_h: Any, pad_w: Any, window: list, shift: tuple, num_windows: Any, device: Any, dtype: Any):
    """torchvision's attention mask of shifted windows: -100 between tokens of different regions.
    A row's region is 0, 1, 2 counted by the cuts ``pad_h - window`` and ``pad_h - shift``, as
    torchvision's three slices assign them (a shift of 0 puts every row in one region)."""
    rows, cols = torch.arange(pad_h, device=device), torch.arange(pad_w, device=device)
    rh = (rows >= pad_h - window[0]).long() + (rows >= pad_h - shift[0]).long()
    rw = (cols >= pad_w - window[1]).long() + (cols >= pad_w - shift[1]).long()
    region = rh.unsqueeze(1) * 3 + rw.unsqueeze(0)
    region = region.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    region = region.permute(0, 2, 1, 3).reshape(num_windows, window[0] * window[1])
    diff = region.unsqueeze(1) - region.unsqueeze(2)
    return torch.zeros(diff.shape, device=device, dtype=dtype).masked_fill(diff != 0, -100.0)


def window_attention(input: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor,
                     relative_position_bias: torch.Tensor, qkv_bias: Any, proj_bias: Any, logit_scale: Any, *,
                     window_size: list, num_heads: int, head_dim: int, shift_size: list,
                     attention_dropout: float = 0.0, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """torchvision's ``shifted_window_attention`` with ``num_heads`` heads of ``head_dim`` over an
    input of any width, written for ``torch.fx`` tracing (no data-dependent Python control flow).

    Example:
        >>> x, w = torch.randn(1, 4, 4, 6), torch.randn(3 * 4, 6)
        >>> y = window_attention(x, w, torch.randn(5, 4), torch.zeros(1, 2, 16, 16), None, None, None,
        ...                      window_size=[4, 4], num_heads=2, head_dim=2, shift_size=[0, 0])
        >>> tuple(y.shape)
        (1, 4, 4, 5)
    """
    b, h, w = input.size(0), input.size(1), input.size(2)
    pad_r = (window_size[1] - w % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - h % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    pad_h, pad_w = h + pad_b, w + pad_r
    shifted = sum(shift_size) > 0
    # torchvision drops the shift along a dim whose window covers the padded map
    shift = (shift_size[0] * (pad_h > window_size[0]), shift_size[1] * (pad_w > window_size[1]))
    if shifted:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    num_windows = (pad_h // window_size[0]) * (pad_w // window_size[1])
    x = x.view(b, pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1], -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b * num_windows, window_size[0] * window_size[1], -1)
    width = num_heads * head_dim
    if logit_scale is not None and qkv_bias is not None:  # v2: no key bias
        qkv_bias = torch.cat([qkv_bias[:width], torch.zeros_like(qkv_bias[width:2 * width]), qkv_bias[2 * width:]])
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * head_dim ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if shifted:
        mask = _shift_mask(pad_h, pad_w, window_size, shift, num_windows, x.device, x.dtype)
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), width)
    x = F.dropout(F.linear(x, proj_weight, proj_bias), p=dropout, training=training)
    x = x.view(b, pad_h // window_size[0], pad_w // window_size[1], window_size[0], window_size[1], -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, pad_h, pad_w, -1)
    if shifted:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


class _Traceable(nn.Module):
    """``window_attention`` with its constants fixed and its absent tensors left out."""

    def __init__(self, present: dict, consts: dict):
        super().__init__()
        self.present, self.consts = present, consts

    def forward(self, input, qkv_weight, proj_weight, relative_position_bias, qkv_bias, proj_bias, logit_scale):
        p = self.present
        return window_attention(input, qkv_weight, proj_weight, relative_position_bias,
                                qkv_bias if p["qkv_bias"] else None, proj_bias if p["proj_bias"] else None,
                                logit_scale if p["logit_scale"] else None, **self.consts)


def inline(node: fx.Node, payload: tuple, kept: Callable) -> None:
    """Replace a ``shifted_window_attention`` call by the ops of ``window_attention`` with the kept
    head count, when any width it touches changed; ``payload = (unit spaces, head_dim, heads)``."""
    spaces, head_dim, heads = payload
    if all(kept(u) == len(u) for u in spaces):
        return
    values = {name: arg(node, pos, name, _DEFAULTS.get(name)) for name, pos in _POSITIONS.items()}
    consts = dict(window_size=list(values["window_size"]), num_heads=kept(heads), head_dim=head_dim,
                  shift_size=list(values["shift_size"]), attention_dropout=values["attention_dropout"],
                  dropout=values["dropout"], training=values["training"])
    present = {n: values[n] is not None for n in ("qkv_bias", "proj_bias", "logit_scale")}
    sub = fx.symbolic_trace(_Traceable(present, consts))
    g = node.graph
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    val_map = {ph: values[name] for ph, name in zip(placeholders, _TENSORS)}
    with g.inserting_before(node):
        out = g.graph_copy(sub.graph, val_map)
    node.replace_all_uses_with(out)
    g.erase_node(node)
