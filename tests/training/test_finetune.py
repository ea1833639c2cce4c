"""Behaviour of fxprune.training: finetune's schedule, regulariser and callbacks; evaluate's mode handling."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fxprune.training import evaluate, finetune
from fxprune.training.finetune import cosine_factor


def blobs(n=512, seed=0):
    """Two well-separated Gaussian blobs in 4-D, labelled 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    centres = torch.tensor([[-2.0, 1.0, 0.0, 0.5], [2.0, -1.0, 0.5, 0.0]])
    inputs = centres[labels] + 0.5 * torch.randn(n, 4, generator=g)
    return TensorDataset(inputs, labels)


def loader(shuffle=True, batch_size=32):
    return DataLoader(blobs(), batch_size=batch_size, shuffle=shuffle)


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))


def test_finetune_raises_accuracy_and_reports_eval_accuracy():
    model = small_net()
    # Start from a model that gets everything wrong.
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.copy_(torch.tensor([5.0, -5.0]))
    test = loader(shuffle=False)
    before = evaluate(model, test)
    history = finetune(model, loader(), epochs=3, lr=0.1, eval_loader=test, progress=False, seed=0)
    after = evaluate(model, test)
    assert before == pytest.approx(0.5)
    assert after > 0.97
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["eval_accuracy"] == pytest.approx(after)
    assert history[-1]["loss"] < history[0]["loss"]
    assert all(h["seconds"] >= 0 for h in history)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_learning_rate_follows_cosine_down_to_zero(optimizer):
    history = finetune(small_net(), loader(), epochs=2, optimizer=optimizer, lr=0.2,
                       progress=False, seed=0)
    assert history[0]["lr"] == pytest.approx(0.1)  # half-way through a half cosine
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert cosine_factor(0, 10) == 1.0 and cosine_factor(10, 10) == pytest.approx(0.0)
    assert cosine_factor(5, 10) == pytest.approx(0.5)
    assert cosine_factor(2, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))


def test_regularizer_is_added_to_the_loss_every_step():
    calls = []

    def constant_penalty(model):
        calls.append(model)
        return torch.tensor(7.0)

    train = loader()
    plain = finetune(small_net(), train, epochs=1, lr=0.0, progress=False, seed=0)
    penalised = finetune(small_net(), train, epochs=1, lr=0.0, regularizer=constant_penalty,
                         progress=False, seed=0)
    assert len(calls) == len(train)
    assert penalised[0]["regularizer"] == pytest.approx(7.0)
    assert penalised[0]["loss"] == pytest.approx(plain[0]["loss"] + 7.0, rel=1e-5)
    assert "regularizer" not in plain[0]


def test_regularizer_gradient_reaches_the_parameters():
    def weight_norm(model):
        return sum(p.square().sum() for p in model.parameters())

    free, shrunk = small_net(), small_net()
    finetune(free, loader(), epochs=2, lr=0.05, weight_decay=0.0, progress=False, seed=0)
    finetune(shrunk, loader(), epochs=2, lr=0.05, weight_decay=0.0, progress=False, seed=0,
             regularizer=lambda m: 1.0 * weight_norm(m))
    with torch.no_grad():
        assert float(weight_norm(shrunk)) < 0.5 * float(weight_norm(free))


def test_on_epoch_end_receives_metrics_and_can_stop_training():
    seen = []

    def callback(epoch, model, metrics):
        seen.append((epoch, model, dict(metrics)))
        return epoch == 2

    model = small_net()
    history = finetune(model, loader(), epochs=5, progress=False, on_epoch_end=callback)
    assert len(history) == 2
    assert [s[0] for s in seen] == [1, 2]
    assert seen[0][1] is model
    assert seen[1][2] == history[1]


def test_same_seed_gives_same_weights():
    a, b = small_net(), small_net()
    finetune(a, loader(), epochs=1, lr=0.1, progress=False, seed=3)
    finetune(b, loader(), epochs=1, lr=0.1, progress=False, seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_bad_arguments_and_diverging_loss_are_reported():
    with pytest.raises(ValueError, match="optimizer"):
        finetune(small_net(), loader(), optimizer="lbfgs", progress=False)
    with pytest.raises(ValueError, match="epochs"):
        finetune(small_net(), loader(), epochs=0, progress=False)
    with pytest.raises(FloatingPointError, match="epoch 1, step 1"):
        finetune(small_net(), loader(), progress=False,
                 regularizer=lambda m: torch.tensor(float("nan")))


class ModeRecorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.modes = []

    def forward(self, x):
        self.modes.append((self.training, torch.is_grad_enabled()))
        return self.linear(x)


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_runs_in_eval_mode_without_grad_and_restores_the_flag(training):
    model = ModeRecorder().train(training)
    accuracy = evaluate(model, loader(shuffle=False, batch_size=128))
    assert 0.0 <= accuracy <= 1.0
    assert set(model.modes) == {(False, False)}
    assert model.training is training and model.linear.training is training


def test_evaluate_restores_mixed_submodule_flags():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    model[1].eval()
    evaluate(model, loader(shuffle=False))
    assert [m.training for m in model.modules()] == [True, True, False, True]


def test_evaluate_rejects_an_empty_loader():
    with pytest.raises(ValueError, match="no samples"):
        evaluate(small_net(), [])
