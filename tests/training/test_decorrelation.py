"""The decorrelation regulariser: non-zero on correlated filters, lowered by its own gradient,
computed over active filters only."""
import pytest
import torch

import fxprune
from fxprune.training import DecorrelationRegularizer, DynamicPruner, filter_correlation
from training_nets import batch, tiny_resnet

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def correlated_conv(seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(3, 6, 3)
    base = torch.randn(1, 3, 3, 3)
    with torch.no_grad():
        conv.weight.copy_(base + 0.1 * torch.randn(6, 3, 3, 3))   # six nearly identical filters
    return conv


def test_non_zero_on_correlated_filters_and_bounded():
    conv = correlated_conv()
    r = filter_correlation(conv.weight)
    assert 0.5 < float(r) < 1.0                      # off-diagonal ~1: sqrt(30)/6 = 0.91 at most
    orthogonal = torch.linalg.qr(torch.randn(27, 27))[0][:6]
    centred = orthogonal - orthogonal.mean(1, keepdim=True)
    assert float(filter_correlation(centred)) < float(r)


def test_a_gradient_step_lowers_it():
    conv = correlated_conv()
    model = torch.nn.Sequential(conv)
    reg = DecorrelationRegularizer(model, alpha=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    values = []
    for _ in range(5):
        loss = reg()
        values.append(float(loss))
        opt.zero_grad()
        loss.backward()
        assert conv.weight.grad.abs().sum() > 0
        opt.step()
    assert all(b < a for a, b in zip(values, values[1:]))


def test_active_rows_only_and_degenerate_layers():
    w = correlated_conv().weight.detach()
    active = torch.tensor([True, True, False, False, True, False])
    assert torch.allclose(filter_correlation(w, active), filter_correlation(w[active]))
    assert float(filter_correlation(w, torch.tensor([True] + [False] * 5))) == 0.0
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(4, 4, 3))
    assert float(DecorrelationRegularizer(model, alpha=0.0)()) == 0.0
    total = DecorrelationRegularizer(model, alpha=1.0, reduce="sum").penalty()
    mean = DecorrelationRegularizer(model, alpha=1.0, reduce="mean").penalty()
    assert torch.allclose(total, 2 * mean)
    with pytest.raises(ValueError):
        DecorrelationRegularizer(model, reduce="max")


def test_dynamic_pruner_regularises_active_filters_only():
    model = tiny_resnet()
    pruner = DynamicPruner(model, fxprune.Policy(ratio=0.5), (batch(0, n=2)[0],), decorrelation=0.1)
    before = float(pruner.regularizer())
    assert before > 0
    active = pruner.active_rows("block1.conv1.weight")
    assert int(active.sum()) == 4
    with torch.no_grad():   # a masked filter does not count
        model.block1.conv1.weight[~active] = torch.randn_like(model.block1.conv1.weight[~active])
    assert float(pruner.regularizer()) == pytest.approx(before, rel=1e-6)
    pruner.remove()
    plain = DynamicPruner(model, fxprune.Policy(ratio=0.5), (batch(0, n=2)[0],))
    assert float(plain.regularizer()) == 0.0
    plain.remove()
