"""The FX front end patches the traced model's module classes, not ``nn.Module`` itself: the
graph is the one torch.fx makes, ``nn.Module`` is never touched, and every class is as before
afterwards, also when the trace fails."""
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torchvision

from fxprune.capture.fx_trace import LeafTracer, trace
from fxprune.errors import TraceError

SEEN = []


class Spy(nn.Module):
    """Records, while it is traced, whether nn.Module's own __call__ is the original one."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        SEEN.append(nn.Module.__dict__["__call__"] is ORIGINAL_CALL)
        return self.conv(x).relu()


ORIGINAL_CALL = nn.Module.__dict__["__call__"]


class OwnCall(nn.Module):
    """A class with a __call__ of its own: torch.fx's patch of nn.Module never reached it."""

    def __call__(self, x):
        return x * 2


class Failing(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if self.conv(x).sum() > 0:  # data-dependent control flow: FX fails
            return x
        return -x


def _own_patches(classes):
    return [(c.__name__, n) for c in classes for n in ("__call__", "__getattr__") if n in vars(c)]


def test_nn_module_is_never_patched_and_classes_are_restored():
    SEEN.clear()
    gm = trace(Spy())
    assert SEEN == [True]
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "call_method", "output"]
    assert _own_patches([Spy, nn.Conv2d]) == []


def test_a_failing_trace_restores_every_class():
    with pytest.raises(TraceError):
        trace(Failing())
    assert _own_patches([Failing, nn.Conv2d]) == []
    assert nn.Module.__dict__["__call__"] is ORIGINAL_CALL


def test_a_class_with_its_own_call_keeps_it():
    own = OwnCall.__dict__["__call__"]
    model = nn.Sequential(nn.Linear(2, 2), OwnCall())
    gm = trace(model)
    assert OwnCall.__dict__["__call__"] is own
    assert torch.equal(gm(torch.ones(1, 2)), model(torch.ones(1, 2)))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5"])
def test_the_graph_is_the_one_torch_fx_makes(name):
    model = getattr(torchvision.models, name)(weights=None).eval()
    ours = LeafTracer().trace(model)
    plain = fx.Tracer().trace(model)
    assert [(n.op, str(n.target), n.name) for n in ours.nodes] == \
           [(n.op, str(n.target), n.name) for n in plain.nodes]
