"""Second-order sensitivity: dead channels score zero; the layer-wise Hessian diagonal is exact."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune_passes.hessian import layer_diagonal
from passes_helpers import loss_fn, scores


def _dead_channel_net():
    """Channel 2 of conv1 reads only input channel 0, which is zero in the calibration data."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1)).double()
    with torch.no_grad():
        m[0].weight[2, 1:] = 0.0
    batches = []
    for _ in range(2):
        x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
        x[:, 0] = 0.0
        batches.append((x, [torch.randn(4, 2, 6, 6, dtype=torch.float64)]))
    return m, batches


@pytest.mark.parametrize("hessian", ["diag", "fisher", "hutchinson"])
def test_a_channel_fed_by_zero_activations_scores_zero(hessian):
    model, batches = _dead_channel_net()
    x = (batches[0][0],)
    plan = fxprune.plan(model, fxprune.Policy("sensitivity", 0.25), x, calibration=batches, loss_fn=loss_fn,
                        importance_options={"hessian": hessian})
    s = scores(plan, "sensitivity", {"hessian": hessian}, calibration=batches, loss_fn=loss_fn)[0]
    assert s[2].abs().item() <= 1e-12
    if hessian != "hutchinson":  # a stochastic estimate may hit zero elsewhere too
        assert (s[[0, 1, 3]] > 0).all()
        assert plan.groups[0].removed == (2,)


@pytest.mark.parametrize("terms", ["producer", "consumer"])
def test_terms_option_keeps_the_dead_channel_at_zero(terms):
    model, batches = _dead_channel_net()
    plan = fxprune.plan(model, fxprune.Policy("sensitivity", 0.25), (batches[0][0],), calibration=batches,
                        importance_options={"sensitivity_terms": terms})
    assert plan.groups[0].removed == (2,)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 6, 3, stride=2, padding=1),
    nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
    nn.Conv2d(4, 8, 3, groups=4, padding="same"),
    nn.Conv2d(4, 6, 3, groups=2, padding=1, padding_mode="reflect"),
], ids=["strided", "dilated", "depthwise-same", "grouped-reflect"])
def test_layer_diagonal_matches_unfolded_patches(conv):
    model = nn.Sequential(conv).double()
    x = torch.randn(3, 4, 9, 8, dtype=torch.float64)
    gm = torch.fx.symbolic_trace(model)
    ctx = fxprune.ImportanceContext(gm, [], (x,), calibration=[x])
    got = layer_diagonal(ctx, {"0.weight"}, "test")["0.weight"]
    xin, pad = x, conv.padding
    if conv.padding_mode != "zeros":
        xin, pad = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), 0
    if pad == "same":
        pad = tuple((k - 1) // 2 for k in conv.kernel_size)
    cols = F.unfold(xin, conv.kernel_size, dilation=conv.dilation, padding=pad, stride=conv.stride)
    stats = ((cols ** 2).sum((0, 2)) / x.shape[0]).view(conv.in_channels, -1)
    per_group_out, per_group_in = conv.out_channels // conv.groups, conv.in_channels // conv.groups
    want = torch.stack([stats[(o // per_group_out) * per_group_in:(o // per_group_out + 1) * per_group_in]
                        for o in range(conv.out_channels)]).view(conv.weight.shape)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_linear_and_transposed_layers():
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 2, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    ctx = fxprune.ImportanceContext(torch.fx.symbolic_trace(model), [], (x,), calibration=[x])
    h = layer_diagonal(ctx, {"0.weight", "3.weight"}, "test")
    per_channel = (x ** 2).sum((0, 2, 3)) / 2
    assert torch.allclose(h["0.weight"], per_channel.view(3, 1, 1, 1).expand(3, 4, 2, 2))
    hidden = torch.relu(model[0](x)).flatten(1)
    assert torch.allclose(h["3.weight"], ((hidden ** 2).sum(0) / 2).expand(5, -1))


def test_hutchinson_on_an_op_without_second_derivative_says_what_to_use():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Hardsigmoid(), nn.Conv2d(4, 2, 1)).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    batches = [(x, [torch.randn(2, 2, 4, 4, dtype=torch.float64)])]
    with pytest.raises(fxprune.FxPruneError, match="fisher"):
        fxprune.plan(model, fxprune.Policy("sensitivity", 0.5), (x,), calibration=batches, loss_fn=loss_fn,
                     importance_options={"hessian": "hutchinson"})


def _two_layer_net(width: int = 8):
    """conv1's 8 channels feed conv2 (16 channels, then a 1x1 head); conv1's outputs are scaled
    down by 1e-2 before conv2, so conv2's Hessian (its input second moments) is tiny: its
    channels are the cheap ones to lose under the second-order model."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 3, padding=1)
            self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
            self.head = nn.Conv2d(2 * width, 4, 1)

        def forward(self, x):
            return self.head(self.conv2(torch.relu(self.conv1(x)) * 1e-2))

    return Net().double(), [torch.randn(4, 3, 8, 8, dtype=torch.float64) for _ in range(2)]


def test_layer_rates_from_the_hessian_rank_raw_saliencies_across_layers():
    model, batches = _two_layer_net()
    x = (batches[0],)
    options = {"layer_rates": "hessian"}
    plan = fxprune.plan(model, fxprune.Policy("sensitivity", 0.5), x, calibration=batches,
                        importance_options=options)
    removed = {g.name: len(g.removed) for g in plan.groups if not g.blocked}
    assert sum(removed.values()) == 12  # half of the 24 removable channels, as asked
    assert removed["conv2"] > 8 > removed["conv1"]  # not 4 and 8: the rates follow the Hessian
    assert plan.selection["selection_policy"] == {"scope": "global", "normalize": "none"}
    assert plan.policy.scope == "local"  # the user's policy is kept as given
    same = fxprune.plan(model, fxprune.Policy("sensitivity", 0.5, scope="global", normalize="none"), x,
                        calibration=batches)
    assert [g.removed for g in same.groups] == [g.removed for g in plan.groups]
    assert fxprune.verify(fxprune.apply(plan)).ok


def test_layer_rates_from_the_hessian_meet_a_flops_budget():
    model, batches = _two_layer_net(width=48)
    plan = fxprune.plan(model, fxprune.Policy("sensitivity", flops=0.6), (batches[0],), calibration=batches,
                        importance_options={"layer_rates": "hessian"})
    assert plan.selection["met"] and abs(plan.selection["achieved"] - 0.6) <= 0.01


def test_layer_rates_hessian_mean_ranks_saliencies_over_each_layers_mean():
    model, batches = _two_layer_net()
    x = (batches[0],)
    plan = fxprune.plan(model, fxprune.Policy("sensitivity", 0.5), x, calibration=batches,
                        importance_options={"layer_rates": "hessian-mean"})
    same = fxprune.plan(model, fxprune.Policy("sensitivity", 0.5, scope="global", normalize="mean"), x,
                        calibration=batches)
    assert plan.selection["selection_policy"] == {"scope": "global"}
    assert [g.removed for g in same.groups] == [g.removed for g in plan.groups]
