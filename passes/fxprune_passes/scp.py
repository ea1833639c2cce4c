"""Similar Channel Pruning (SCP): remove the weaker channel of the most similar pair, data-free,
and merge its outgoing weights into its twin (see shared/METHODS.md, seed 1).

Reconstructed choices ([I] in METHODS.md), each an option of ``importance_options``:

=================  ==========  ===============================================================
option             default     meaning
=================  ==========  ===============================================================
``target_metric``  ``"l1"``    distance between producer vectors θ: ``"l1"``, ``"l2"``, ``"cosine"``
``next_metric``    ``"l1"``    distance between consumer vectors φ: same choices
``target_only``    ``False``   use only the target-layer distance (the thesis' ablation)
``pair_saliency``  ``"product"``  ``D_T * D_N``; ``"sum"``: ``D_T/max D_T + D_N/max D_N``
``compensate``     ``"scaled"``  merge the removed channel's consumer columns into its twin
                               times ``α = max(0, <θ_r, θ_t> / ‖θ_t‖²)``; ``True``: plain
                               merge (α = 1, the method as described); ``False``: none
``fold_bn``        ``True``    θ uses the BatchNorm-folded weights and bias of each producer
``scp_score``      ``"rank"``  score = greedy removal order; ``"saliency"``: the pair saliency
                               at removal (made strictly increasing), for global ranking
=================  ==========  ===============================================================

θ_c concatenates, over producers, the (folded) weight rows and bias of channel c; φ_c
concatenates, over consumers, the weight columns that contract over c. The greedy loop takes
the pair with the smallest saliency, drops the member with the smaller ‖φ‖₁ (pinned channels are
never dropped), and, with compensation, adds φ_r to φ_t and updates the twin's distances.
Scores are ranks, so selection removes exactly the greedy prefix; ``edits`` then performs
``W_q[:, t] += α·W_q[:, r]`` in every consumer, in removal order (so chains of twins compose).

Why ``"scaled"``: the merge assumes the removed channel's activation equals its twin's. When
``θ_r = α θ_t`` with ``α > 0`` (bias included, BatchNorm folded), the pre-activations scale by
α and so does any positively homogeneous activation (ReLU, LeakyReLU), so the exact merge is
``α·φ_r``; α is the least-squares fit of θ_r on θ_t. Plain merging (α = 1) is the method as
described; when the closest remaining pair is far from parallel (high pruning rates) it adds a
whole channel's weight to a channel that does not carry its signal, and accuracy drops (see
``benchmarks/reproduce/criteria_lenet_mnist.py``). With ``"scaled"``, nearly orthogonal pairs
merge with α near 0, and opposite ones not at all. Measured on LeNet-5/MNIST without
fine-tuning, scaled merging beats plain merging at every rate from 40% of channels removed
(50%: 94.0% against 87.7% test accuracy), so it is the default; identical twins (α = 1) merge
exactly as before.
"""
from __future__ import annotations

import torch

from .base import Criterion, cached
from .weights import channel_matrix, folded_producer

METRICS = ("l1", "l2", "cosine")


