"""Shape propagation: meta tensors first, fake tensors or one real run as fallbacks, all agreeing;
and the traced module reads the model's tensors while the pruned module owns its own."""
import pytest
from hypothesis import given, settings, strategies as st
import torch
import torch.fx as fx
import torch.nn as nn
import torchvision

import fxprune
from fxprune.shapes import META_KEY, _fake_propagate, _meta_propagate, propagate
from fxprune.trace import trace
from zoo import ZOO, build


def _recorded(gm: fx.GraphModule) -> dict:
    return {n.name: (n.meta[META_KEY]["shape"], n.meta[META_KEY]["dtype"]) for n in gm.graph.nodes}


def _real(gm: fx.GraphModule, inputs: tuple) -> dict:
    from fxprune.shapes import _Recorder
    with torch.no_grad():
        _Recorder(gm.eval()).propagate(*inputs)
    return _recorded(gm)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_meta_shapes_equal_a_real_run_on_the_zoo(name):
    model, inputs = build(name)
    gm = trace(model)
    assert _meta_propagate(gm, inputs)
    meta = _recorded(gm)
    assert meta == _real(gm, inputs)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "swin_t"])
def test_meta_shapes_equal_a_real_run_on_torchvision(name):
    model = torchvision.models.get_model(name).eval()
    inputs = (torch.randn(1, 3, 64, 64),)
    gm = trace(model)
    assert _meta_propagate(gm, inputs)
    assert _recorded(gm) == _real(gm, inputs)


class ReadsData(nn.Module):
    """A leaf whose Python reads a value: meta tensors have none, so propagation falls back."""

    def forward(self, x):
        return x * float(x.abs().max().item() > -1)


def test_a_leaf_that_reads_data_falls_back_to_a_real_run():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), ReadsData(), nn.Conv2d(8, 4, 1))
    gm = trace(model, leaf_modules=[ReadsData])
    inputs = (torch.randn(1, 3, 8, 8),)
    assert not _meta_propagate(gm, inputs)
    assert not _fake_propagate(gm, inputs)
    propagate(gm, inputs)
    assert [s for s, _ in _recorded(gm).values()][-2] == (1, 4, 6, 6)


def test_a_batch_norm_of_the_wrong_width_is_caught_by_the_meta_run():
    """The same-shape shortcut for norms checks the channel count, so the shape re-check after
    a rewrite still catches a norm left at the wrong width."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    gm = trace(model)
    gm.get_submodule("0").weight = nn.Parameter(torch.randn(6, 3, 3, 3))
    assert not _meta_propagate(gm, (torch.randn(1, 3, 8, 8),))


def test_shape_propagation_leaves_tensors_and_flags_alone():
    model = torchvision.models.resnet18().train()
    gm = trace(model)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    propagate(gm, (torch.randn(2, 3, 32, 32),))
    assert all(m.training for m in gm.modules())
    assert all(torch.equal(v, before[k]) for k, v in gm.state_dict().items())
    assert all(v.device.type == "cpu" for v in gm.state_dict().values())


def test_traced_module_shares_the_models_tensors_and_the_pruned_one_does_not():
    model = torchvision.models.resnet18().eval()
    model_storage = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 32, 32),))
    traced = {t.untyped_storage().data_ptr() for t in (*plan.traced.parameters(), *plan.traced.buffers())}
    assert traced <= model_storage
    assert not any(a is b for a, b in zip(plan.traced.modules(), model.modules()))
    pruned = fxprune.apply(plan)
    owned = {t.untyped_storage().data_ptr() for t in (*pruned.parameters(), *pruned.buffers())}
    assert not owned & model_storage
    with torch.no_grad():  # training the pruned module in place never reaches the model
        for p in pruned.parameters():
            p.add_(1.0)
    assert not fxprune.verify(pruned).ok
    assert fxprune.verify(fxprune.apply(plan)).ok


@pytest.mark.parametrize("broken", ["linear_in", "linear_bias", "layer_norm", "group_norm"])
def test_shape_shortcuts_still_catch_a_module_of_the_wrong_width(broken):
    """Linear and the norms skip their meta kernels, but not the checks those kernels make."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.Flatten(2), nn.LayerNorm(16),
                          nn.Linear(16, 4)).eval()
    gm = trace(model)
    x = (torch.randn(1, 3, 4, 4),)
    assert _meta_propagate(gm, x)
    module, name, shape = {"linear_in": ("4", "weight", (4, 12)), "linear_bias": ("4", "bias", (5,)),
                           "layer_norm": ("3", "weight", (12,)), "group_norm": ("1", "bias", (6,))}[broken]
    setattr(gm.get_submodule(module), name, nn.Parameter(torch.randn(*shape)))
    assert not _meta_propagate(gm, x)


@pytest.mark.parametrize("broken", ["conv_in", "conv_bias", "conv_groups"])
def test_the_conv_shape_rule_still_catches_a_conv_of_the_wrong_width(broken):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2)).eval()
    gm = trace(model)
    x = (torch.randn(1, 3, 9, 9),)
    assert _meta_propagate(gm, x)
    module, name, shape = {"conv_in": ("1", "weight", (8, 3, 3, 3)), "conv_bias": ("0", "bias", (7,)),
                           "conv_groups": ("1", "weight", (8, 8, 3, 3))}[broken]
    setattr(gm.get_submodule(module), name, nn.Parameter(torch.randn(*shape)))
    assert not _meta_propagate(gm, x)


