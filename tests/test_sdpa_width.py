"""``F.scaled_dot_product_attention`` pruned along its query/key width ``E`` (the call gets the
original ``scale=``) and its value width ``F``, also when both carry the same channels (a key and
a value unbound from one single-head projection, ``q = k = v``); through torch.fx and
torch.export, checked by the mask oracle in float64 with ``exact_only=True``."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune

CAPTURES = ["fx", "export"]
SEQ = (torch.randn(2, 7, 8),)
OTHER_SEQ = (torch.randn(3, 11, 8),)  # another batch and sequence length (torch.fx keeps them symbolic)


def _sdpa_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and "scaled_dot_product_attention" in str(n.target)]


def _scales(gm):
    return [n.kwargs.get("scale", n.args[6] if len(n.args) > 6 else None) for n in _sdpa_nodes(gm)]


def prune_exact(model, inputs, capture, other=None):
    """``(plan, pruned)`` in float64 with ``exact_only=True``: something is removed, every pruned
    group is exact, no SDPA call blocks, and the oracle holds at ``inputs`` (and ``other``)."""
    model = model.double().eval()
    inputs = tuple(t.double() for t in inputs)
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5, exact_only=True), inputs, capture=capture)
    assert not [why for _, why in plan.blocked_ops if "scaled_dot_product_attention" in why]
    assert any(g.removed for g in plan.groups) and all(g.exact for g in plan.groups if g.removed)
    pruned = fxprune.apply(plan)
    for x in (inputs, other):
        if x is not None:
            check = fxprune.verify(pruned, inputs=tuple(t.double() for t in x))
            assert check.ok and check.compared and check.max_error < 1e-9, check
    return plan, pruned


class PvtSingleHead(nn.Module):
    """pvt_v2's attention with one head: q from one linear, k and v unbound from another's
    ``(B, N, 2, 1, C)`` view, so the key's and the value's channels are the same rows' units."""

    def __init__(self, dim=8, width=6, scale=None, mask=False):
        super().__init__()
        self.width, self.scale, self.mask = width, scale, mask
        self.q, self.kv, self.proj = nn.Linear(dim, width), nn.Linear(dim, 2 * width), nn.Linear(width, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).reshape(b, n, 1, self.width).permute(0, 2, 1, 3)
        k, v = self.kv(x).reshape(b, -1, 2, 1, self.width).permute(2, 0, 3, 1, 4).unbind(0)
        mask = None
        if self.mask:  # a float mask over (queries, keys), broadcast over batch and heads
            i = torch.arange(n, device=x.device)
            mask = ((i[:, None] - i[None, :]).abs().to(x.dtype) * -0.3)[None, None]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.proj(o.transpose(1, 2).reshape(b, n, self.width))


class SelfSame(nn.Module):
    """``q = k = v``: one channel space on the query/key width and on the value width."""

    def __init__(self, dim=8, width=6):
        super().__init__()
        self.a, self.b = nn.Linear(dim, width), nn.Linear(width, dim)

    def forward(self, x):
        y = self.a(x)
        return self.b(F.scaled_dot_product_attention(y, y, y))


class HeadDim(nn.Module):
    """Several heads whose width comes from per-head projections of an input laid out
    ``(B, heads, N, C)``: the heads stay, each head's q/k width and value width shrink."""

    def __init__(self, dim=8, qk=6, value=4, heads=2):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, qk), nn.Linear(dim, qk), nn.Linear(dim, value)
        self.out = nn.Linear(heads * value, dim)

    def forward(self, x):
        b, h, n, _ = x.shape
        o = F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x))
        return self.out(o.transpose(1, 2).reshape(b, n, -1))


class ComputedScale(nn.Module):
    """A scale computed in the graph from the query's width: it would follow a cut width."""

    def __init__(self, dim=8, width=6):
        super().__init__()
        self.a, self.b = nn.Linear(dim, width), nn.Linear(width, dim)

    def forward(self, x):
        y = self.a(x)
        return self.b(F.scaled_dot_product_attention(y, y, y, scale=y.shape[-1] ** -0.5))


