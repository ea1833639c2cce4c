"""BatchNorm recalibration: statistics from the data, nothing else changes."""
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.recalibrate import recalibrate
from zoo import build


class Spy(nn.Module):
    """Records the training flag it sees and the input of the next BatchNorm."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append((self.training, x.detach().clone()))
        return x


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), Spy(), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv2d(6, 2, 1)).double()


def test_statistics_are_the_cumulative_average_over_batches():
    model = _net().eval()
    batches = [torch.randn(4, 3, 6, 6, dtype=torch.float64) for _ in range(3)]
    recalibrate(model, batches)
    feats = [x for _, x in model[1].seen]
    means = torch.stack([f.mean((0, 2, 3)) for f in feats])
    variances = torch.stack([f.transpose(0, 1).reshape(6, -1).var(1, unbiased=True) for f in feats])
    bn = model[2]
    assert torch.allclose(bn.running_mean, means.mean(0), atol=1e-12)
    assert torch.allclose(bn.running_var, variances.mean(0), atol=1e-12)
    assert int(bn.num_batches_tracked) == 3


def test_only_batchnorm_trains_and_everything_is_restored():
    model = _net().eval()
    model[4].train()  # a user's odd mix of modes is restored too
    modes = [m.training for m in model.modules()]
    params = {k: v.clone() for k, v in model.named_parameters()}
    model[2].momentum = 0.3
    recalibrate(model, [(torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.tensor([0, 1]))])
    assert [training for training, _ in model[1].seen] == [False]
    assert [m.training for m in model.modules()] == modes
    assert model[2].momentum == 0.3
    assert all(torch.equal(v, params[k]) for k, v in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_momentum_option_uses_an_exponential_average():
    model = _net().eval()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    recalibrate(model, [x], momentum=0.25)
    batch_mean = model[1].seen[0][1].mean((0, 2, 3))
    assert torch.allclose(model[2].running_mean, 0.25 * batch_mean, atol=1e-12)


def test_empty_batches_raise_and_leave_statistics_alone():
    model = _net().eval()
    before = model[2].running_var.clone()
    with pytest.raises(fxprune.FxPruneError, match="empty"):
        recalibrate(model, [])
    assert torch.equal(model[2].running_var, before)


def test_recalibrated_pruned_model_uses_its_own_statistics():
    model, x = build("residual")
    pruned = fxprune.transform(model, fxprune.Policy("l1", 0.5), x)
    batches = [build("residual", seed=s)[1] for s in (3, 4)]
    out = recalibrate(pruned, batches)
    assert out is pruned and not pruned.training
    for name, bn in pruned.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            assert int(bn.num_batches_tracked) == 2
            assert not torch.equal(bn.running_var, torch.ones_like(bn.running_var))
