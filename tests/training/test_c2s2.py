"""C2S2Pruner: binarisation widths, exact fold, the cost-aware schedules, stages, exact finalize."""
import pytest
import torch

import fxprune
from fxprune.training import C2S2Pruner
from fxprune.verify import relative_error
from training_nets import batch, hook_count, tiny_resnet, train_steps

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
X = (batch(0, n=2)[0],)


def set_gates(pruner, fn):
    with torch.no_grad():
        for gid, gate in pruner.gates.items():
            gate.copy_(fn(int(gid), gate))


def test_binarisation_keeps_at_least_min_channels():
    model = tiny_resnet()
    pruner = C2S2Pruner(model, fxprune.Policy(min_channels=3), X, tau=0.5)
    set_gates(pruner, lambda gid, g: torch.linspace(0.0, 0.1, g.numel()))   # all below tau
    pruner.advance()
    assert pruner.phase == "done"
    for g in pruner.groups:
        keep = pruner.keep[g.id]
        assert int(keep.sum()) == 3
        assert keep[-3:].all()                          # the largest |g| survive
    pruned = pruner.finalize()
    assert fxprune.verify(pruned).ok
    assert all(g.kept >= 3 for g in pruned.meta["fxprune"].groups)


def test_threshold_round_to_and_sign():
    model = tiny_resnet()
    pruner = C2S2Pruner(model, fxprune.Policy(round_to=4), X, tau=0.3)
    set_gates(pruner, lambda gid, g: torch.tensor([-0.9, 0.1, 0.5, 0.0] * (g.numel() // 4)))
    pruner.advance()
    for g in pruner.groups:
        kept = int(pruner.keep[g.id].sum())
        assert kept % 4 == 0 and kept >= g.size // 2       # |-0.9| and 0.5 pass, then rounded up
    pruner.remove()


def test_fold_is_exact():
    model = tiny_resnet()
    pruner = C2S2Pruner(model, fxprune.Policy(), X, tau=0.0)
    torch.manual_seed(3)
    set_gates(pruner, lambda gid, g: torch.randn(g.numel()))  # signs and sizes of all kinds
    model.eval()
    x = batch(4)[0]
    with torch.no_grad():
        gated = model(x)
        pruner.advance()                                       # binarise (all kept) and fold
        folded = model(x)
    assert all(bool(k.all()) for k in pruner.keep.values())
    assert relative_error(folded, gated) < 1e-5
    assert all(torch.equal(g, torch.ones_like(g)) for g in pruner.gates.values())
    pruner.remove()


def test_loss_aware_lambda():
    model = tiny_resnet()
    pruner = C2S2Pruner(model, fxprune.Policy(), X, lam=1.0, adjust_every=2, search_steps=100,
                        delta=0.1, kappa_down=0.5, kappa_up=2.0)
    for loss in (1.0, 1.0):                     # first window: the reference ce0
        pruner.step(loss=loss)
    assert pruner.ce0 == 1.0 and pruner.lam == 1.0
    for loss in (1.05, 1.05):                   # within (1 + delta): more sparsity
        pruner.step(loss=torch.tensor(loss))
    assert pruner.lam == 2.0
    for loss in (1.5, 1.5):                     # too much loss: back off
        pruner.step(loss=loss)
    assert pruner.lam == 1.0
    pruner.remove()


def test_compute_aware_weights_and_early_stop():
    model = tiny_resnet()
    pruner = C2S2Pruner(model, fxprune.Policy(flops=0.7, scope="global", normalize="none"), X,
                        cost="compute", adjust_every=1, search_steps=50)
    assert sum(pruner.weights.values()) == pytest.approx(len(pruner.groups))
    stem = next(g for g in pruner.groups if any(p.owner == "stem" for p in g.producers))
    inner = next(g for g in pruner.groups if any(p.owner == "block1.conv1" for p in g.producers))
    assert pruner.weights[stem.id] > pruner.weights[inner.id]   # the residual stream costs more
    pruner.step()
    assert pruner.phase == "search"
    set_gates(pruner, lambda gid, g: torch.where(torch.arange(g.numel()) % 2 == 0, 1.0, 0.0))
    pruner.step()                                                # binarising now meets 0.7
    assert pruner.phase == "done" and pruner.macs_kept() <= 0.7
    pruner.remove()


def test_budget_enforced_before_the_last_finetune():
    model = tiny_resnet()
    pruner = C2S2Pruner(model, fxprune.Policy(flops=0.5, scope="global", normalize="none"), X, search_steps=1,
                        finetune_steps=2)
    torch.manual_seed(0)
    set_gates(pruner, lambda gid, g: 0.5 + torch.rand(g.numel()))   # nothing below tau
    pruner.step()
    assert pruner.phase == "finetune"                                 # phase 2 trains the budgeted net
    assert pruner.macs_kept() == pytest.approx(0.5, abs=0.02)
    pruner.step(), pruner.step()
    assert pruner.phase == "done"
    pruned = pruner.finalize()
    assert fxprune.verify(pruned).ok


def test_progressive_stages_train_one_group_at_a_time():
    model = tiny_resnet()
    pruner = C2S2Pruner(model, fxprune.Policy(), X, lam=0.5, search_steps=2, finetune_steps=1, progressive=True)
    assert len(pruner.stages) == len(pruner.groups) and pruner.stages[0] == [pruner.groups[0].id]
    phases = []
    opt = torch.optim.SGD([*model.parameters(), *pruner.parameters()], lr=0.1)
    while pruner.phase != "done":
        searched = pruner.current_groups if pruner.phase == "search" else []
        trainable = [int(gid) for gid, g in pruner.gates.items() if g.requires_grad]
        assert trainable == searched
        assert (float(pruner.regularizer()) > 0) == bool(searched)
        x, y = batch(len(phases))
        loss = torch.nn.functional.cross_entropy(model(x), y) + pruner.regularizer()
        opt.zero_grad(); loss.backward(); opt.step()
        phases.append(pruner.step(loss=loss))
    assert len(phases) == 3 * len(pruner.groups)
    assert set(pruner.binary) == {g.id for g in pruner.groups}
    pruner.remove()


def test_finalize_equals_binary_gated_model_and_removes_hooks():
    model = tiny_resnet()
    pruner = C2S2Pruner(model, fxprune.Policy(scope="global"), X, lam=2.0, tau=0.9, search_steps=4,
                        finetune_steps=2)
    train_steps(model, pruner, 6, extra_params=list(pruner.parameters()), task_loss=True)
    assert pruner.phase == "done" and any(not bool(k.all()) for k in pruner.keep.values())
    model.eval()
    x = batch(7)[0]
    with torch.no_grad():
        binary = model(x)
    pruned = pruner.finalize()
    assert hook_count(model) == 0 and not pruner.hooks_attached()
    with torch.no_grad():
        assert relative_error(pruned.eval()(x), binary) < 1e-5
    assert fxprune.verify(pruned).ok
    assert float(pruner.regularizer()) == 0.0


def test_finalize_mid_search_binarises_what_is_left():
    model = tiny_resnet()
    pruner = C2S2Pruner(model, fxprune.Policy(), X, progressive=2, search_steps=10)
    set_gates(pruner, lambda gid, g: torch.where(torch.arange(g.numel()) < 2, 0.0, 1.0))
    pruned = pruner.finalize()
    assert fxprune.verify(pruned).ok
    assert all(g.kept == g.size - 2 for g in pruned.meta["fxprune"].groups if g.id in pruner.keep)
