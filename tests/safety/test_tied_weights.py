"""Tied parameters (one tensor under several names) stay one tensor in the pruned model, cut at
the same positions for every name, or their group is blocked with the reason recorded."""
import torch
import torch.nn as nn

import fxprune


def _count(m):
    return sum(p.numel() for p in m.parameters())  # a tied tensor counts once


def _check(model, inputs, fresh):
    before = _count(model)
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5), inputs)
    result = fxprune.verify(pruned, inputs=fresh)
    assert result.ok and result.exact, result
    assert _count(pruned) <= before
    return pruned


class SharedConv(nn.Module):
    """One conv weight (and bias) used by two modules: ``b.weight = a.weight``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.b.weight, self.b.bias = self.a.weight, self.a.bias
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(torch.relu(self.stem(x))))))


class TiedLM(nn.Module):
    """An embedding and a decoder sharing one weight, with a prunable block between."""

    def __init__(self, vocab=20, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, 32)
        self.down = nn.Linear(32, dim)
        self.dec = nn.Linear(dim, vocab)
        self.dec.weight = self.emb.weight

    def forward(self, ids):
        return self.dec(self.down(torch.relu(self.up(self.emb(ids)))))


def test_shared_conv_weight_stays_tied_and_is_pruned():
    torch.manual_seed(0)
    model = SharedConv()
    pruned = _check(model, (torch.randn(1, 3, 8, 8),), (torch.randn(2, 3, 8, 8),))
    a, b = pruned.get_submodule("a"), pruned.get_submodule("b")
    assert a.weight is b.weight and a.bias is b.bias
    assert a.out_channels == b.out_channels == 4 and a.in_channels == b.in_channels == 4
    assert _count(pruned) < _count(model)


def test_tied_embedding_decoder_stays_tied():
    torch.manual_seed(0)
    model = TiedLM()
    ids = torch.randint(0, 20, (2, 5))
    pruned = _check(model, (ids,), (torch.randint(0, 20, (3, 7)),))
    assert pruned.get_submodule("dec").weight is pruned.get_submodule("emb").weight
    plan = pruned.meta["fxprune"]
    # the hidden width is the embedding's columns and the decoder's input columns of one tensor:
    # it goes as one group, cut once, and the tensor stays shared
    emb, dec, down = (pruned.get_submodule(n) for n in ("emb", "dec", "down"))
    assert emb.embedding_dim == dec.in_features == down.out_features == emb.weight.shape[1] < 16
    assert dec.out_features == 20  # the logits' width never changes
    assert any(g.removed for g in plan.groups if g.kind == "hidden")


def test_tied_weight_frozen_under_one_name_is_frozen_under_all():
    class FrozenUse(nn.Module):
        """``d.weight`` is ``b.weight``, read whole by an op fxprune does not know."""

        def __init__(self):
            super().__init__()
            self.d = nn.Conv2d(8, 8, 1)  # first: tracing reads the tensor as get_attr d.weight
            self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
            self.b.weight = self.d.weight
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.head(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))
            return y * torch.linalg.matrix_norm(self.d.weight.flatten(1))

    torch.manual_seed(0)
    model = FrozenUse()
    pruned = _check(model, (torch.randn(1, 3, 4, 4),), (torch.randn(2, 3, 4, 4),))
    assert any(n.op == "get_attr" and n.target == "d.weight" for n in pruned.graph.nodes)
    assert pruned.get_submodule("b").weight is pruned.get_submodule("d").weight
    assert pruned.get_submodule("b").weight.shape == (8, 8, 1, 1)
    assert pruned.get_submodule("c").out_channels == 4  # the rest is still pruned
