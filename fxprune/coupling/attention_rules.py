"""Channel semantics of attention: ``nn.MultiheadAttention`` (a leaf module), torchvision's
fx-wrapped Swin functions, and heads split off a projection by a view (MaxViT, timm).

Three channel spaces meet in an attention block: the embedding it reads, its heads (the rows
of the q/k/v projections and the columns of the output projection) and the embedding it
writes. How they may shrink:

- **Separate heads** (``nn.MultiheadAttention`` called without masks, bias_kv, zero_attn,
  attention dropout or used weights; torchvision's ``shifted_window_attention``; views
  ``(..., C) -> (..., heads, C // heads)`` that feed an einsum/matmul): one unit per head, so
  whole heads go independently of the embeddings (with ``multihead_attention_dims``: one unit
  per head dim, the same dims go in every head). The module call is rewritten into its
  functional form when a width changes (``fxprune.rewrite.attention``), the Swin call into its
  plain ops (``fxprune.rewrite.window_attention``); a view keeps ``head_dim`` as a literal.
- **Coupled heads** (other ``nn.MultiheadAttention`` calls): the module derives the head width
  from the input width (``embed_dim == query.shape[-1]``), so heads can only go with the
  embedding channels they read: the embedding units are coarsened into whole heads
  (``"heads"``, default) or, with ``multihead_attention_dims``, into the same per-head dim of
  every head (``"dims"``).

Exactness against the mask oracle. No node output shows the q/k/v channels of a leaf call,
so its projection rows are *mask sites* (``Analysis.mask_at``): the oracle zeroes the removed
rows of the weight and bias, i.e. the removed q/k/v channels. A removed head then has v = 0,
so its output and its share of the output projection are zero: removing whole heads is exact.
Removing dim j of every head drops q_j k_j from the logits, as the masked q_j = 0 does, but
also turns the softmax scale 1/sqrt(d) into 1/sqrt(d'); the ``nn.MultiheadAttention`` fixer
scales the kept query rows by sqrt(d'/d), which makes per-head-dim removal exact too. The
embedding channels usually pass through a LayerNorm, which makes coupled heads approximate:
that mark comes from the LayerNorm rule.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Sequence

import torch
import torch.fx as fx

from .conv_rules import couple_blocks
from .rules import arg, describe, ndim, opaque
from .state import Analysis, ChannelInfo, ParamRef
from .tensor_rules import param_channels


def coarsen(an: Analysis, units: Sequence[int], heads: int, mode: str, why: str) -> tuple[int, ...]:
    """Merge the units of an embedding space by head structure; returns one unit per head
    (``"heads"``) or per head dim (``"dims"``).

    Example:
        >>> import torch
        >>> an = Analysis(torch.fx.symbolic_trace(torch.nn.Identity()))
        >>> u = an.units.new_atom("e", 6, "producer")
        >>> reps = coarsen(an, u, 2, "heads", "example")
        >>> len({an.units.find(x) for x in u}), len(reps)
        (2, 2)
    """
    units = tuple(units)
    d = len(units) // heads
    if mode == "heads":
        for h in range(heads):
            block = units[h * d:(h + 1) * d]
            an.units.union(block, (block[0],) * d, "heads", f"{why}: whole heads of {d} channels")
        return tuple(units[h * d] for h in range(heads))
    return couple_blocks(an, units, heads, f"{why}: the same dim of every head")


_CONTRACTIONS = {"einsum", "matmul", "bmm", "scaled_dot_product_attention", "__matmul__"}
# Ops between a head split and the attention contraction: layout, scaling, rotary embeddings
# (q * cos + rotate_half(q) * sin: mul, add, neg, cat of halves) and grouped-query attention's
# repeat_kv (unsqueeze, expand, reshape), and a per-head norm over head_dim (Gemma 4's q_norm/k_norm:
# F.rms_norm(q, [head_dim], w); a norm that reaches the heads axis is marked by its own rule).
_TRANSPARENT = {"permute", "transpose", "swapaxes", "contiguous", "mul", "truediv", "div", "to", "float", "clone",
                "unbind", "getitem", "chunk", "split", "add", "sub", "neg", "cat", "unsqueeze", "expand",
                "reshape", "view", "type_as", "rms_norm", "layer_norm"}


def _feeds_contraction(node: fx.Node, depth: int = 8) -> bool:
    """True when ``node`` reaches a matmul-like op through layout and scaling ops only (within
    ``depth`` ops: Gemma 4 goes view, q_norm, split, getitem, mul, add, cat, transpose to attention)."""
    for user in node.users:
        name = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", "")
        if name in _CONTRACTIONS:
            return True
        if depth and name in _TRANSPARENT and _feeds_contraction(user, depth - 1):
            return True
    return False


def split_heads(an: Analysis, node: fx.Node, v: ChannelInfo, in_shape: tuple, out_shape: tuple) -> Any:
    """A view/reshape that splits the channel dim into ``(..., heads, head_dim)`` (e.g.
    ``(B, N, 3C) -> (B, N, 3, heads, C // heads)``) and feeds a matmul/einsum (attention): the
    heads axis carries the channels and every other position of a head goes with it, so whole
    heads are removed and stay a batch dim of the contractions. None when it does not apply.

    Example:
        >>> import torch, fxprune
        >>> class Heads(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.qkv, self.out = torch.nn.Linear(4, 24), torch.nn.Linear(8, 4)
        ...     def forward(self, x):
        ...         t = self.qkv(x).chunk(3, -1)
        ...         q, k, v = [t[i].reshape(2, 5, 2, 4).transpose(1, 2) for i in range(3)]
        ...         a = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        ...         return self.out(a.transpose(1, 2).reshape(2, 5, 8))
        >>> p = fxprune.plan(Heads(), fxprune.Policy(ratio=0.5), (torch.randn(2, 5, 4),))
        >>> [(g.size, g.kept, g.exact) for g in p.groups if g.removed]   # 2 heads
        [(2, 1, True)]
    """
    cd = v.dim
    k = len(out_shape) - len(in_shape) + 1
    if k < 2 or tuple(in_shape[:cd]) != tuple(out_shape[:cd]) or tuple(in_shape[cd + 1:]) != tuple(out_shape[cd + k:]) \
            or math.prod(out_shape[cd:cd + k]) != in_shape[cd] or out_shape[cd + k - 2] < 2 \
            or not _feeds_contraction(node):
        return None
    factors = tuple(out_shape[cd:cd + k])
    grid = torch.arange(len(v.units)).reshape(factors).movedim(k - 2, 0).reshape(factors[k - 2], -1)
    why = f"{describe(node)} splits the channel dim into {factors}: whole heads (axis {k - 2}) go together"
    reps = []
    for row in grid.tolist():
        members = tuple(v.units[i] for i in row)
        an.units.union(members, (members[0],) * len(members), "heads", why)
        reps.append(members[0])
    fixed = {d: out_shape[d] for d in range(cd, cd + k) if d != cd + k - 2}
    an.rewrite_literal(node, "view_dims", (tuple(reps), fixed))
    return ChannelInfo(cd + k - 2, tuple(reps))


def _tracked_last(an: Analysis, x: Any) -> ChannelInfo | None:
    v = an.tensor_info(x)
    nd = ndim(an, x)
    return v if v is not None and nd is not None and v.dim == nd - 1 else None


def _weights_used(node: fx.Node, need_weights: Any) -> bool:
    """True when the averaged attention weights (output 1) are read by anything."""
    if need_weights is False:
        return False
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem and (user.args[1] == 0 or not user.users):
            continue
        return True
    return False


def _mha_problem(an: Analysis, node: fx.Node, m: Any) -> str | None:
    q = arg(node, 0, "query")
    if _tracked_last(an, q) is None:
        return "the query's channels are not tracked on its last dim"
    mask = arg(node, 5, "attn_mask")
    if isinstance(mask, fx.Node) and ndim(an, mask) == 3:
        return "a per-head attn_mask of shape (N*num_heads, L, S) is not supported"
    if len(_tracked_last(an, q).units) != m.embed_dim:
        return "query width differs from embed_dim"
    return None


def _functional_form_problem(node: fx.Node, m: Any) -> str | None:
    """Why this call cannot be rewritten as F.linear + scaled_dot_product_attention (None: it can)."""
    if arg(node, 3, "key_padding_mask") is not None or arg(node, 5, "attn_mask") is not None:
        return "attention masks"
    if arg(node, 7, "is_causal", False) or m.bias_k is not None or m.add_zero_attn or m.dropout:
        return "is_causal / add_bias_kv / add_zero_attn / attention dropout"
    if _weights_used(node, arg(node, 4, "need_weights", True)):
        return "its attention weights (averaged over heads) are used"
    if any(u.op != "call_function" or u.target is not operator.getitem for u in node.users):
        return "its output tuple is used as a whole"
    return None


def _separate_units(an: Analysis, node: fx.Node, m: Any, mode: str, nd: int) -> tuple[tuple, tuple, tuple]:
    """(one unit per head or per head dim, the unit of each q/k/v row, the output units) of a
    call with its own head space (the existing ones when the module is called again)."""
    first = f"{node.target}.in_proj_weight" if m._qkv_same_embed_dim else f"{node.target}.q_proj_weight"
    heads, d = m.num_heads, m.head_dim
    if (first, 0) in an.params:
        rows = an.params[(first, 0)].units[:m.embed_dim]
    else:
        new = an.units.new_atom((mode, node.target), heads if mode == "heads" else d, "producer")
        rows = tuple(new[h] if mode == "heads" else new[j] for h in range(heads) for j in range(d))
    units = rows[0:m.embed_dim:d] if mode == "heads" else rows[:d]
    out_units = an.producer_units(f"{node.target}.out_proj.weight", 0, m.out_proj.out_features,
                                  ("out", node.name, nd - 1))
    return units, rows, out_units


def _mha_projections(an: Analysis, node: fx.Node, m: Any, rows: tuple, out_units: tuple, why: str) -> None:
    """Declare every tensor of the module: q/k/v rows follow ``rows`` (masked by the oracle),
    their columns the inputs' channels, the output projection ``rows`` -> ``out_units``."""
    t = node.target
    q, k, v = arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")
    packed = m._qkv_same_embed_dim
    names = ["in_proj_weight"] * 3 if packed else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    for name in dict.fromkeys(names):
        an.slice_param(f"{t}.{name}", 0, "producer", rows * 3 if packed else rows, t, why)
        an.mask_at(f"{t}.{name}", 0)
    for x, name in zip((q, k, v), names):
        xi = _tracked_last(an, x)
        if xi is not None and len(xi.units) == an.param_tensor(f"{t}.{name}").shape[1]:
            an.slice_param(f"{t}.{name}", 1, "consumer", xi.units, t, why)
        else:
            reason = f"{why}: its inputs' channels are not tracked on the last dim"
            an.pin_value(an.value(x), reason)
            an.pin_value(an.value(q), reason)
    if m.in_proj_bias is not None:
        an.slice_param(f"{t}.in_proj_bias", 0, "passenger", rows * 3, t, why)
        an.mask_at(f"{t}.in_proj_bias", 0)
    for name in ("bias_k", "bias_v"):
        if getattr(m, name, None) is not None:
            an.slice_param(f"{t}.{name}", 2, "passenger", rows, t, why)
            an.mask_at(f"{t}.{name}", 2)
    an.slice_param(f"{t}.out_proj.weight", 1, "consumer", rows, f"{t}.out_proj", why)
    an.slice_param(f"{t}.out_proj.weight", 0, "producer", out_units, f"{t}.out_proj", why)
    if m.out_proj.bias is not None:
        an.slice_param(f"{t}.out_proj.bias", 0, "passenger", out_units, f"{t}.out_proj", why)


def multihead_attention(an: Analysis, node: fx.Node, mode: str = "heads") -> Any:
    """``nn.MultiheadAttention`` as a leaf.

    A call without masks, bias_kv, zero_attn, attention dropout or used weights gets its own
    head space: whole heads go independently of the embedding (exact), and the rewrite turns
    the call into ``F.linear`` + ``F.scaled_dot_product_attention`` + ``out_proj`` once any
    width changes (``fxprune.rewrite.attention``). Any other call keeps the module: its heads
    (or, with ``mode="dims"``, the same per-head dims in every head) go together with the
    embedding channels they read.

    Example:
        >>> import torch, fxprune
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.inp, self.mha = torch.nn.Linear(4, 8), torch.nn.MultiheadAttention(8, 2, batch_first=True)
        ...         self.out = torch.nn.Linear(8, 3)
        ...     def forward(self, x):
        ...         h = self.inp(x)
        ...         return self.out(self.mha(h, h, h, need_weights=False)[0])
        >>> p = fxprune.plan(Net(), fxprune.Policy(ratio=0.5), (torch.randn(2, 5, 4),))
        >>> [(g.size, g.kept) for g in p.groups if g.removed]   # embedding 8, heads 2, mha output 8
        [(8, 4), (2, 1), (8, 4)]
    """
    m = an.modules[node.target]
    why = describe(node)
    separate = _functional_form_problem(node, m) is None
    problem = None if separate else _mha_problem(an, node, m)
    if problem:
        return opaque(an, node, f"{why}: {problem}")
    q = arg(node, 0, "query")
    nd = ndim(an, q)
    if separate:
        heads, rows, out_units = _separate_units(an, node, m, mode, nd)
    else:
        cols = _tracked_last(an, q).units
        heads = coarsen(an, cols, m.num_heads, mode, why)
        rows = out_units = cols
    _mha_projections(an, node, m, rows, out_units, why)
    if not separate and _weights_used(node, arg(node, 4, "need_weights", True)):
        an.units.pin(cols, f"{why}: its attention weights (averaged over heads) are used")
    if mode == "heads":
        an.size_module(node.target, heads, why)  # the fixer reads the kept heads as "kept"
    if separate:
        spaces = [heads, out_units] + [an.tensor_info(x).units for x in node.args[:3] if an.tensor_info(x)]
        an.rewrite_literal(node, "attention", (tuple(spaces), not m.batch_first and nd == 3))
    out = ChannelInfo(nd - 1, out_units)
    shape = an.shape(node)
    return (out, None) if isinstance(shape, tuple) and len(shape) == 2 and not isinstance(shape[0], int) else out


def multihead_attention_dims(an: Analysis, node: fx.Node) -> Any:
    """``nn.MultiheadAttention`` pruned by per-head dims; select it with
    ``fxprune.coupling.ops.register_module_rule(nn.MultiheadAttention, multihead_attention_dims)``."""
    return multihead_attention(an, node, mode="dims")


# -- torchvision Swin (functions wrapped with torch.fx.wrap) -------------------------------
def _param(an: Analysis, node: fx.Node, pos: int, name: str) -> str | None:
    v = an.value(arg(node, pos, name))
    return v.target if isinstance(v, ParamRef) else None


def _window_head_units(an: Analysis, qkv_w: str, heads: int, d: int) -> tuple[tuple, tuple]:
    """(one unit per head, the unit of each of the ``heads * d`` rows of q, k or v): new ones,
    or those of an earlier call with the same weights."""
    if (qkv_w, 0) in an.params:
        rows = an.params[(qkv_w, 0)].units[:heads * d]
        return rows[::d], rows
    units = an.units.new_atom(("heads", qkv_w.rsplit(".", 1)[0]), heads, "producer")
    return units, tuple(units[h] for h in range(heads) for _ in range(d))


def shifted_window_attention(an: Analysis, node: fx.Node) -> Any:
    """torchvision's ``shifted_window_attention(x[B,H,W,C], qkv_weight, proj_weight, bias, ...)``:
    one unit per head, apart from the C channels it reads and those it writes. A head is its q,
    k and v rows of ``qkv_weight`` (masked by the oracle: a removed head's values are zero, so
    its output is), its columns of ``proj_weight``, its column of the relative position bias
    (v1's table, v2's ``cpb_mlp`` output rows) and v2's ``logit_scale`` entry. The function
    derives ``head_dim`` from the input width, so once any width changes the rewrite replaces
    the call by plain ops with the kept head count (``fxprune.rewrite.window_attention``).

    Example:
        >>> import torch, fxprune
        >>> from torchvision.models import SwinTransformer
        >>> m = SwinTransformer([4, 4], 16, [1, 1], [2, 2], [4, 4], num_classes=3).eval()
        >>> p = fxprune.plan(m, fxprune.Policy(ratio=0.5, exact_only=True), (torch.randn(1, 3, 16, 16),))
        >>> [(g.size, g.kept) for g in p.groups if g.size == 2]   # 2 heads of 8 -> 1, in each stage
        [(2, 1), (2, 1)]
    """
    why = describe(node)
    x = arg(node, 0, "input")
    xi, heads = _tracked_last(an, x), arg(node, 5, "num_heads")
    qkv_w, proj_w = _param(an, node, 1, "qkv_weight"), _param(an, node, 2, "proj_weight")
    if xi is None or not isinstance(heads, int) or qkv_w is None or proj_w is None:
        return opaque(an, node, f"{why}: expects channels-last input and get_attr weights")
    width = len(xi.units)
    if width % heads or an.param_tensor(qkv_w).shape[0] != 3 * width:
        return opaque(an, node, f"{why}: qkv_weight is not 3 x the input width in whole heads")
    d = width // heads
    reps, rows = _window_head_units(an, qkv_w, heads, d)
    qkv_owner, proj_owner = qkv_w.rsplit(".", 1)[0], proj_w.rsplit(".", 1)[0]
    out_units = an.producer_units(proj_w, 0, an.param_tensor(proj_w).shape[0], ("out", node.name, 3))
    an.slice_param(qkv_w, 1, "consumer", xi.units, qkv_owner, why)
    an.slice_param(qkv_w, 0, "producer", rows * 3, qkv_owner, why)
    an.mask_at(qkv_w, 0)
    an.slice_param(proj_w, 1, "consumer", rows, proj_owner, why)
    an.slice_param(proj_w, 0, "producer", out_units, proj_owner, why)
    qkv_b, proj_b = _param(an, node, 9, "qkv_bias"), _param(an, node, 10, "proj_bias")
    if qkv_b is not None:
        an.slice_param(qkv_b, 0, "passenger", rows * 3, qkv_owner, why)
        an.mask_at(qkv_b, 0)
    if proj_b is not None:
        an.slice_param(proj_b, 0, "passenger", out_units, proj_owner, why)
    logit = _param(an, node, 11, "logit_scale")
    if logit is not None:
        an.slice_param(logit, 0, "passenger", reps, logit.rsplit(".", 1)[0], why)
    _couple_head_bias(an, node, reps, why)
    an.rewrite_literal(node, "window_attention", ((reps, xi.units, out_units), d, reps))
    return ChannelInfo(3, out_units)


def _couple_head_bias(an: Analysis, node: fx.Node, reps: tuple, why: str) -> None:
    bias = an.value(arg(node, 3, "relative_position_bias"))
    if isinstance(bias, ChannelInfo) and bias.dim == 1 and len(bias.units) == len(reps):
        an.units.union(reps, bias.units, "identity", f"{why}: per-head position bias")
    elif isinstance(bias, ParamRef) and an.param_tensor(bias.target).dim() == 4 \
            and an.param_tensor(bias.target).shape[1] == len(reps):
        an.slice_param(bias.target, 1, "passenger", reps, bias.target, why)
    else:
        an.pin_value(bias, f"{why}: its position bias is not tracked per head")
        an.units.pin(reps, f"{why}: its position bias is not tracked per head")


def relative_position_bias(an: Analysis, node: fx.Node) -> Any:
    """torchvision's ``_get_relative_position_bias(table[L, heads], index, window)`` -> [1, heads, N, N]."""
    table = an.value(arg(node, 0, "relative_position_bias_table"))
    if isinstance(table, ParamRef) and an.param_tensor(table.target).dim() == 2:
        return ChannelInfo(1, param_channels(an, table.target, 1, describe(node)))
    if isinstance(table, ChannelInfo) and table.dim == 1 and ndim(an, node.args[0]) == 2:
        return ChannelInfo(1, table.units)
    return opaque(an, node, f"{describe(node)}: the bias table's heads are not on its last dim")


def patch_merging_pad(an: Analysis, node: fx.Node) -> Any:
    """torchvision's ``_patch_merging_pad(x[..., H, W, C])`` -> [..., H/2, W/2, 4C]: four strided
    copies of the C channels, laid end to end."""
    x = arg(node, 0, "x")
    v = _tracked_last(an, x)
    if v is None:
        return opaque(an, node, f"{describe(node)}: channels are not on the last dim")
    return ChannelInfo(ndim(an, x) - 1, v.units * 4)
