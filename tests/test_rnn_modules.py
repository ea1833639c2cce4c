"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) through torch.fx (leaf modules) and
torch.export (``aten.lstm.input`` and friends): the upstream layer's channels are consumed by
``weight_ih_l0`` (exact, checked by the mask oracle in float64 with ``exact_only=True``), the
hidden channels stay with a reason naming the module and the recurrent state, and the pruned
module runs, re-traces and scripts."""
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxprune
from oracle_helpers import prune_verified

CAPTURES = ["fx", "export"]
EXACT = dict(exact_only=True, max_error=1e-9, seed=0)  # float64, exact groups only, oracle within 1e-9


class LinearRNN(nn.Module):
    """Linear -> recurrent layer -> Linear on (B, T, C) (or (T, B, C) when not batch_first)."""

    def __init__(self, rnn: nn.Module, width: int = 8):
        super().__init__()
        self.inp = nn.Linear(3, width)
        self.rnn = rnn
        out = rnn.hidden_size if getattr(rnn, "proj_size", 0) == 0 else rnn.proj_size
        self.out = nn.Linear(out * (2 if rnn.bidirectional else 1), 4)

    def forward(self, x):
        y, _ = self.rnn(self.inp(x))
        return self.out(y)


class ConvLSTM(nn.Module):
    """Conv1d over (B, C, T) -> transpose -> batch_first LSTM; returns output, h_n and c_n."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.rnn = nn.LSTM(8, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        y, (h, c) = self.rnn(torch.relu(self.conv(x)).transpose(1, 2))
        return self.head(y), h, c


def _batch_first(rnn):
    return rnn.batch_first


def _inputs(model):
    """(B=2, T=5, 3) for batch_first layers, (T=5, B=2, 3) otherwise; (B, 3, T) for the conv."""
    if isinstance(model, ConvLSTM):
        return (torch.randn(2, 3, 5),)
    return (torch.randn(2, 5, 3) if _batch_first(model.rnn) else torch.randn(5, 2, 3),)


def _weight_ih_owner(pruned, capture):
    """The module holding ``weight_ih_l0`` in the pruned graph (export keeps a plain Module)."""
    return pruned.get_submodule("rnn")


RNNS = {
    "lstm_batch_first": lambda: nn.LSTM(8, 6, batch_first=True),
    "lstm_seq_first": lambda: nn.LSTM(8, 6, bias=False),
    "lstm_bidirectional_2_layers": lambda: nn.LSTM(8, 6, num_layers=2, bidirectional=True, batch_first=True),
    "lstm_proj_size": lambda: nn.LSTM(8, 6, proj_size=3, bidirectional=True),
    "gru": lambda: nn.GRU(8, 6, num_layers=2, batch_first=True),
    "rnn_relu_bidirectional": lambda: nn.RNN(8, 6, nonlinearity="relu", bidirectional=True),
}


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("kind", sorted(RNNS))
def test_upstream_channels_pruned_exactly(kind, capture):
    torch.manual_seed(0)
    model = LinearRNN(RNNS[kind]())
    plan, pruned = prune_verified(model, _inputs(model), capture, **EXACT)
    pruned_groups = [g for g in plan.groups if g.removed]
    assert [(g.size, g.kept) for g in pruned_groups] == [(8, 4)]
    rnn = _weight_ih_owner(pruned, capture)
    directions = 2 if model.rnn.bidirectional else 1
    for name in ["weight_ih_l0", "weight_ih_l0_reverse"][:directions]:
        assert getattr(rnn, name).shape[1] == 4
    gates = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[type(model.rnn)]
    for layer in range(1, model.rnn.num_layers):  # upper layers read the hidden state: whole
        for name in [f"weight_ih_l{layer}", f"weight_ih_l{layer}_reverse"][:directions]:
            assert getattr(rnn, name).shape == (gates * 6, (model.rnn.proj_size or 6) * directions)
    assert pruned.get_submodule("inp").out_features == 4
    if capture == "fx":
        assert rnn.input_size == 4


@pytest.mark.parametrize("capture", CAPTURES)
def test_hidden_channels_blocked_with_reason(capture):
    torch.manual_seed(0)
    model = ConvLSTM()
    plan, pruned = prune_verified(model, _inputs(model), capture, **EXACT)
    assert [(g.size, g.kept) for g in plan.groups if g.removed] == [(8, 4)]
    rnn_node = next(n.name for n in plan.traced.graph.nodes if "lstm" in str(n.target) or n.target == "rnn")
    reasons = [why for node, why in plan.blocked_ops if node == rnn_node]
    assert len(reasons) == 1 and "recurrent state" in reasons[0] and "weight_hh" in reasons[0], plan.blocked_ops
    assert "module rnn" in reasons[0] or "(LSTM)" in reasons[0], reasons
    units = plan.analysis.units  # the hidden channels the head reads are pinned with that reason
    head_units = plan.analysis.params[("head.weight", 1)].units
    assert all(units.pins.get(u) == reasons[0] for u in head_units)
    assert "head" not in {p.owner for g in plan.groups if g.removed for p in g.params}
    out, h, c = pruned(torch.randn(2, 3, 5, dtype=torch.float64))
    assert out.shape == (2, 5, 2) and h.shape == c.shape == (1, 2, 5)


