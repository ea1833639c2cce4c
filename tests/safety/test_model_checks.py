"""Model features that tracing drops or fxprune cannot slice are refused before capture with a
``ModelError`` naming the module and what to do; wrapped models are unwrapped."""
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import FxPruneError, ModelError, ModelWarning
from fxprune.model_checks import check_model, unwrap

X = torch.randn(2, 3, 10, 10)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.body(x))


def _refused(model, *words):
    """check_model and fxprune.plan both refuse ``model`` with a ModelError containing ``words``."""
    with pytest.raises(ModelError) as direct:
        check_model(model)
    with pytest.raises(ModelError) as planned:
        fxprune.plan(model, fxprune.Policy(ratio=0.5), (X,))
    for err in (direct.value, planned.value):
        assert isinstance(err, FxPruneError) and err.problems
        for word in words:
            assert word in str(err), str(err)
    return direct.value


def _double(module, args, out):
    return out * 2


def _double_input(module, args):
    return (args[0] * 2,)


def test_root_forward_hook_is_refused():
    m = _net()
    m.register_forward_hook(_double)
    err = _refused(m, "_double", "drops")
    assert err.problems[0][0] == "the model (Sequential)"


def test_root_forward_pre_hook_is_refused():
    m = _net()
    m.register_forward_pre_hook(_double_input)
    _refused(m, "pre-hook", "_double_input")


def test_hook_on_inlined_submodule_is_refused():
    m = _Outer()
    m.body.register_forward_hook(_double)
    _refused(m, "'body' (Sequential)", "drops")


def test_hook_on_leaf_module_is_kept_with_a_warning():
    m = _net()
    m[2].register_forward_hook(_double)  # leaf modules are called by the traced module: kept
    with pytest.warns(ModelWarning, match=r"'2' \(Conv2d\): forward hooks _double are kept"):
        pruned = fxprune.transform(m, fxprune.Policy(ratio=0.5), (X,))
    assert pruned.get_submodule("2")._forward_hooks  # run by the pruned module too
    result = fxprune.verify(pruned, inputs=(torch.randn(2, 3, 10, 10),))
    assert result.ok and result.exact, result


def test_global_forward_hook_is_refused():
    handle = torch.nn.modules.module.register_module_forward_hook(_double)
    try:
        _refused(_net(), "global forward hook")
    finally:
        handle.remove()


def test_hook_on_a_wrapper_is_refused():
    wrapper = nn.DataParallel(_net())
    wrapper.register_forward_hook(_double)
    with pytest.raises(ModelError, match="DataParallel wrapper"):
        unwrap(wrapper)


def test_legacy_spectral_norm_is_refused():
    m = _net()
    nn.utils.spectral_norm(m[2])
    _refused(m, "'2' (Conv2d)", "remove_spectral_norm")


def test_legacy_weight_norm_is_refused():
    m = _net()
    with pytest.warns(FutureWarning):
        nn.utils.weight_norm(m[2])
    _refused(m, "'2' (Conv2d)", "remove_weight_norm")


class _Double(nn.Module):
    def forward(self, w):
        return w * 2


class _InvertibleDouble(_Double):
    def right_inverse(self, w):
        return w / 2


def test_parametrization_without_right_inverse_is_refused():
    m = _net()
    nn.utils.parametrize.register_parametrization(m[2], "weight", _Double())
    _refused(m, "'2' (ParametrizedConv2d)", "_Double", "right_inverse", "remove_parametrizations")


@pytest.mark.parametrize("kind", ["spectral_norm", "orthogonal"])
def test_value_changing_parametrizations_are_refused(kind):
    m = _net()
    getattr(nn.utils.parametrizations, kind)(m[4] if kind == "orthogonal" else m[2])
    _refused(m, "remove_parametrizations")


@pytest.mark.parametrize("make", [lambda m: nn.utils.parametrizations.weight_norm(m),
                                  lambda m: nn.utils.parametrize.register_parametrization(
                                      m, "weight", _InvertibleDouble())],
                         ids=["weight_norm", "invertible"])
def test_invertible_parametrizations_prune_exactly(make):
    m = _net()
    make(m[2])
    check_model(m)
    pruned = fxprune.transform(m, fxprune.Policy(ratio=0.5), (X,))
    assert pruned.get_submodule("2").weight.shape[:2] == (4, 4)
    result = fxprune.verify(pruned, inputs=(torch.randn(2, 3, 10, 10),))
    assert result.ok and result.exact, result


def test_fx_quantized_models_are_refused():
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).train()
    with pytest.warns(Warning):  # torch.ao's FX quantization is deprecated
        qat = prepare_qat_fx(m, get_default_qat_qconfig_mapping("fbgemm"), (X,))
    qat(X)
    _refused(qat, "quantized, QAT or observer", "prune the float model first")
    with pytest.warns(Warning):
        converted = convert_fx(qat.eval())
    _refused(converted, "quantized, QAT or observer")


def test_meta_parameters_are_refused():
    with torch.device("meta"):
        m = _net()
    _refused(m, "'meta' device", "to_empty")


def test_plain_model_passes():
    m = _net()
    assert check_model(m) is None
    assert check_model(_Outer()) is None


def test_unwrap_compile_and_data_parallel():
    m = _net()
    assert unwrap(m) is m
    assert unwrap(nn.DataParallel(m)) is m
    assert unwrap(torch.compile(m)) is m
    assert unwrap(torch.compile(nn.DataParallel(m))) is m


def test_plan_unwraps_wrapped_models():
    m = _net()
    for wrapped in (nn.DataParallel(m), torch.compile(m)):
        pruned = fxprune.transform(wrapped, fxprune.Policy(ratio=0.5), (X,))
        assert pruned.get_submodule("0").out_channels == 4
        assert fxprune.verify(pruned).ok


def test_unwrap_distributed_data_parallel(tmp_path):
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        m = _net()
        ddp = nn.parallel.DistributedDataParallel(m)
        assert unwrap(ddp) is m
        pruned = fxprune.transform(ddp, fxprune.Policy(ratio=0.5), (X,))
        assert fxprune.verify(pruned).ok
    finally:
        dist.destroy_process_group()
