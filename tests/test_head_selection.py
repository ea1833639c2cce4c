"""Selection of attention heads: ``round_to`` on the channel width of whole heads, and grouped-query
attention pruned by query heads (the same number in every kv group), against the mask oracle."""
import pytest
import torch
import torch.nn.functional as F

import fxprune
from fxprune.coupling.groups import Group, ParamMember
from fxprune.errors import StageError
from fxprune.select_heads import kept_heads


def _head_group(heads: int, head_dim: int, kind: str = "head", blocks: tuple = ()) -> Group:
    rows = ParamMember("q.weight", 0, "producer", "q", tuple(range(heads * head_dim)),
                       tuple(h for h in range(heads) for _ in range(head_dim)))
    return Group(0, heads, [], [rows], {}, {}, kind=kind, blocks=blocks)


class Heads(torch.nn.Module):
    """Self-attention with heads split off q/k/v by a view (a ``head`` group)."""

    def __init__(self, heads=6, head_dim=12, embed=16):
        super().__init__()
        self.heads, self.d = heads, head_dim
        self.q, self.k, self.v = (torch.nn.Linear(embed, heads * head_dim) for _ in range(3))
        self.o = torch.nn.Linear(heads * head_dim, embed)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, self.d).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)
        return self.o(a.transpose(1, 2).reshape(b, n, self.heads * self.d))


class GQA(torch.nn.Module):
    """Grouped-query attention as Llama writes it: ``repeat_kv`` by unsqueeze/expand/reshape."""

    def __init__(self, embed=32, heads=8, kv=2, head_dim=8):
        super().__init__()
        self.h, self.kv, self.d = heads, kv, head_dim
        self.inp = torch.nn.Linear(embed, embed)
        self.q_proj = torch.nn.Linear(embed, heads * head_dim, bias=False)
        self.k_proj = torch.nn.Linear(embed, kv * head_dim, bias=False)
        self.v_proj = torch.nn.Linear(embed, kv * head_dim, bias=False)
        self.o_proj = torch.nn.Linear(heads * head_dim, embed, bias=False)

    def _repeat(self, t, b, n):
        rep = self.h // self.kv
        return t[:, :, None, :, :].expand(b, self.kv, rep, n, self.d).reshape(b, self.kv * rep, n, self.d)

    def forward(self, x):
        x = self.inp(x)
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, -1, self.d).transpose(1, 2)
        k = self._repeat(self.k_proj(x).view(b, n, -1, self.d).transpose(1, 2), b, n)
        v = self._repeat(self.v_proj(x).view(b, n, -1, self.d).transpose(1, 2), b, n)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(a.transpose(1, 2).reshape(b, n, -1)) + x


def _float64(model):
    torch.manual_seed(0)
    m = model.double().eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m


def _exact(pruned, tol=1e-9):
    result = fxprune.verify(pruned)
    assert result.ok and result.exact and result.max_error <= tol, result
    return result


def _kind(plan, kind):
    return [g for g in plan.groups if g.kind == kind]


# --- round_to on head widths ----------------------------------------------------------------------

def test_round_to_counts_channels_not_heads():
    assert kept_heads(_head_group(6, 16), 3, 8) == (3, "")           # finer than head_dim: any count fits
    assert kept_heads(_head_group(12, 16), 5, 64) == (8, "round_to=64: 8 heads x 16 = 128 channels")
    assert kept_heads(_head_group(12, 24), 6, 64)[0] == 8            # 8 heads x 24 = 192 = 3 x 64
    assert kept_heads(_head_group(6, 12), 3, 8)[0] == 4              # 2-head steps: 48 channels


def test_round_to_a_group_cannot_meet_is_clamped_to_whole_heads_with_a_note():
    kept, why = kept_heads(_head_group(8, 12), 4, 64)                # needs multiples of 16 heads
    assert kept == 6                                                 # 72 channels: nearest whole heads >= 64
    assert why.startswith("round_to=64 not met: it needs a multiple of 16 heads of 12 channels")
    kept, why = kept_heads(_head_group(8, 12, "query-heads", ((0, 1, 2, 3), (4, 5, 6, 7))), 3, 64)
    assert kept == 6 and "each of 2 kv groups" in why                # still even over the kv groups


def test_round_to_on_a_model_keeps_whole_heads_with_a_multiple_of_round_to_channels():
    model, x = _float64(Heads()), (torch.randn(2, 5, 16, dtype=torch.float64),)
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5, round_to=8), x)
    (g,) = _kind(pruned.meta["fxprune"], "head")
    assert (g.size, g.kept) == (6, 4)                                # 3 asked; 4 x 12 = 48 = 6 x 8
    assert g.note == "kept 4 instead of 3 (round_to=8: 4 heads x 12 = 48 channels)"
    assert pruned.q.weight.shape[0] % 8 == 0 and pruned.o.weight.shape[1] == 48
    _exact(pruned)