def test_flat_weights_follow_the_sliced_parameter():
    """nn.LSTM's forward reads its cached ``_flat_weights``: they must be the sliced tensors."""
    torch.manual_seed(0)
    model = LinearRNN(nn.LSTM(8, 6, num_layers=2, bidirectional=True, batch_first=True))
    _, pruned = prune_verified(model, _inputs(model), "fx", **EXACT)
    rnn = pruned.rnn
    assert all(w is getattr(rnn, n) for w, n in zip(rnn._flat_weights, rnn._flat_weights_names))
    fresh = nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True).double()
    fresh.load_state_dict(rnn.state_dict())
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(rnn(x)[0], fresh(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["lstm_bidirectional_2_layers", "gru", "rnn_relu_bidirectional"])
def test_pruned_module_retraces_and_scripts(kind):
    torch.manual_seed(0)
    model = LinearRNN(RNNS[kind]())
    x = tuple(t.double() for t in _inputs(model))
    torch.jit.script(fx.symbolic_trace(model))  # the original scripts
    _, pruned = prune_verified(model, x, "fx", **EXACT)
    expected = pruned(*x)
    retraced = fx.symbolic_trace(pruned)
    torch.testing.assert_close(retraced(*x), expected, rtol=0, atol=0)
    scripted = torch.jit.script(pruned)
    torch.testing.assert_close(scripted(*x), expected, rtol=1e-12, atol=1e-12)
    again = fxprune.plan(pruned, fxprune.Policy("l1", 0.5), x)  # and plans again from the result
    assert [(g.size, g.kept) for g in again.groups if g.removed] == [(4, 2)]


class GivenState(nn.Module):
    """An LSTM started from a state computed by a Linear: those channels feed weight_hh."""

    def __init__(self):
        super().__init__()
        self.inp, self.state = nn.Linear(3, 8), nn.Linear(3, 6)
        self.rnn = nn.LSTM(8, 6, batch_first=True)

    def forward(self, x):
        h0 = self.state(x[:, 0]).unsqueeze(0)
        y, _ = self.rnn(self.inp(x), (h0, torch.zeros_like(h0)))
        return y


@pytest.mark.parametrize("capture", CAPTURES)
def test_initial_state_is_pinned(capture):
    torch.manual_seed(0)
    plan, _ = prune_verified(GivenState(), (torch.randn(2, 5, 3),), capture, **EXACT)
    assert [(g.size, g.kept) for g in plan.groups if g.removed] == [(8, 4)]
    state = next(g for g in plan.groups if any(p.owner == "state" and p.role == "producer" for p in g.params))
    assert state.blocked and any("recurrent state" in why for why in state.pinned.values())


class TimeOnChannels(nn.Module):
    """A conv's (B, C, T) output read by an LSTM as (batch, time=C, features=T): the conv's
    channels are the LSTM's time steps, which it mixes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 1)
        self.rnn = nn.GRU(5, 4, batch_first=True)

    def forward(self, x):
        return self.rnn(self.conv(x))[0]


def test_channels_on_the_time_dim_are_pinned():
    torch.manual_seed(0)
    plan, pruned = prune_verified(TimeOnChannels(), (torch.randn(2, 3, 5),), "fx", **EXACT)
    conv = next(g for g in plan.groups if any(p.owner == "conv" and p.role == "producer" for p in g.params))
    assert conv.blocked and not conv.removed
    assert any("feature (last) dim" in why for why in conv.pinned.values())
    assert pruned.rnn.weight_ih_l0.shape == (12, 5)


class SharedLSTM(nn.Module):
    """One LSTM called on two branches: both branches lose the same channels."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(3, 8)
        self.rnn = nn.LSTM(8, 4, batch_first=True)

    def forward(self, x):
        return self.rnn(self.a(x))[0] + self.rnn(torch.tanh(self.b(x)))[0]


def test_module_called_twice_couples_its_inputs():
    torch.manual_seed(0)
    plan, pruned = prune_verified(SharedLSTM(), (torch.randn(2, 5, 3),), "fx", **EXACT)
    group = next(g for g in plan.groups if g.removed)
    assert {p.owner for p in group.params if p.role == "producer"} == {"a", "b"}
    assert pruned.rnn.input_size == 4 == pruned.a.out_features == pruned.b.out_features


@pytest.mark.parametrize("capture", CAPTURES)
def test_unbatched_input(capture):
    """An unbatched (T, C) input: the features are still the last dim."""
    torch.manual_seed(0)
    model = LinearRNN(nn.GRU(8, 6, bidirectional=True))
    plan, pruned = prune_verified(model, (torch.randn(5, 3),), capture, **EXACT)
    assert [(g.size, g.kept) for g in plan.groups if g.removed] == [(8, 4)]
    assert pruned.rnn.weight_ih_l0_reverse.shape == (18, 4)
