"""Shape rules for timm's layers FX keeps whole: the shape each returns is the shape the layer
computes, and anything unusual defers to the meta kernel (None)."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import fxprune.coupling.ops  # noqa: F401  (the op table the timm rows read)
from fxprune import shapes

timm = pytest.importorskip("timm")
import timm.layers as tl  # noqa: E402
from timm.layers.std_conv import ScaledStdConv2dSame, StdConv2d, StdConv2dSame  # noqa: E402

from fxprune.coupling.timm_rules import _table  # noqa: E402

_table()  # registers timm's shape rows, as the first timm model met does


def _shape_rule(module):
    return shapes._SHAPE_RULES.get(type(module))


def _rule_shape(module, x):
    rule = _shape_rule(module)
    assert rule is not None, type(module).__name__
    out = rule(module, x.to("meta"))
    return None if out is None else tuple(out.shape)


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 12), width=st.integers(1, 12), k=st.integers(1, 5), stride=st.integers(1, 3),
       dilation=st.integers(1, 2), kind=st.sampled_from([tl.Conv2dSame, StdConv2dSame, ScaledStdConv2dSame]))
def test_same_padding_convs_give_the_shape_they_compute(size, width, k, stride, dilation, kind):
    conv = kind(4, 6, k, stride=stride, dilation=dilation).eval()
    x = torch.randn(2, 4, size, width)
    with torch.no_grad():
        assert _rule_shape(conv, x) == tuple(conv(x).shape)


def test_std_conv_without_same_padding_is_a_plain_conv_shape():
    conv = StdConv2d(4, 6, 3, stride=2, padding=1).eval()
    x = torch.randn(1, 4, 9, 7)
    with torch.no_grad():
        assert _rule_shape(conv, x) == tuple(conv(x).shape) == (1, 6, 5, 4)


@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU, tl.Swish, nn.Identity])
def test_batch_norm_act_keeps_the_shape_when_its_act_is_per_channel(act):
    bn = tl.BatchNormAct2d(8, act_layer=act).eval()
    x = torch.randn(2, 8, 5, 5)
    assert _rule_shape(bn, x) == (2, 8, 5, 5)


def test_anything_unusual_defers_to_the_meta_kernel():
    assert _rule_shape(tl.BatchNormAct2d(8).eval(), torch.randn(2, 6, 5, 5)) is None  # wrong width
    assert _rule_shape(tl.BatchNormAct2d(8, act_layer=nn.Softmax2d).eval(), torch.randn(2, 8, 5, 5)) is None
    assert _rule_shape(tl.Conv2dSame(4, 6, 3), torch.randn(4, 5, 5)) is None  # unbatched
    assert _shape_rule(tl.EcaModule(8)) is None  # no row: its module runs on meta tensors


def test_a_subclass_of_a_timm_layer_has_no_rule():
    class MyBN(tl.BatchNormAct2d):
        def forward(self, x):
            return super().forward(x)[:, :4]

    assert _shape_rule(MyBN(8)) is None
