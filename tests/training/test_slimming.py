"""Network slimming: the L1 term on BatchNorm scales, then pruning by |gamma|."""
import pytest
import torch

import fxprune
from fxprune.importance import ImportanceContext, available, get
from fxprune.training import NetworkSlimming, SlimmingRegularizer, bn_scale_importance, finetune
from training_nets import batch, tiny_resnet

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
X = (batch(0, n=2)[0],)


def test_regularizer_value_and_gradient():
    model = tiny_resnet()
    reg = SlimmingRegularizer(model, weight=0.01)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    expected = 0.01 * sum(float(m.weight.abs().sum()) for m in bns)
    value = reg()
    assert value.item() == pytest.approx(expected)
    value.backward()
    assert all(torch.allclose(m.weight.grad, 0.01 * torch.sign(m.weight)) for m in bns)
    assert SlimmingRegularizer(model, weight=0.0)().item() == 0.0


def test_sparsity_training_shrinks_scales_then_prunes_the_smallest():
    model = tiny_resnet()
    data = torch.utils.data.TensorDataset(*batch(0, n=32))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    slim = NetworkSlimming(model, fxprune.Policy(ratio=0.5), X, weight=0.05)
    before = float(model.block1.bn1.weight.abs().sum())
    finetune(model, loader, epochs=2, lr=0.05, weight_decay=0.0, regularizer=lambda m: slim.regularizer(),
             progress=False, seed=0)
    assert float(model.block1.bn1.weight.abs().sum()) < before
    pruned = slim.finalize()
    assert fxprune.verify(pruned).ok
    plan = pruned.meta["fxprune"]
    group = next(g for g in plan.groups if any(p.owner == "block1.conv1" for p in g.producers))
    gamma = model.block1.bn1.weight.detach().abs()
    assert set(group.removed) == set(gamma.argsort()[:4].tolist())


@pytest.mark.skipif("bn_scale" not in available(), reason="the bn_scale pass is not installed")
def test_fallback_scores_equal_the_registered_criterion():
    model = tiny_resnet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(-1, 1)
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.0), X)
    ctx = ImportanceContext(plan.traced, plan.groups, X)
    for g in plan.groups:
        if not g.blocked:
            assert torch.allclose(bn_scale_importance(g, ctx), get("bn_scale")(g, ctx).double())
