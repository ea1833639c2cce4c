"""Random networks built from blocks, as hypothesis strategies, for property tests of fxprune.

A network is described by a ``NetSpec`` (plain data: dims, input shape, a list of ``BlockSpec``,
a head and an output structure); ``build(spec)`` turns it into a float64 ``nn.Module`` and an
example input, deterministically from ``spec.seed``. The strategies only draw specs, so a
failing example is printed as a readable spec that ``build`` reproduces exactly.

Every network's ``forward`` is a Python loop over its stored ``nn.ModuleList`` of blocks, with no
data-dependent control flow, so ``torch.fx`` traces it. Blocks cover the coupling patterns of the
README: conv-bn-act (with stride or pooling), residual adds (identity and projection shortcuts),
channel concat (a piece may appear twice), split and chunk on the channel dim (of a conv output or
straight across an earlier concat; pieces concatenated back in any order, multiplied or added),
elementwise add/sub/mul of two branches, grouped and depthwise convolutions (channel multipliers
included), squeeze-excitation gates, one module called twice (inside a block, or the same block
reused later in the chain), flatten -> Linear heads in every spelling, and tuple or dict outputs
of intermediate tensors. Conv1d and Conv2d networks are both generated, handed over in eval
mode, training mode, or training mode with frozen (eval) BatchNorms. Networks are tiny (widths
2-12, spatial size 4-8, at most 6 blocks) so one example runs in a fraction of a second.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

import fxprune

MIN_WIDTH, MAX_WIDTH = 2, 12
MAX_BLOCKS = 6
MAX_CONCAT_WIDTH = 24  # concats may grow wider than MAX_WIDTH; past this a conv narrows again

CONV = {1: nn.Conv1d, 2: nn.Conv2d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
ACTS = ("relu", "relu6", "silu", "gelu", "hardswish", "tanh", "sigmoid", "identity")
FLATTEN_SPELLINGS = ("torch.flatten", "method.flatten", "nn.Flatten", "view_size", "reshape_shape",
                     "view_literal")


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One block: ``kind`` and its parameters as sorted ``(name, value)`` pairs; its repr is the
    ``block(...)`` call that makes it, so a printed ``NetSpec`` can be pasted back."""

    kind: str
    params: tuple

    @property
    def p(self) -> dict:
        return dict(self.params)

    def __repr__(self) -> str:
        inner = "".join(f", {k}={v!r}" for k, v in self.params)
        return f"block({self.kind!r}{inner})"


def block(kind: str, /, **params: Any) -> BlockSpec:
    """A ``BlockSpec`` from keyword parameters."""
    return BlockSpec(kind, tuple(sorted(params.items())))


@dataclasses.dataclass(frozen=True)
class NetSpec:
    """A whole network: input ``(batch, in_ch, *[spatial] * dims)``, blocks, head and outputs.

    ``taps`` are indices of blocks whose outputs are returned besides the head's (tuple or dict
    output); ``mode`` is the train/eval state the model is handed over in.
    """

    dims: int
    batch: int
    in_ch: int
    spatial: int
    blocks: tuple
    head: BlockSpec
    output: str
    taps: tuple
    mode: str
    seed: int

    def input_shape(self) -> tuple:
        return (self.batch, self.in_ch) + (self.spatial,) * self.dims


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------

def act(name: str, x: torch.Tensor) -> torch.Tensor:
    """Apply an activation by name (a trace-time constant, so no data-dependent control flow)."""
    if name == "relu":
        return F.relu(x)
    if name == "relu6":
        return F.relu6(x)
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "hardswish":
        return F.hardswish(x)
    if name == "tanh":
        return torch.tanh(x)
    if name == "sigmoid":
        return torch.sigmoid(x)
    return x


def _spatial_dims(dims: int) -> tuple:
    return tuple(range(2, 2 + dims))


def _down(s: int, stride: int) -> int:
    """Spatial size after an odd-kernel, half-padded convolution with ``stride``."""
    return (s - 1) // stride + 1


