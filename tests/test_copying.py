"""The fast module copy returns what copy.deepcopy returns."""
import pytest
import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize
import torchvision

from fxprune.copying import copy_graph_module, copy_module
from fxprune.trace import structural_copy, trace


class Doubler(nn.Module):
    def forward(self, x):
        return 2 * x


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def test_copy_equals_deepcopy_on_a_torchvision_model():
    model = torchvision.models.efficientnet_b0().eval()
    model.features[0].register_forward_hook(lambda m, i, o: None)
    copied = copy_module(model, {})
    assert repr(copied) == repr(model)
    assert all(torch.equal(a, b) and a is not b for a, b in zip(_tensors(copied), _tensors(model)))
    assert all(type(a) is type(b) for a, b in zip(_tensors(copied), _tensors(model)))
    assert not any(a is b for a, b in zip(copied.modules(), model.modules()))
    assert len(copied.features[0]._forward_hooks) == 1
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(copied(x), model(x))
    copied.train()
    assert not model.training


def test_shared_submodules_and_tied_weights_stay_shared_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    model.extra = nn.Linear(4, 4)
    model.extra.weight = shared.weight
    copied = copy_module(model, {})
    assert copied[0] is copied[2] and copied[0] is not shared
    assert copied.extra.weight is copied[0].weight


def test_custom_copy_protocols_fall_back_to_deepcopy():
    model = nn.Sequential(nn.Linear(3, 3))
    parametrize.register_parametrization(model[0], "weight", Doubler())
    copied = copy_module(model, {})
    assert parametrize.is_parametrized(copied[0], "weight")
    assert torch.equal(copied[0].weight, model[0].weight)


def test_structural_copy_shares_tensors_only():
    model = torchvision.models.resnet18()
    copied = structural_copy(model)
    assert all(a is b for a, b in zip(_tensors(copied), _tensors(model)))
    assert not any(a is b for a, b in zip(copied.modules(), model.modules()))


def test_graph_module_copy_maps_tensors_through_the_memo():
    gm = trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    weight = gm.get_submodule("0").weight
    copied = copy_graph_module(gm, {id(weight): weight})
    assert copied.get_submodule("0").weight is weight
    assert copied.get_submodule("1").weight is not gm.get_submodule("1").weight
    assert copied.code == gm.code


def test_torch_nn_classes_with_compat_setstate_copy_like_deepcopy():
    """Conv, RNN and attention modules define __setstate__ for old pickles only."""
    import copy

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 8, 3, padding=1)
            self.rnn = nn.LSTM(8, 6, batch_first=True)
            self.attn = nn.MultiheadAttention(6, 2, batch_first=True)

        def forward(self, x):
            y, _ = self.rnn(self.conv(x).transpose(1, 2))
            return self.attn(y, y, y)[0]

    model = Mixed().eval()
    fast, slow = copy_module(model, {}), copy.deepcopy(model)
    x = torch.randn(2, 4, 5)
    assert torch.equal(fast(x), slow(x)) and torch.equal(fast(x), model(x))
    assert fast.rnn._flat_weights[0] is fast.rnn.weight_ih_l0 is not model.rnn.weight_ih_l0
    assert repr(fast) == repr(slow)


def test_the_traced_module_generates_code_on_first_use_and_the_pruned_one_is_plain():
    """The plan's traced module defers code generation (a prune never runs it); the pruned
    module is an ordinary GraphModule with its code, so TorchScript and pickling work as usual."""
    import gc
    import pickle

    import fxprune
    from torch.fx._lazy_graph_module import _LazyGraphModule

    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5), (x,))
    assert gc.isenabled()
    with torch.no_grad():
        assert torch.equal(plan.traced(x), model(x))
    assert "conv1" in plan.traced.code
    pruned = fxprune.apply(plan)
    assert isinstance(pruned, torch.fx.GraphModule) and not isinstance(pruned, _LazyGraphModule)
    assert "conv1" in pruned.code
    assert torch.allclose(torch.jit.script(pruned)(x), pruned(x))
    assert torch.allclose(pickle.loads(pickle.dumps(pruned))(x), pruned(x))


def test_a_failing_prune_leaves_the_garbage_collector_on():
    import gc

    import fxprune
    from fxprune.errors import FxPruneError

    with pytest.raises(FxPruneError):
        fxprune.plan(nn.Conv2d(3, 4, 3), fxprune.Policy(ratio=0.5), (torch.randn(1, 5, 8, 8),))
    assert gc.isenabled()
