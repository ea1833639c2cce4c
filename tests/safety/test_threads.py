"""Concurrent fxprune calls in threads give the results they give alone: captures (torch.fx
patches nn.Module.__call__ process-wide while it traces) run one at a time under a lock."""
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune

X = (torch.randn(2, 3, 16, 16),)


class NeedsExport(nn.Module):
    """symbolic_trace fails on the shape check; auto captures it with torch.export."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        if x.shape[-1] % 2:
            raise ValueError("even widths only")
        return self.b(F.relu(self.a(x)))


def _models():
    torch.manual_seed(0)
    return [nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
            for _ in range(3)] + [NeedsExport().eval() for _ in range(3)]


def _run_in_threads(work, n):
    results, errors = [None] * n, []

    def run(i):
        try:
            results[i] = work(i)
        except Exception as exc:  # asserted below, with the thread's error
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_concurrent_transforms_equal_sequential_ones():
    models = _models()
    alone = [fxprune.transform(m, fxprune.Policy(ratio=0.5), X) for m in models]
    together = _run_in_threads(lambda i: fxprune.transform(models[i], fxprune.Policy(ratio=0.5), X), len(models))
    for a, b, m in zip(alone, together, models):
        assert fxprune.verify(b).ok
        assert a.meta["fxprune"].capture["frontend"] == b.meta["fxprune"].capture["frontend"]
        torch.testing.assert_close(a(*X), b(*X))
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_concurrent_plans_of_one_model_leave_it_untouched(unchanged):
    snapshot, assert_unchanged = unchanged
    model = _models()[0]
    before = snapshot(model)
    plans = _run_in_threads(lambda i: fxprune.plan(model, fxprune.Policy(ratio=0.25 * (i % 3 + 1)), X), 4)
    assert_unchanged(model, before)
    assert [sum(len(g.removed) for g in p.groups) for p in plans][:3] == sorted(
        sum(len(g.removed) for g in p.groups) for p in plans[:3])


def test_eager_forwards_in_other_threads_are_untouched_by_a_trace():
    torch.manual_seed(0)
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    with torch.no_grad():
        expected = other(*X)
    stop, outputs, errors = threading.Event(), [], []

    def forward_loop():
        with torch.no_grad():
            while not stop.is_set():
                try:
                    outputs.append(other(*X))
                except Exception as exc:  # asserted below
                    errors.append(exc)
                    return

    worker = threading.Thread(target=forward_loop)
    worker.start()
    try:
        for _ in range(5):  # traces of the same model (shared tensors) and of another one
            fxprune.plan(other, fxprune.Policy(ratio=0.5), X, capture="fx")
            fxprune.plan(_models()[0], fxprune.Policy(ratio=0.5), X, capture="fx")
    finally:
        stop.set()
        worker.join()
    assert not errors, errors
    assert outputs and all(torch.equal(o, expected) for o in outputs)