def test_round_to_coarser_than_the_group_allows_still_gives_a_running_exact_model():
    model, x = _float64(Heads(heads=8)), (torch.randn(2, 5, 16, dtype=torch.float64),)
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5, round_to=64), x)
    (g,) = _kind(pruned.meta["fxprune"], "head")
    assert g.kept == 6 and g.note.startswith("kept 6 instead of 4 (round_to=64 not met: ")
    assert "kept 6 instead of 4 (round_to=64 not met" in fxprune.explain(pruned.meta["fxprune"])
    _exact(pruned)


@pytest.mark.filterwarnings("ignore::fxprune.errors.BudgetWarning")  # 2-head steps: 60% lands on 75%
def test_round_to_under_a_budget_lands_on_whole_heads():
    model, x = _float64(Heads(heads=8)), (torch.randn(2, 5, 16, dtype=torch.float64),)
    plan = fxprune.plan(model, fxprune.Policy(params=0.6, round_to=24), x)
    (g,) = _kind(plan, "head")
    assert g.removed and (g.kept * 12) % 24 == 0


# --- grouped-query attention: kv groups or query heads --------------------------------------------

@pytest.fixture(scope="module")
def gqa():
    return _float64(GQA()), (torch.randn(2, 5, 32, dtype=torch.float64),)


def test_gqa_default_removes_whole_kv_groups(gqa):
    model, x = gqa
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5), x)
    (g,) = _kind(pruned.meta["fxprune"], "kv-group")
    assert (g.size, g.kept) == (2, 1) and pruned.k_proj.weight.shape[0] == 8
    _exact(pruned)


def test_query_heads_keep_every_kv_head_and_as_many_query_heads_in_each_group(gqa):
    model, x = gqa
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.0, structures={"query-heads": 0.5}), x)
    plan = pruned.meta["fxprune"]
    (g,) = _kind(plan, "query-heads")
    assert g.blocks == ((0, 1, 2, 3), (4, 5, 6, 7)) and g.kept == 4
    assert [sum(c not in g.removed for c in b) for b in g.blocks] == [2, 2]
    assert tuple(pruned.q_proj.weight.shape) == (32, 32) and tuple(pruned.o_proj.weight.shape) == (32, 32)
    assert tuple(pruned.k_proj.weight.shape) == (16, 32) and tuple(pruned.v_proj.weight.shape) == (16, 32)
    kv = [h for h in plan.groups if any(p.owner == "k_proj" for p in h.producers)]
    assert kv and all(h.blocked and "key/value heads stay" in h.note for h in kv)
    assert ".expand(getitem, 2, 2, getitem_1, 8)" in pruned.code    # n_rep 4 -> 2
    _exact(pruned)
    exported = torch.export.export(pruned, x).module()
    assert torch.allclose(exported(*x), pruned(*x), rtol=0, atol=1e-12)


def test_query_heads_that_would_split_unevenly_are_rounded_up_with_a_note(gqa):
    model, x = gqa
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.0, structures={"query-heads": 0.375}), x)
    (g,) = _kind(plan, "query-heads")
    assert g.kept == 6 and [sum(c not in g.removed for c in b) for b in g.blocks] == [3, 3]
    assert g.note == "kept 6 instead of 5 (the same number of query heads in each of 2 kv groups)"
    _exact(fxprune.apply(plan))


def test_query_heads_with_round_to_on_their_channel_width(gqa):
    model, x = gqa
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.0, round_to=32, structures={"query-heads": 0.75}), x)
    (g,) = _kind(plan, "query-heads")
    assert g.kept == 4 and "round_to=32: 4 heads x 8 = 32 channels" in g.note
    _exact(fxprune.apply(plan))


def test_a_saved_query_head_plan_rebuilds_the_same_model(gqa):
    from fxprune.serialize import plan_to_dict, rebuild
    model, x = gqa
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.0, structures={"query-heads": 0.5}), x)
    again = rebuild(model, plan_to_dict(pruned.meta["fxprune"]), x)
    assert torch.equal(again(*x), pruned(*x))


def test_an_uneven_query_head_plan_is_refused_by_the_rewrite(gqa):
    model, x = gqa
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.0, structures={"query-heads": 0.5}), x)
    (g,) = _kind(plan, "query-heads")
    g.removed = (0, 1, 2, 4)
    with pytest.raises(StageError, match=r"repeat_kv keeps \[1, 3\] query heads"):
        fxprune.apply(plan)


# --- Hugging Face Llama (torch.export capture) ------------------------------------------------------

def test_llama_loses_query_heads_in_every_kv_group():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=8,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
                                      use_cache=False)                # 4 query heads per kv head, head_dim 8
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    x = (torch.randint(0, 64, (1, 6)),)
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.0, structures={"query-heads": 0.5}), x)
    plan = pruned.meta["fxprune"]
    (g,) = _kind(plan, "query-heads")
    assert not _kind(plan, "kv-group") and g.blocks == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert [sum(c not in g.removed for c in b) for b in g.blocks] == [2, 2]
    attn = pruned.get_submodule("model.layers.0.self_attn")
    assert tuple(attn.q_proj.weight.shape) == (32, 64) and tuple(attn.o_proj.weight.shape) == (64, 32)
    assert tuple(attn.k_proj.weight.shape) == (16, 64) and tuple(attn.v_proj.weight.shape) == (16, 64)
    _exact(pruned, tol=1e-6)                                          # HF attention computes in float32