@pytest.mark.parametrize("capture", CAPTURES)
def test_single_head_key_value_from_one_projection(capture):
    plan, pruned = prune_exact(PvtSingleHead(), SEQ, capture, OTHER_SEQ if capture == "fx" else None)
    group = next(g for g in plan.groups if "kv.weight" in {p.target for p in g.params})
    assert group.size == 6 and group.kept == 3  # q rows, k and v rows, proj columns: one group
    assert pruned.get_submodule("kv").out_features == 6 and pruned.get_submodule("q").out_features == 3
    assert _scales(pruned) == [1 / math.sqrt(6)]
    node = _sdpa_nodes(pruned)[0]  # without the written scale the call is no longer the masked original
    node.kwargs = {k: v for k, v in node.kwargs.items() if k != "scale"}
    pruned.recompile()
    assert not fxprune.verify(pruned).ok


@pytest.mark.parametrize("capture", CAPTURES)
def test_query_key_value_the_same_tensor(capture):
    _, pruned = prune_exact(SelfSame(), SEQ, capture, OTHER_SEQ if capture == "fx" else None)
    assert pruned.get_submodule("a").out_features == 3 and _scales(pruned) == [1 / math.sqrt(6)]


@pytest.mark.parametrize("capture", CAPTURES)
def test_head_dim_of_several_heads(capture):
    x = (torch.randn(2, 2, 5, 8),)
    _, pruned = prune_exact(HeadDim(), x, capture, (torch.randn(1, 2, 9, 8),) if capture == "fx" else None)
    assert (pruned.get_submodule("q").out_features, pruned.get_submodule("v").out_features) == (3, 2)
    assert pruned.get_submodule("out").in_features == 4 and _scales(pruned) == [1 / math.sqrt(6)]


@pytest.mark.parametrize("capture", CAPTURES)
def test_user_scale_kept(capture):
    _, pruned = prune_exact(PvtSingleHead(scale=0.3), SEQ, capture)
    assert _scales(pruned) == [0.3]


@pytest.mark.parametrize("capture", CAPTURES)
def test_attention_mask(capture):
    prune_exact(PvtSingleHead(mask=True), SEQ, capture, OTHER_SEQ if capture == "fx" else None)


def test_width_kept_whole_gets_no_scale():
    m = PvtSingleHead().double()
    plan = fxprune.plan(m, fxprune.Policy(ratio=0.5, ignore=("kv", "q")), (SEQ[0].double(),))
    assert _scales(fxprune.apply(plan)) == [None]


def test_scale_computed_in_the_graph_is_approximate():
    plan = fxprune.plan(ComputedScale().double(), fxprune.Policy(ratio=0.5), (SEQ[0].double(),), capture="fx")
    group = next(g for g in plan.groups if "a.weight" in {p.target for p in g.params})
    assert not group.exact and "scale is computed at run time" in " ".join(group.inexact.values())
    exact = fxprune.plan(ComputedScale().double(), fxprune.Policy(ratio=0.5, exact_only=True),
                         (SEQ[0].double(),), capture="fx")
    assert not next(g for g in exact.groups if "a.weight" in {p.target for p in g.params}).removed


def test_timm_pvt_v2_single_head_blocks():
    timm = pytest.importorskip("timm")
    model = timm.create_model("pvt_v2_b0", pretrained=False).double().eval()
    x = (torch.randn(1, 3, 64, 64, dtype=torch.float64),)
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5, exact_only=True), x)
    assert not [why for _, why in plan.blocked_ops if "scaled_dot_product_attention" in why]
    attn = [g for g in plan.groups if "stages.0.blocks.0.attn.kv.weight" in {p.target for p in g.params}]
    assert attn and attn[0].removed and attn[0].exact
    check = fxprune.verify(fxprune.apply(plan))
    assert check.ok and check.max_error < 1e-9, check
