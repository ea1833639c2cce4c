"""Real architectures: transform at 0.5 succeeds, parameters drop, the oracle holds, input untouched."""
import pytest
import torch
import torchvision

import fxprune
from model_state import assert_unchanged, snapshot

MODELS = ["resnet18", "resnet50", "vgg16_bn", "densenet121", "mobilenet_v2", "googlenet",
          "squeezenet1_1", "efficientnet_b0", "inception_v3"]


def make(name):
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    for m in model.modules():  # non-trivial BN statistics, so a wrong slice shows up
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    size = 96 if name == "inception_v3" else 64
    return model, (torch.randn(1, 3, size, size),)


@pytest.mark.parametrize("name", MODELS)
def test_torchvision_model_prunes_exactly(name):
    model, inputs = make(name)
    before = snapshot(model)
    pruned = fxprune.transform(model, fxprune.Policy(importance="l1", ratio=0.5), inputs)
    assert_unchanged(model, before)
    params = lambda m: sum(p.numel() for p in m.parameters())
    assert params(pruned) < 0.6 * params(model)
    fresh = (torch.randn_like(inputs[0]),)
    result = fxprune.verify(pruned, inputs=fresh)
    assert result.ok and result.exact, result
    with torch.no_grad():
        assert pruned(*fresh).shape == model(*fresh).shape
