"""The ATen op table: twins are real Python-level calls, blocked ops say why, and an exported
graph computes what the model computes."""
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.capture.aten_twins import BLOCKED, TWINS, twin_of
from fxprune.capture.export import capture_export
from fxprune.coupling.ops import FUNCTION_RULES, METHOD_RULES


def test_every_twin_is_a_real_call():
    for packet, twin in TWINS.items():
        assert isinstance(packet, torch._ops.OpOverloadPacket), packet
        if twin.op == "call_method":
            assert hasattr(torch.Tensor, twin.target), (packet, twin.target)
        else:
            assert callable(twin.target), packet


def test_no_op_is_both_translated_and_blocked():
    assert not set(TWINS) & set(BLOCKED)


def test_layer_twins_share_the_python_level_rules():
    for name in ("conv2d", "linear", "layer_norm", "cat", "split", "permute", "add", "relu", "addmm"):
        twin = twin_of(getattr(torch.ops.aten, name).default)
        table = METHOD_RULES if twin.op == "call_method" else FUNCTION_RULES
        assert twin.target in table, name


class TopK(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        values, _ = torch.topk(y, 4, dim=1)
        return self.head(y), values


def test_blocked_aten_op_says_why():
    plan = fxprune.plan(TopK().eval(), fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 8, 8),), capture="export")
    reasons = dict(plan.blocked_ops)
    assert any("picks values along a dim by their values" in why for why in reasons.values()), reasons
    assert all(g.kept == g.size for g in plan.groups if "conv.weight" in str([p.target for p in g.params]))


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, groups=3), nn.BatchNorm2d(6), nn.Hardswish(),
                          nn.Upsample(scale_factor=2), nn.ZeroPad2d(1), nn.MaxPool2d(2), nn.Flatten(1),
                          nn.LazyLinear(5)),
    lambda: nn.Sequential(nn.Embedding(10, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 6), nn.Softmax(-1)),
])
def test_exported_graph_computes_what_the_model_computes(make):
    torch.manual_seed(0)
    model = make()
    x = torch.randint(0, 10, (2, 5)) if isinstance(model[0], nn.Embedding) else torch.randn(2, 3, 8, 8)
    model(x)  # materialise lazy modules
    model.eval()
    gm = capture_export(model, (x,))
    assert not any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x))