class Convs(nn.Module):
    """Conv padding modes and strings, dilation, stride, 1d/3d, adaptive pools, cat and arithmetic."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2, padding_mode="reflect")
        self.b = nn.Conv2d(3, 4, (3, 5), padding="same")
        self.c = nn.Conv2d(3, 4, 3, padding="valid", bias=False)
        self.d = nn.Conv1d(3, 6, 2, stride=3)
        self.e = nn.Conv3d(1, 2, (1, 2, 3))
        self.pool = nn.AdaptiveAvgPool2d((None, 2))

    def forward(self, x):
        a, b, c = self.a(x), self.b(x), self.c(x)
        joined = torch.cat([b, b * 2.0], dim=-3) - 1
        d = self.d(x.flatten(2))
        e = self.e(x[:, :1].unsqueeze(1))
        return self.pool(a), joined.div(b.sum()), c + c[:, :1], d, e


@pytest.mark.parametrize("side", [7, 10])
def test_shape_rules_equal_a_real_run(side):
    gm = trace(Convs())
    inputs = (torch.randn(2, 3, side, side + 1),)
    assert _meta_propagate(gm, inputs)
    assert _recorded(gm) == _real(gm, inputs)


class Attention(nn.Module):
    def __init__(self, batch_first: bool, need_weights: bool, average: bool):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.options = dict(need_weights=need_weights, average_attn_weights=average)

    def forward(self, q, kv):
        out, weights = self.mha(q, kv, kv, **self.options)
        return out if weights is None else (out, weights)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_the_attention_shape_rule_equals_a_real_run(batch_first, need_weights, average):
    gm = trace(Attention(batch_first, need_weights, average).eval())
    q, kv = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    kv = kv[:, :4] if batch_first else kv[:4]  # another source length
    assert _meta_propagate(gm, (q, kv))
    assert _recorded(gm) == _real(gm, (q, kv))
    gm.get_submodule("mha").in_proj_weight = nn.Parameter(torch.randn(21, 8))
    assert not _meta_propagate(gm, (q, kv))


class Functional(nn.Module):
    """The functional forms timm and transformers call: layer_norm, linear, normalize, SDPA (with
    and without masks), neg."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8))
        self.b = nn.Parameter(torch.randn(6))
        self.ln_w = nn.Parameter(torch.randn(8))

    def forward(self, x, mask):
        y = torch.nn.functional.layer_norm(x, (8,), self.ln_w, None, 1e-5)
        z = torch.nn.functional.linear(y, self.w, self.b)
        n = torch.nn.functional.normalize(-z, dim=-1)
        q = y.view(2, 5, 2, 4).transpose(1, 2)
        a = torch.nn.functional.scaled_dot_product_attention(q, q, q[..., :3])
        c = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask, scale=0.5)
        return n, a, c, torch.neg(z).neg()


def test_functional_shape_rules_equal_a_real_run():
    gm = trace(Functional())
    inputs = (torch.randn(2, 5, 8), torch.rand(5, 5) > 0.5)
    assert _meta_propagate(gm, inputs)
    assert _recorded(gm) == _real(gm, inputs)


@pytest.mark.parametrize("broken", ["layer_norm", "linear_in", "linear_bias"])
def test_functional_shape_rules_still_catch_a_tensor_of_the_wrong_width(broken):
    gm = trace(Functional())
    inputs = (torch.randn(2, 5, 8), torch.rand(5, 5) > 0.5)
    name, shape = {"layer_norm": ("ln_w", (7,)), "linear_in": ("w", (6, 7)), "linear_bias": ("b", (5,))}[broken]
    setattr(gm, name, nn.Parameter(torch.randn(*shape)))
    assert not _meta_propagate(gm, inputs)


def test_the_attention_function_rule_still_catches_a_mask_that_does_not_broadcast():
    gm = trace(Functional())
    assert not _meta_propagate(gm, (torch.randn(2, 5, 8), torch.rand(4, 5) > 0.5))


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from(["max", "avg"]), n=st.integers(1, 3), k=st.integers(1, 4), s=st.integers(1, 3),
       p=st.integers(0, 2), d=st.integers(1, 2), ceil=st.booleans(), size=st.integers(1, 9))
def test_the_pool_shape_rule_equals_the_kernel(kind, n, k, s, p, d, ceil, size):
    """Where the rule gives a shape, the kernel gives the same; where the kernel refuses, the
    rule defers (None) so the meta run raises the kernel's own error. It also defers for an
    input smaller than the window (avg_pool3d refuses it even when padded, 1d and 2d do not)."""
    from fxprune.shape_rules import _pool
    cls = getattr(nn, f"{'Max' if kind == 'max' else 'Avg'}Pool{n}d")
    module = cls(k, s, p, dilation=d, ceil_mode=ceil) if kind == "max" else cls(k, s, p, ceil_mode=ceil)
    x = torch.randn(2, 3, *(size + i for i in range(n)))
    try:
        want = tuple(module(x).shape)
    except RuntimeError:
        want = None
    got = _pool(module, x.to("meta"))
    if got is not None:
        assert tuple(got.shape) == want
    else:
        assert want is None or size < (k - 1) * d + 1  # deferred where the kernel refuses or the window is larger
