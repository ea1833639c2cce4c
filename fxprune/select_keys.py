"""Cross-group comparability for global ranking: score normalisations and cost weights."""
from __future__ import annotations

import torch


def normalised(s: torch.Tensor, how: str) -> torch.Tensor:
    """Scores of one group made comparable with other groups'.

    ``mean``: s / mean(s); ``max``: s / max(s); ``lamp``: s_i^2 / sum of s_j^2 over channels with
    s_j >= s_i (Lee et al. 2021, applied to channel scores); ``none``: unchanged.

    Example:
        >>> normalised(torch.tensor([1.0, 3.0]), "mean").tolist()
        [0.5, 1.5]
        >>> normalised(torch.tensor([1.0, 3.0]), "lamp").tolist()
        [0.1, 1.0]
    """
    s = s.to(torch.float64)
    if how == "none":
        return s
    if how == "mean":
        m = s.abs().mean()
        return s / m if m > 0 else s
    if how == "max":
        m = s.abs().max()
        return s / m if m > 0 else s
    if how == "lamp":
        sq = s ** 2
        order = torch.argsort(sq, stable=True)
        suffix = torch.flip(torch.cumsum(torch.flip(sq[order], [0]), 0), [0])
        out = torch.empty_like(sq)
        out[order] = sq[order] / suffix.clamp(min=1e-300)
        return out
    raise ValueError(f"unknown normalisation {how!r}")


def group_weights(groups: list, cost) -> dict[int, float]:
    """MACs one channel of each group costs, divided by the mean over groups (cost-aware allocation).

    Example:
        >>> group_weights([], None)
        {}
    """
    if cost is None or not groups:
        return {}
    per_channel = {}
    for g in groups:
        macs = 0.0
        for pm in g.params:
            size = next(s for d, s, _ in cost.sliced[pm.target] if d == pm.dim)
            macs += cost.macs_of.get(pm.target, 0) * len(pm.positions) / size
        per_channel[g.id] = macs / g.size
    mean = sum(per_channel.values()) / len(per_channel)
    if mean <= 0:
        return {gid: 1.0 for gid in per_channel}
    return {gid: max(v / mean, 1e-6) for gid, v in per_channel.items()}