def distances(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    """Pairwise distances between the rows of ``x`` and ``y`` (float64).

    Example:
        >>> distances(torch.tensor([[0., 0.], [1., 1.]]), torch.tensor([[0., 0.], [1., 1.]]), "l1")
        tensor([[0., 2.],
                [2., 0.]], dtype=torch.float64)
    """
    x, y = x.to(torch.float64), y.to(torch.float64)
    if x.shape[1] == 0:
        return x.new_zeros(x.shape[0], y.shape[0])
    if metric == "cosine":
        xn = x / x.norm(dim=1, keepdim=True).clamp(min=1e-300)
        yn = y / y.norm(dim=1, keepdim=True).clamp(min=1e-300)
        return (1.0 - xn @ yn.T).clamp(min=0.0)
    if x.shape[0] == 1:  # one row against many: cheaper than cdist
        diff = (y - x).abs()
        return (diff.sum(1) if metric == "l1" else diff.pow(2).sum(1).sqrt())[None, :]
    return torch.cdist(x, y, p=1.0 if metric == "l1" else 2.0)


def theta(group, ctx, fold_bn: bool = True) -> torch.Tensor:
    """``(size, width)`` producer vectors: folded weight rows and bias of every producer.

    Example:
        >>> import fxprune
        >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> p = fxprune.plan(m, fxprune.Policy("l1", 0.5), (torch.randn(5, 3),))
        >>> ctx = fxprune.ImportanceContext(p.traced, p.groups, p.example_inputs)
        >>> theta(p.groups[0], ctx).shape   # 3 weights + 1 bias per channel
        torch.Size([4, 4])
    """
    parts = []
    for pm in group.producers:
        w, b = folded_producer(ctx, group, pm, fold_bn)
        parts += [channel_matrix(group, pm, w), channel_matrix(group, pm, b, dim=0)]
    return torch.cat(parts, 1).to(torch.float64)


def phi(group, ctx) -> torch.Tensor:
    """``(size, width)`` consumer vectors: the columns of every consumer that read channel c.

    Example:
        >>> import fxprune
        >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> p = fxprune.plan(m, fxprune.Policy("l1", 0.5), (torch.randn(5, 3),))
        >>> ctx = fxprune.ImportanceContext(p.traced, p.groups, p.example_inputs)
        >>> torch.equal(phi(p.groups[0], ctx), m[2].weight.detach().T.double())
        True
    """
    parts = [channel_matrix(group, pm, ctx.param(pm.target)) for pm in group.consumers]
    if not parts:
        return torch.zeros(group.size, 0, dtype=torch.float64)
    return torch.cat(parts, 1).to(torch.float64)


class _Greedy:
    """The greedy pair-removal loop over one group; ``steps`` = [(removed, twin, saliency)]."""

    def __init__(self, dt, f, pinned, metric, mode, use_next, compensate, th=None):
        self.f, self.metric, self.mode, self.compensate = f.clone(), metric, mode, compensate
        self.th = th  # producer vectors, for scaled compensation
        self.use_next = use_next and f.shape[1] > 0
        n = dt.shape[0]
        off = ~torch.eye(n, dtype=torch.bool)
        self.dt = dt
        self.dn = distances(self.f, self.f, metric) if self.use_next else None
        self.scale = (self._max(dt, off), self._max(self.dn, off) if self.use_next else 1.0)
        self.s = self._saliency(dt, self.dn)
        self.s[~off] = float("inf")
        pin = torch.zeros(n, dtype=torch.bool)
        pin[list(pinned)] = True
        self.s[pin[:, None] & pin[None, :]] = float("inf")  # two pinned channels: neither can go
        self.pinned, self.alive = pin, torch.ones(n, dtype=torch.bool)

    @staticmethod
    def _max(d, off):
        m = d[off].max().item() if off.any() else 0.0
        return m if m > 0 else 1.0

    def _saliency(self, dt, dn):
        if not self.use_next:
            return dt.clone()
        if self.mode == "sum":
            return dt / self.scale[0] + dn / self.scale[1]
        return dt * dn

    def alpha(self, r: int, t: int) -> float:
        """How much of channel r's consumer weight its twin t takes over."""
        if self.compensate != "scaled":
            return 1.0
        norm = float(self.th[t].pow(2).sum())
        return max(0.0, float(self.th[r] @ self.th[t]) / norm) if norm > 0 else 0.0

    def run(self) -> list[tuple[int, int, float, float]]:
        steps = []
        n = self.s.shape[0]
        while int((self.alive & ~self.pinned).sum()) > 0 and int(self.alive.sum()) > 1:
            flat = int(torch.argmin(self.s))
            i, j = divmod(flat, n)
            value = self.s[i, j].item()
            if value == float("inf"):
                break
            r, t = self._pick(i, j)
            a = self.alpha(r, t) if self.compensate else 0.0
            steps.append((r, t, value, a))
            self.alive[r] = False
            self.s[r, :] = float("inf")
            self.s[:, r] = float("inf")
            if self.compensate:
                self._merge(r, t, a)
        return steps

    def _pick(self, i: int, j: int) -> tuple[int, int]:
        if self.pinned[i]:
            return j, i
        if self.pinned[j]:
            return i, j
        ni, nj = self.f[i].abs().sum().item(), self.f[j].abs().sum().item()
        return (i, j) if ni < nj or (ni == nj and i > j) else (j, i)

    def _merge(self, r: int, t: int, a: float = 1.0) -> None:
        self.f[t] += a * self.f[r]
        if not self.use_next:
            return
        d = distances(self.f[t:t + 1], self.f, self.metric)[0]
        self.dn[t, :], self.dn[:, t] = d, d
        row = self._saliency(self.dt[t], d)
        dead = ~self.alive | (self.pinned & self.pinned[t])
        row[dead] = float("inf")
        row[t] = float("inf")
        self.s[t, :], self.s[:, t] = row, row


class SimilarChannels(Criterion):
    """Similar Channel Pruning: data-free pairwise-similarity ranking with weight compensation.

    Lower score = removed earlier by the greedy loop. Options are listed in this module's
    docstring. With ``compensate`` (default) the plan carries ``plan.edits`` that fold each
    removed channel's consumer weights into its twin; ``fxprune.verify`` accounts for them.

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.Conv2d(6, 2, 1))
        >>> x = (torch.randn(1, 3, 8, 8),)
        >>> pruned = fxprune.transform(m, fxprune.Policy("scp", 0.5), x)
        >>> pruned.get_submodule("2").in_channels, fxprune.verify(pruned).ok
        (3, True)
    """

    name = "scp"
    defaults = {"target_metric": "l1", "next_metric": "l1", "target_only": False,
                "pair_saliency": "product", "compensate": "scaled", "fold_bn": True, "scp_score": "rank"}
    choices = {"target_metric": METRICS, "next_metric": METRICS, "target_only": (True, False),
               "pair_saliency": ("product", "sum"), "compensate": (True, False, "scaled"),
               "fold_bn": (True, False), "scp_score": ("rank", "saliency")}

    def steps(self, group, ctx) -> list[tuple[int, int, float, float]]:
        """The greedy removal order of ``group``: ``[(removed, twin, pair saliency, α), ...]``."""
        def run():
            o = {k: self.option(ctx, k) for k in self.defaults}
            th = theta(group, ctx, o["fold_bn"])
            dt = distances(th, th, o["target_metric"])
            greedy = _Greedy(dt, phi(group, ctx), group.pinned, o["next_metric"], o["pair_saliency"],
                             not o["target_only"], o["compensate"], th)
            return greedy.run()
        return cached(ctx, ("scp", group.id), run)

    def score(self, group, ctx) -> torch.Tensor:
        steps = self.steps(group, ctx)
        gone = [step[0] for step in steps]
        rest = [c for c in range(group.size) if c not in set(gone)]
        rest.sort(key=lambda c: (c in group.pinned, c))
        order = gone + rest
        scores = torch.empty(group.size, dtype=torch.float64)
        if self.option(ctx, "scp_score") == "rank":
            scores[order] = torch.arange(group.size, dtype=torch.float64)
            return scores
        value = float("-inf")
        for k, c in enumerate(order):
            s = steps[k][2] if k < len(steps) else (abs(value) * 2 + 1 if k else 0.0)
            value = s if s > value else torch.nextafter(torch.tensor(value), torch.tensor(float("inf"))).item()
            scores[c] = value
        return scores

    def edits(self, group, ctx) -> dict[str, torch.Tensor]:
        """Compensation: ``W_q[:, twin] += α·W_q[:, removed]`` in every consumer, in removal order."""
        if not self.option(ctx, "compensate"):
            return {}
        removed = set(group.removed)
        merges = [(r, t, a) for r, t, _, a in self.steps(group, ctx) if r in removed]
        out: dict[str, torch.Tensor] = {}
        for pm in group.consumers:
            w = out.get(pm.target)
            w = ctx.current(pm.target).detach().clone() if w is None else w
            slots: dict[int, list[int]] = {}
            for pos, ch in zip(pm.positions, pm.channels):
                slots.setdefault(ch, []).append(pos)
            view = w.movedim(pm.dim, 0)
            for r, t, alpha in merges:
                for a, b in zip(slots.get(r, []), slots.get(t, [])):
                    view[b] += alpha * view[a]
            out[pm.target] = w
        return out


scp = SimilarChannels()