class ConvBnAct(nn.Module):
    """conv -> optional BatchNorm -> activation, optionally followed by a max/avg pool of 2."""

    def __init__(self, dims, cin, cout, k, stride, bias, bn, act, pool):
        super().__init__()
        self.conv = CONV[dims](cin, cout, k, stride=stride, padding=k // 2, bias=bias)
        self.bn = BN[dims](cout) if bn else nn.Identity()
        self.act, self.pool, self.dims = act, pool, dims

    def forward(self, x):
        x = act(self.act, self.bn(self.conv(x)))
        if self.pool == "max":
            x = (F.max_pool1d if self.dims == 1 else F.max_pool2d)(x, 2)
        elif self.pool == "avg":
            x = (F.avg_pool1d if self.dims == 1 else F.avg_pool2d)(x, 2)
        return x


class Residual(nn.Module):
    """``act(bn(conv(act(bn(conv(x))))) + shortcut(x))``; the shortcut is ``x`` or a 1x1
    projection (with BatchNorm); the add is spelled ``+``, ``torch.add`` or in-place ``+=``."""

    def __init__(self, dims, cin, cout, mid, stride, proj, act, add):
        super().__init__()
        self.c1, self.b1 = CONV[dims](cin, mid, 3, stride, 1, bias=False), BN[dims](mid)
        self.c2, self.b2 = CONV[dims](mid, cout, 3, 1, 1, bias=False), BN[dims](cout)
        self.proj = None
        if proj:
            self.proj = nn.Sequential(CONV[dims](cin, cout, 1, stride, bias=False), BN[dims](cout))
        self.act, self.add = act, add

    def forward(self, x):
        out = self.b2(self.c2(act(self.act, self.b1(self.c1(x)))))
        short = x if self.proj is None else self.proj(x)
        if self.add == "torch.add":
            out = torch.add(out, short)
        elif self.add == "iadd":
            out += short
        else:
            out = out + short
        return act(self.act, out)


class Concat(nn.Module):
    """Branches (convs of ``widths``, plus the input itself when ``identity``) concatenated on
    the channel dim in the order ``order`` (a permutation of the pieces, maybe with one piece
    repeated: ``cat([a, b, a])``)."""

    def __init__(self, dims, cin, widths, ks, identity, order, act):
        super().__init__()
        self.branches = nn.ModuleList(CONV[dims](cin, w, k, padding=k // 2) for w, k in zip(widths, ks))
        self.identity, self.order, self.act = identity, order, act

    def forward(self, x):
        pieces = [act(self.act, b(x)) for b in self.branches]
        if self.identity:
            pieces.append(x)
        return torch.cat([pieces[i] for i in self.order], dim=1)


class SplitJoin(nn.Module):
    """Split on the channel dim (after a 1x1 conv to ``width`` channels when ``pre``, else the
    incoming tensor itself, which may be a concat whose pieces the split boundaries cross),
    pieces optionally convolved, then joined: ``"cat"`` in the order ``order``, or for two pieces
    of equal width ``"mul"`` (``act(u) * sigmoid(v)``) or ``"add"`` (``act(u) + v``).

    ``how``: ``"split_list"`` (``torch.split(x, sizes, 1)``), ``"split_method"``
    (``x.split(sizes, dim=1)``), ``"split_int"`` (``torch.split(x, size, 1)``, equal pieces),
    ``"chunk_method"`` (``x.chunk(n, dim=1)``), ``"chunk_fn"`` (``torch.chunk(x, n, 1)``).
    """

    def __init__(self, dims, cin, width, how, sizes, piece_out, join, order, act, pre):
        super().__init__()
        self.pre = CONV[dims](cin, width, 1) if pre else nn.Identity()
        self.piece_convs = nn.ModuleList(
            CONV[dims](s, o, 3, padding=1) if o else nn.Identity() for s, o in zip(sizes, piece_out))
        self.how, self.sizes, self.join, self.order, self.act = how, list(sizes), join, order, act

    def forward(self, x):
        x = self.pre(x)
        n = len(self.sizes)
        if self.how == "split_list":
            pieces = torch.split(x, self.sizes, 1)
        elif self.how == "split_method":
            pieces = x.split(self.sizes, dim=1)
        elif self.how == "split_int":
            pieces = torch.split(x, self.sizes[0], 1)
        elif self.how == "chunk_method":
            pieces = x.chunk(n, dim=1)
        else:
            pieces = torch.chunk(x, n, 1)
        pieces = [conv(pieces[i]) for i, conv in enumerate(self.piece_convs)]
        if self.join == "mul":
            return act(self.act, pieces[0]) * torch.sigmoid(pieces[1])
        if self.join == "add":
            return act(self.act, pieces[0]) + pieces[1]
        return act(self.act, torch.cat([pieces[i] for i in self.order], 1))


class Binary(nn.Module):
    """Two conv branches of equal width combined elementwise: ``act(a(x)) <op> b(x)``."""

    def __init__(self, dims, cin, width, op, act):
        super().__init__()
        self.a = CONV[dims](cin, width, 3, padding=1)
        self.b = CONV[dims](cin, width, 1)
        self.op, self.act = op, act

    def forward(self, x):
        u, v = act(self.act, self.a(x)), self.b(x)
        if self.op == "mul":
            return u * v
        if self.op == "sub":
            return torch.sub(u, v)
        if self.op == "add_alpha":
            return torch.add(u, v, alpha=0.5)
        return u + v


class GroupedConv(nn.Module):
    """A convolution with ``1 < groups < in_channels`` (not depthwise), BatchNorm, activation."""

    def __init__(self, dims, cin, cout, groups, k, bias, act):
        super().__init__()
        self.conv = CONV[dims](cin, cout, k, padding=k // 2, groups=groups, bias=bias)
        self.bn = BN[dims](cout)
        self.act = act

    def forward(self, x):
        return act(self.act, self.bn(self.conv(x)))


class Depthwise(nn.Module):
    """A depthwise convolution (``groups == in_channels``) with channel multiplier ``mult``."""

    def __init__(self, dims, c, mult, k, stride, bn, act):
        super().__init__()
        self.conv = CONV[dims](c, c * mult, k, stride=stride, padding=k // 2, groups=c, bias=not bn)
        self.bn = BN[dims](c * mult) if bn else nn.Identity()
        self.act = act

    def forward(self, x):
        return act(self.act, self.bn(self.conv(x)))


class SqueezeExcite(nn.Module):
    """``x * gate(...)`` with the gate from pooled features: 1x1 convs on an adaptive pool
    (``"conv"``) or Linears on a spatial mean, broadcast back with ``None`` indexing (``"linear"``)."""

    def __init__(self, dims, c, hidden, style, gate):
        super().__init__()
        self.dims, self.style, self.gate = dims, style, gate
        if style == "conv":
            self.fc1, self.fc2 = CONV[dims](c, hidden, 1), CONV[dims](hidden, c, 1)
        else:
            self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, c)

    def forward(self, x):
        if self.style == "conv":
            pooled = (F.adaptive_avg_pool1d if self.dims == 1 else F.adaptive_avg_pool2d)(x, 1)
            s = self.fc2(F.relu(self.fc1(pooled)))
        else:
            s = self.fc2(F.relu(self.fc1(x.mean(_spatial_dims(self.dims)))))
            s = s[(slice(None), slice(None)) + (None,) * self.dims]
        s = torch.sigmoid(s) if self.gate == "sigmoid" else F.hardsigmoid(s)
        return x * s


class SharedCall(nn.Module):
    """Two branches of equal width through one shared conv, added: ``s(act(a(x))) + s(tanh(b(x)))``."""

    def __init__(self, dims, cin, width, cout, act):
        super().__init__()
        self.a = CONV[dims](cin, width, 3, padding=1)
        self.b = CONV[dims](cin, width, 1)
        self.shared = CONV[dims](width, cout, 3, padding=1)
        self.act = act

    def forward(self, x):
        return self.shared(act(self.act, self.a(x))) + self.shared(torch.tanh(self.b(x)))


class Head(nn.Module):
    """The last stage: ``"none"`` (the features), ``"conv"`` (1x1 conv), ``"pool"`` (adaptive
    pool to 1 then flatten), ``"mean"`` (mean over space), ``"flatten"`` (all positions flattened),
    each of the last three followed by one or two Linears; ``spelling`` is how it flattens."""

    def __init__(self, dims, cin, spatial, kind, spelling, hidden, nout):
        super().__init__()
        self.dims, self.kind, self.spelling = dims, kind, spelling
        self.flat_width = cin * spatial ** dims if kind == "flatten" else cin
        self.flat = nn.Flatten() if spelling == "nn.Flatten" else None
        self.fc1 = self.fc2 = self.conv = None
        if kind == "conv":
            self.conv = CONV[dims](cin, nout, 1)
        elif kind != "none":
            if hidden:
                self.fc1, self.fc2 = nn.Linear(self.flat_width, hidden), nn.Linear(hidden, nout)
            else:
                self.fc2 = nn.Linear(self.flat_width, nout)

    def _flatten(self, x):
        s = self.spelling
        if s == "torch.flatten":
            return torch.flatten(x, 1)
        if s == "method.flatten":
            return x.flatten(1)
        if s == "nn.Flatten":
            return self.flat(x)
        if s == "view_size":
            return x.view(x.size(0), -1)
        if s == "reshape_shape":
            return x.reshape(x.shape[0], -1)
        return x.view(-1, self.flat_width)

    def forward(self, x):
        if self.kind == "none":
            return x
        if self.kind == "conv":
            return self.conv(x)
        if self.kind == "pool":
            x = self._flatten((F.adaptive_avg_pool1d if self.dims == 1 else F.adaptive_avg_pool2d)(x, 1))
        elif self.kind == "mean":
            x = x.mean(_spatial_dims(self.dims))
        else:
            x = self._flatten(x)
        if self.fc1 is not None:
            x = F.relu(self.fc1(x))
        return self.fc2(x)


class Net(nn.Module):
    """Blocks applied in order by a loop over ``self.blocks`` (a block may appear twice: the same
    module called at two places), then the head; returns a tensor, a tuple or a dict."""

    def __init__(self, blocks, head, output, taps):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.output, self.taps = output, tuple(taps)

    def forward(self, x):
        feats = []
        for b in self.blocks:
            x = b(x)
            feats.append(x)
        y = self.head(x)
        if self.output == "tensor":
            return y
        if self.output == "tuple":
            return (y,) + tuple(feats[i] for i in self.taps)
        out = {"out": y}
        for i in self.taps:
            out[f"block{i}"] = feats[i]
        return out


def _make_block(dims: int, spec: BlockSpec, made: list) -> nn.Module:
    p = spec.p
    k = spec.kind
    if k == "conv":
        return ConvBnAct(dims, p["cin"], p["cout"], p["k"], p["stride"], p["bias"], p["bn"], p["act"],
                         p["pool"])
    if k == "residual":
        return Residual(dims, p["cin"], p["cout"], p["mid"], p["stride"], p["proj"], p["act"], p["add"])
    if k == "concat":
        return Concat(dims, p["cin"], p["widths"], p["ks"], p["identity"], p["order"], p["act"])
    if k == "split":
        return SplitJoin(dims, p["cin"], p["width"], p["how"], p["sizes"], p["piece_out"], p["join"],
                         p["order"], p["act"], p["pre"])
    if k == "binary":
        return Binary(dims, p["cin"], p["width"], p["op"], p["act"])
    if k == "grouped":
        return GroupedConv(dims, p["cin"], p["cout"], p["groups"], p["k"], p["bias"], p["act"])
    if k == "depthwise":
        return Depthwise(dims, p["c"], p["mult"], p["k"], p["stride"], p["bn"], p["act"])
    if k == "se":
        return SqueezeExcite(dims, p["c"], p["hidden"], p["style"], p["gate"])
    if k == "shared":
        return SharedCall(dims, p["cin"], p["width"], p["cout"], p["act"])
    if k == "reuse":
        return made[p["of"]]
    raise ValueError(f"unknown block kind {k!r}")


def randomise_norms(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters (as ``tests/zoo.py``)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def build(spec: NetSpec) -> tuple[nn.Module, tuple]:
    """The float64 model of ``spec`` (weights from ``spec.seed``) and its example input
    (``build_input(spec, 0)``); the global RNG state is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        made: list = []
        for b in spec.blocks:
            made.append(_make_block(spec.dims, b, made))
        hp = spec.head.p
        head = Head(spec.dims, hp["cin"], hp["spatial"], hp["kind"], hp["spelling"], hp["hidden"], hp["nout"])
        model = Net(made, head, spec.output, spec.taps)
        randomise_norms(model)
        model = model.to(torch.float64)
        if spec.mode == "eval":
            model.eval()
        elif spec.mode == "train":
            model.train()
        else:  # "mixed": a model in training mode whose BatchNorms are frozen
            model.train()
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
    return model, build_input(spec, 0)


def build_input(spec: NetSpec, seed: int) -> tuple:
    """An input of ``spec``'s shape; ``seed=0`` is the example input, any other seed gives a
    fresh input the planner never saw (global RNG untouched)."""
    g = torch.Generator().manual_seed(spec.seed * 7919 + seed)
    return (torch.randn(spec.input_shape(), dtype=torch.float64, generator=g),)


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

widths = st.integers(MIN_WIDTH, MAX_WIDTH)
acts = st.sampled_from(ACTS)


def _divisors(n: int) -> list[int]:
    return [d for d in range(2, n) if n % d == 0]


@st.composite
def conv_blocks(draw, dims: int, cin: int, spatial: int):
    """conv-bn-act: any width, kernel 1 or 3, stride 2 or a pool of 2 while the map is >= 4."""
    cout = draw(widths)
    k = draw(st.sampled_from([1, 3]))
    shrink = spatial >= 4 and draw(st.integers(0, 4)) == 0
    stride = 2 if shrink and draw(st.booleans()) else 1
    pool = draw(st.sampled_from(["max", "avg"])) if shrink and stride == 1 else "none"
    spec = block("conv", cin=cin, cout=cout, k=k, stride=stride, bias=draw(st.booleans()),
                 bn=draw(st.booleans()), act=draw(acts), pool=pool)
    if stride == 2:
        return spec, cout, _down(spatial, stride)
    return spec, cout, spatial // 2 if pool != "none" else spatial


@st.composite
def residual_blocks(draw, dims: int, cin: int, spatial: int):
    """Residual add: identity shortcut (same width, stride 1) or a 1x1 projection shortcut."""
    proj = draw(st.booleans())
    cout = draw(widths) if proj else cin
    stride = 2 if proj and spatial >= 4 and draw(st.integers(0, 3)) == 0 else 1
    spec = block("residual", cin=cin, cout=cout, mid=draw(widths), stride=stride, proj=proj,
                 act=draw(st.sampled_from(["relu", "silu", "identity"])),
                 add=draw(st.sampled_from(["+", "torch.add", "iadd"])))
    return spec, cout, _down(spatial, stride)


@st.composite
def concat_blocks(draw, dims: int, cin: int, spatial: int):
    """Channel concat of 1-3 conv branches (and maybe the input itself), in a random order,
    sometimes with one piece concatenated twice."""
    n = draw(st.integers(1, 3))
    ws = draw(st.lists(st.integers(MIN_WIDTH, 6), min_size=n, max_size=n))
    ks = draw(st.lists(st.sampled_from([1, 3]), min_size=n, max_size=n))
    identity = draw(st.booleans()) or n == 1
    pieces = n + identity
    order = list(draw(st.permutations(range(pieces))))
    if draw(st.integers(0, 4)) == 0:
        order.insert(draw(st.integers(0, len(order))), draw(st.integers(0, pieces - 1)))
    spec = block("concat", cin=cin, widths=tuple(ws), ks=tuple(ks), identity=identity,
                 order=tuple(order), act=draw(acts))
    widths_of = list(ws) + ([cin] if identity else [])
    return spec, sum(widths_of[i] for i in order), spatial


@st.composite
def split_blocks(draw, dims: int, cin: int, spatial: int):
    """split/chunk on the channel dim, of the incoming tensor or of a 1x1 conv's output; pieces
    maybe convolved (to any width), then concatenated in any order, or two pieces of equal
    width multiplied (``act(u) * sigmoid(v)``) or added."""
    how = draw(st.sampled_from(["split_list", "split_method", "split_int", "chunk_method", "chunk_fn"]))
    equal = how not in ("split_list", "split_method")
    pre = cin < 2 or draw(st.booleans())
    if not pre and equal and not any(cin % n == 0 and cin // n >= 1 for n in (2, 3)):
        pre = True
    if pre and equal:
        n = draw(st.sampled_from([2, 2, 3]))
        sizes = (draw(st.integers(1, 4)),) * n
    elif pre:
        sizes = tuple(draw(st.lists(st.integers(1, 5), min_size=2, max_size=3)))
    elif equal:
        n = draw(st.sampled_from([n for n in (2, 3) if cin % n == 0]))
        sizes = (cin // n,) * n
    else:
        cuts = sorted(draw(st.sets(st.integers(1, cin - 1), min_size=1, max_size=min(2, cin - 1))))
        sizes = tuple(b - a for a, b in zip([0] + cuts, cuts + [cin]))
    width = sum(sizes)
    join = "cat"
    if len(sizes) == 2 and sizes[0] == sizes[1]:
        join = draw(st.sampled_from(["cat", "mul", "add"]))
    s0 = sizes[0]
    if join == "cat":
        piece_out = tuple(draw(st.sampled_from([0, 0, s, MIN_WIDTH, 5])) for s in sizes)
    else:
        piece_out = draw(st.sampled_from([(0, 0), (s0, 0), (0, s0), (3, 3)]))
    order = tuple(draw(st.permutations(range(len(sizes)))))
    spec = block("split", cin=cin, width=width, how=how, sizes=sizes, piece_out=piece_out, join=join,
                 order=order, act=draw(acts), pre=pre)
    outs = [o or s for s, o in zip(sizes, piece_out)]
    return spec, outs[0] if join != "cat" else sum(outs), spatial


@st.composite
def binary_blocks(draw, dims: int, cin: int, spatial: int):
    """Two conv branches of equal width combined by ``+``, ``torch.sub``, ``*`` or ``torch.add(alpha=)``."""
    width = draw(widths)
    spec = block("binary", cin=cin, width=width, op=draw(st.sampled_from(["add", "sub", "mul", "add_alpha"])),
                 act=draw(acts))
    return spec, width, spatial


@st.composite
def grouped_blocks(draw, dims: int, cin: int, spatial: int):
    """A grouped conv, ``1 < groups < in_channels``: output width a multiple of ``groups``.
    Falls back to a depthwise conv when ``cin`` has no such divisor."""
    divs = _divisors(cin)
    if not divs:
        return draw(depthwise_blocks(dims, cin, spatial))
    g = draw(st.sampled_from(divs))
    cout = g * draw(st.integers(1, max(1, MAX_WIDTH // g)))
    spec = block("grouped", cin=cin, cout=cout, groups=g, k=draw(st.sampled_from([1, 3])),
                 bias=draw(st.booleans()), act=draw(acts))
    return spec, cout, spatial


@st.composite
def depthwise_blocks(draw, dims: int, cin: int, spatial: int):
    """Depthwise conv (``groups == in_channels``) with channel multiplier 1-3 (width capped)."""
    mult = draw(st.integers(1, max(1, min(3, 2 * MAX_WIDTH // cin))))
    stride = 2 if spatial >= 4 and draw(st.integers(0, 4)) == 0 else 1
    spec = block("depthwise", c=cin, mult=mult, k=draw(st.sampled_from([3, 5])), stride=stride,
                 bn=draw(st.booleans()), act=draw(acts))
    return spec, cin * mult, _down(spatial, stride)


@st.composite
def se_blocks(draw, dims: int, cin: int, spatial: int):
    """Squeeze-excitation gate ``x * sigmoid(fc2(relu(fc1(pool(x)))))`` (conv or Linear style)."""
    spec = block("se", c=cin, hidden=draw(st.integers(1, 6)), style=draw(st.sampled_from(["conv", "linear"])),
                 gate=draw(st.sampled_from(["sigmoid", "hardsigmoid"])))
    return spec, cin, spatial


@st.composite
def shared_blocks(draw, dims: int, cin: int, spatial: int):
    """One conv called on two branches of equal width, the results added."""
    cout = draw(widths)
    spec = block("shared", cin=cin, width=draw(widths), cout=cout, act=draw(acts))
    return spec, cout, spatial


BLOCKS = {
    "conv": conv_blocks, "residual": residual_blocks, "concat": concat_blocks, "split": split_blocks,
    "grouped": grouped_blocks, "depthwise": depthwise_blocks, "se": se_blocks, "shared": shared_blocks,
    "binary": binary_blocks,
}


def _width_preserving(spec: BlockSpec) -> bool:
    """Blocks that map ``c`` channels to ``c`` at the same size, so they can be called again later."""
    p = spec.p
    if spec.kind == "conv":
        return p["cin"] == p["cout"] and p["stride"] == 1 and p["pool"] == "none"
    if spec.kind == "residual":
        return p["cin"] == p["cout"] and p["stride"] == 1
    if spec.kind in ("grouped", "shared"):
        return p["cin"] == p["cout"]
    if spec.kind == "binary":
        return p["cin"] == p["width"]
    if spec.kind == "depthwise":
        return p["mult"] == 1 and p["stride"] == 1
    return spec.kind == "se"


@st.composite
def heads(draw, dims: int, cin: int, spatial: int):
    """The head: none, a 1x1 conv, or pool/mean/flatten followed by one or two Linears."""
    kind = draw(st.sampled_from(["none", "conv", "pool", "mean", "flatten", "flatten"]))
    spelling = draw(st.sampled_from(FLATTEN_SPELLINGS))
    hidden = draw(st.sampled_from([0, 0, 3, 8])) if kind in ("pool", "mean", "flatten") else 0
    return block("head", cin=cin, spatial=spatial, kind=kind, spelling=spelling, hidden=hidden,
                 nout=draw(st.integers(1, 5)))


@st.composite
def net_specs(draw, kinds: tuple = tuple(BLOCKS), max_blocks: int = MAX_BLOCKS):
    """A ``NetSpec``: Conv1d or Conv2d, batch 1-3, 1-4 input channels, spatial 4-8, 1 to
    ``max_blocks`` blocks drawn from ``kinds`` (plus reuses of earlier width-preserving blocks),
    a head, and a tensor, tuple or dict output that may also return intermediate block outputs."""
    dims = draw(st.sampled_from([2, 2, 1]))
    batch, in_ch, spatial = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(4, 8))
    n_blocks = draw(st.integers(1, max_blocks))
    width, size = in_ch, spatial
    blocks: list[BlockSpec] = []
    for _ in range(n_blocks):
        reusable = [i for i, b in enumerate(blocks) if b.kind != "reuse" and _width_preserving(b)
                    and _in_width(b) == width]
        if reusable and draw(st.integers(0, 5)) == 0:
            blocks.append(block("reuse", of=draw(st.sampled_from(reusable))))
            continue
        kind = draw(st.sampled_from(kinds)) if width <= MAX_CONCAT_WIDTH else "conv"
        spec, width, size = draw(BLOCKS[kind](dims, width, size))
        blocks.append(spec)
    head = draw(heads(dims, width, size))
    output = draw(st.sampled_from(["tensor", "tensor", "tuple", "dict"]))
    taps = ()
    if output != "tensor":
        taps = tuple(sorted(draw(st.sets(st.integers(0, n_blocks - 1), max_size=2))))
    mode = draw(st.sampled_from(["eval", "eval", "eval", "train", "mixed"]))
    seed = draw(st.integers(0, 2 ** 16))
    return NetSpec(dims, batch, in_ch, spatial, tuple(blocks), head, output, taps, mode, seed)


def _in_width(spec: BlockSpec) -> int:
    p = spec.p
    return p.get("cin", p.get("c"))


def prunable_names(model: nn.Module) -> list[str]:
    """Names of the convs and Linears of ``model`` (candidates for ``ignore`` and ``overrides``)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]


@st.composite
def policies(draw, names: list[str] = ()):
    """A random ``fxprune.Policy``: importance l1/l2, ratio, round_to, min_channels, local or
    global scope with a normalisation, sometimes a flops/params budget, cost allocation,
    ``exact_only``, and ``ignore``/``overrides`` on names from ``names`` or on ``nn.Linear``."""
    kw: dict[str, Any] = {
        "importance": draw(st.sampled_from(["l1", "l2"])),
        "ratio": draw(st.one_of(st.sampled_from([0.5, 0.75, 1.0, 0.25, 0.0]),
                                st.floats(0.1, 1.0, allow_nan=False))),
        "round_to": draw(st.sampled_from([None, None, 2, 3, 4])),
        "min_channels": draw(st.sampled_from([1, 1, 2, 3, 5])),
        "scope": draw(st.sampled_from(["local", "local", "global"])),
        "exact_only": draw(st.booleans()),
    }
    if kw["scope"] == "global":
        kw["normalize"] = draw(st.sampled_from(["mean", "max", "lamp", "none"]))
    budget = draw(st.sampled_from([None, None, None, "flops", "params"]))
    if budget:
        kw[budget] = draw(st.sampled_from([0.3, 0.5, 0.8, 1.0]))
        kw["allocation"] = draw(st.sampled_from(["uniform", "cost"]))
    names = list(names)
    if names and draw(st.integers(0, 3)) == 0:
        kw["ignore"] = tuple(draw(st.sets(st.sampled_from(names), min_size=1, max_size=2)))
    elif draw(st.integers(0, 7)) == 0:
        kw["ignore"] = (nn.Linear,)
    if names and draw(st.integers(0, 4)) == 0:
        key = draw(st.sampled_from(names + [nn.Conv2d, nn.Conv1d, "blocks.*"]))
        kw["overrides"] = {key: draw(st.sampled_from([0.0, 0.2, 0.9]))}
    return fxprune.Policy(**kw)


@dataclasses.dataclass
class Case:
    """A generated test case: the network spec and the policy to prune it with."""

    spec: NetSpec
    policy: fxprune.Policy

    def build(self) -> tuple[nn.Module, tuple]:
        return build(self.spec)


@st.composite
def cases(draw, kinds: tuple = tuple(BLOCKS), max_blocks: int = MAX_BLOCKS):
    """A ``Case``: a network from ``net_specs`` and a policy from ``policies`` over its layers."""
    spec = draw(net_specs(kinds, max_blocks))
    model, _ = build(spec)
    return Case(spec, draw(policies(prunable_names(model))))


# --------------------------------------------------------------------------------------------
# Checks shared by the tests
# --------------------------------------------------------------------------------------------

def structure(out: Any) -> Any:
    """The output's structure: container types, dict keys in order, and tensor shapes/dtypes."""
    if isinstance(out, torch.Tensor):
        return ("tensor", tuple(out.shape), out.dtype)
    if isinstance(out, dict):
        return ("dict", [(k, structure(v)) for k, v in out.items()])
    if isinstance(out, (tuple, list)):
        return (type(out).__name__, [structure(v) for v in out])
    return ("other", repr(out))


def snapshot(model: nn.Module) -> dict:
    """Everything about a model that fxprune promises not to change (as ``tests/conftest.py``)."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [(n, m.training) for n, m in model.named_modules(remove_duplicate=False)],
        "modules": [(n, type(m), repr(m)) for n, m in model.named_modules(remove_duplicate=False)],
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    """Fail when ``model`` differs from its ``snapshot`` in any of the promised respects."""
    after = snapshot(model)
    assert after["training"] == before["training"], "train/eval flags changed"
    assert after["modules"] == before["modules"], "submodules changed"
    assert after["params"] == before["params"], "parameters replaced or requires_grad changed"
    assert before["state"].keys() == after["state"].keys(), "state_dict keys changed"
    for k, v in before["state"].items():
        w = after["state"][k]
        assert v.dtype == w.dtype and v.shape == w.shape and torch.equal(v, w), f"{k} changed"


def plan_signature(plan) -> tuple:
    """What a plan decides, comparable across runs: each group's size and removed channels,
    and the removed channels of every node."""
    groups = tuple((g.size, tuple(g.removed)) for g in plan.groups)
    nodes = tuple(sorted((k, v[0], tuple(v[1])) for k, v in plan.removed_channels().items()))
    return groups, nodes


__all__ = ["BLOCKS", "BlockSpec", "Case", "NetSpec", "block", "build", "build_input", "cases",
           "net_specs", "policies", "snapshot", "assert_unchanged", "structure", "plan_signature"]
