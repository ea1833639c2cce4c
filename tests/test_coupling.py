"""Coupling facts: what joins, what stays apart, what is blocked and why."""
import torch
import torch.nn as nn

import fxprune
from zoo import build


def _plan(name, **policy):
    model, inputs = build(name)
    return fxprune.plan(model, fxprune.Policy(**policy), inputs)


def _owners(group):
    return {p.owner for p in group.producers}


def test_residual_add_couples_block_outputs():
    plan = _plan("residual")
    owners = [_owners(g) for g in plan.groups]
    assert {"l2.c2", "l2.down.0", "l3.c2"} in owners


def test_channel_concat_keeps_inputs_separate_with_offsets():
    plan = _plan("concat", ratio=0.5)
    sizes = {frozenset(_owners(g)): g.size for g in plan.groups}
    assert sizes[frozenset({"a"})] == 6 and sizes[frozenset({"b"})] == 5
    removed = plan.removed_channels()
    g_a = next(g for g in plan.groups if _owners(g) == {"a"})
    g_b = next(g for g in plan.groups if _owners(g) == {"b"})
    expect = sorted(list(g_a.removed) + [6 + i for i in g_b.removed])
    assert removed["cat"][1] == expect


def test_spatial_concat_couples_inputs():
    plan = _plan("concat")
    assert any(_owners(g) == {"d", "e"} for g in plan.groups)


def test_flatten_uses_the_stride_map():
    plan = _plan("flatten_heads", ratio=0.5)
    g = next(g for g in plan.groups if _owners(g) == {"c2"})
    dim, idx = plan.removed_channels()["flatten"]
    assert dim == 1
    assert idx == sorted(c * 16 + s for c in g.removed for s in range(16))


def test_shared_module_merges_its_input_spaces():
    plan = _plan("shared")
    assert any(_owners(g) == {"a", "b"} for g in plan.groups)


def test_outputs_are_never_pruned():
    plan = _plan("multi_output", ratio=0.9)
    kept = {frozenset(_owners(g)): g for g in plan.groups}
    assert not kept[frozenset({"b.0"})].removed
    assert all("model output" in why for why in kept[frozenset({"b.0"})].pinned.values())
    assert kept[frozenset({"a.0"})].removed


def test_unknown_op_blocks_with_reason():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), dim=1))

    plan = fxprune.plan(Weird(), fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 4, 4),))
    g = next(g for g in plan.groups if _owners(g) == {"a"})
    assert g.blocked and not g.removed
    assert "cumsum" in next(iter(g.pinned.values()))
    assert any("cumsum" in why for _, why in plan.blocked_ops)
    assert "cumsum" in fxprune.explain(plan)


def test_depthwise_passes_channels_through():
    plan = _plan("depthwise", ratio=0.5)
    g = next(g for g in plan.groups if "pw1" in _owners(g))
    assert {"pw1", "dw", "dw2"} <= _owners(g)


def test_coupling_graph_edges_say_why():
    plan = _plan("residual")
    edges = list(plan.analysis.units.graph.edges(data=True))
    assert edges and all(d["kind"] and d["reason"] for _, _, d in edges)
    assert any("add" in d["reason"] for _, _, d in edges)


def test_plans_are_deterministic():
    a, b = _plan("concat", ratio=0.5), _plan("concat", ratio=0.5)
    assert [(g.size, g.removed) for g in a.groups] == [(g.size, g.removed) for g in b.groups]
    assert a.removed_channels() == b.removed_channels()


def test_ignore_by_name_and_type():
    plan = _plan("conv_chain_2d", ratio=0.5, ignore=("a.0",))
    assert not next(g for g in plan.groups if "a.0" in _owners(g)).removed
    plan = _plan("conv_chain_2d", ratio=0.5, ignore=(nn.Conv2d,))
    assert not any(g.removed for g in plan.groups)


def test_explain_lists_groups_and_widths():
    text = str(_plan("residual", ratio=0.5))
    assert "before" in text and "after" in text and "l2.c2" in text


def test_a_split_piece_never_loses_all_its_channels():
    model, inputs = build("split_chunk")

    def second_half_first(group, ctx):
        s = torch.ones(group.size, dtype=torch.float64)
        if group.size == 12:
            s[6:] = 0  # asks for the whole second split piece
        return s

    pruned = fxprune.transform(model, fxprune.Policy(importance=second_half_first, ratio=0.5), inputs)
    g = pruned.meta["fxprune"].groups[0]
    assert len(g.removed) == 6 and 6 not in g.removed  # the piece keeps one; another channel goes
    assert fxprune.verify(pruned).max_error < 1e-9
