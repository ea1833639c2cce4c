"""The reproduction models trace with torch.fx and the traced graph computes what the module does."""
import pytest
import torch
import torch.fx
from torch import nn

from benchmarks.reproduce.models import LeNet5, resnet20


@pytest.mark.parametrize("make, shape", [
    (LeNet5, (2, 1, 28, 28)),
    (lambda: resnet20(), (2, 1, 28, 28)),
    (lambda: resnet20(num_classes=7, in_channels=3, width=8), (2, 3, 32, 32)),
    (lambda: resnet20(), (2, 1, 8, 8)),
])
def test_traces_and_matches_eager(make, shape):
    torch.manual_seed(0)
    model = make().eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(shape)
    torch.testing.assert_close(traced(x), model(x))


def test_lenet5_layout():
    model = LeNet5()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == [6, 16]
    assert [l.out_features for l in linears] == [120, 84, 10]


def test_resnet20_layout_uses_projection_shortcuts():
    model = resnet20()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    three_by_three = [c for c in convs if c.kernel_size == (3, 3)]
    projections = [c for c in convs if c.kernel_size == (1, 1)]
    assert len(three_by_three) == 19  # stem + 9 blocks x 2; plus the fc makes 20 weighted layers
    assert [(p.in_channels, p.out_channels, p.stride) for p in projections] == [(16, 32, (2, 2)), (32, 64, (2, 2))]
    assert {c.out_channels for c in three_by_three} == {16, 32, 64}
    assert model.fc.in_features == 64
