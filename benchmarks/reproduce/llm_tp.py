"""Torch-Pruning's LLM recipe (``examples/LLMs/prune_llm.py`` of VainF/Torch-Pruning v1.6.1),
applied to our small Llama: its settings re-stated, not its code copied.

The recipe: ``BasePruner`` (``MetaPruner``) with ``GroupMagnitudeImportance(p=2,
group_reduction="mean")``, ``global_pruning=False``, one ``pruning_ratio`` for the hidden size and
the MLP width, ``ignored_layers=[lm_head]``, ``num_heads`` given for ``q_proj`` (attention heads)
and ``k_proj``/``v_proj`` (key-value heads), ``prune_num_heads=True``, ``prune_head_dims=False``
(RoPE stays intact), ``head_pruning_ratio``, ``round_to=4``, ``output_transform=lambda o: o.logits``;
then the model's config and attention modules are updated to the new widths. Its README notes
that with grouped-query attention the head ratio must be a multiple of ``kv_heads / heads`` for
the result to stay a valid HF model; ``head_ratio="snap"`` (our default) takes the multiple
nearest the width ratio, ``head_ratio=None`` uses the width ratio itself, as the script does.

``taylor`` swaps in ``GroupTaylorImportance()`` (the recipe's documented alternative), with the
loss gradients of the calibration batches accumulated before the step.

Measured here (torch 2.14.1, transformers 5.25, torch-pruning 1.6.1): the recipe does not finish
on this Llama. ``BasePruner.__init__`` builds every group (``DependencyGraph.get_all_groups``),
and the groups rooted at ``q_proj``/``k_proj``/``v_proj`` output channels never close: the
search in ``_fix_dependency_graph_non_recursive`` runs on through RoPE's ``rotate_half``
(slice, negate, concatenate) without end, even with ``prune_head_dims=False`` (the groups are
built before that setting is read). Each call is therefore run under ``time_limit`` and the
timeout recorded. ``attention=False`` is the workaround we measure beside it: ``q_proj``,
``k_proj``, ``v_proj`` are added to ``ignored_layers`` (so no group is rooted at them and no head
is pruned); the hidden size (with it the embedding and every norm) and the MLP width are pruned
by the recipe's ratio, the attention projections lose input (and ``o_proj`` output) channels.

Example:
    >>> from benchmarks.reproduce.llm_model import LlamaSettings, build_llama
    >>> s = LlamaSettings(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64)
    >>> predicted_non_embedding(s, 0.0, 0.0) == param_counts(build_llama(s))["non_embedding"]
    True
"""
from __future__ import annotations

import contextlib
import copy
import signal
from typing import Callable

import torch

from benchmarks.reproduce.llm_model import LlamaSettings, lm_loss, param_counts  # noqa: F401

ROUND_TO = 4


class TorchPruningTimeout(RuntimeError):
    """Torch-Pruning did not finish within the time it was given."""


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str):
    """Raise ``TorchPruningTimeout`` in the main thread after ``seconds`` (None: no limit).

    Torch-Pruning's dependency analysis is pure Python, so the alarm interrupts it."""
    if not seconds:
        yield
        return

    def handler(signum, frame):
        raise TorchPruningTimeout(f"{what} did not finish within {seconds:.0f} s")
    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _kept(width: int, ratio: float, round_to: int = ROUND_TO) -> int:
    """Width Torch-Pruning keeps under local pruning: ``int(width * (1 - ratio))`` rounded down to a
    multiple of ``round_to`` (``BasePruner._prune`` and ``_round_to``)."""
    kept = int(width * (1 - ratio))
    if round_to and round_to > 1:
        kept -= kept % round_to
    return kept


def kept_heads(heads: int, head_ratio: float) -> int:
    return heads - int(heads * head_ratio)


def predicted_non_embedding(s: LlamaSettings, ratio: float, head_ratio: float) -> int:
    """Non-embedding parameters after the recipe at ``ratio`` / ``head_ratio`` (used to pick the ratio;
    the run reports the measured count). ``attention=False`` is ``head_ratio=0``."""
    d = s.hidden // s.heads
    h, i = _kept(s.hidden, ratio), _kept(s.intermediate, ratio)
    q, kv = kept_heads(s.heads, head_ratio) * d, kept_heads(s.kv_heads, head_ratio) * d
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    return s.layers * per_layer + h


def valid_head_ratios(s: LlamaSettings) -> list[float]:
    """Head ratios that keep a whole number of query heads per key-value head."""
    step = s.kv_heads / s.heads
    return [k * step for k in range(int(round(1 / step)))]


def choose_ratio(s: LlamaSettings, target: float, head_ratio: str | float | None = "snap",
                 steps: int = 40) -> tuple[float, float]:
    """``(pruning_ratio, head_pruning_ratio)`` whose predicted non-embedding fraction is nearest ``target``.

    ``head_ratio``: a number (fixed), ``None`` (equal to the width ratio, the script's choice) or
    ``"snap"`` (the valid GQA multiple nearest the width ratio).
    """
    dense = predicted_non_embedding(s, 0.0, 0.0)

    def bisect(head: Callable[[float], float]) -> float:
        lo, hi, best = 0.0, 0.95, (0.0, float("inf"))
        for _ in range(steps):
            r = (lo + hi) / 2
            kept = predicted_non_embedding(s, r, head(r)) / dense
            if abs(kept - target) < best[1]:
                best = (r, abs(kept - target))
            lo, hi = (r, hi) if kept > target else (lo, r)
        return best[0]

    if head_ratio is None:
        r = bisect(lambda r: r)
        return r, r
    if head_ratio != "snap":
        return bisect(lambda r: float(head_ratio)), float(head_ratio)
    options = []
    for hr in valid_head_ratios(s):
        r = bisect(lambda r, hr=hr: hr)
        err = abs(predicted_non_embedding(s, r, hr) / dense - target)
        options.append((abs(r - hr) + 10 * err, r, hr))
    _, r, hr = min(options)
    return r, hr


def tp_prune(model: torch.nn.Module, example: torch.Tensor, ratio: float, head_ratio: float, *,
             importance: str = "magnitude", calibration: list | None = None, attention: bool = True,
             timeout: float | None = None) -> torch.nn.Module:
    """A pruned deep copy of ``model`` by the recipe; raises what Torch-Pruning raises (or a timeout).

    ``attention=False``: the workaround above (q/k/v ignored, no head pruning, ``head_ratio`` unused)."""
    import torch_pruning as tp
    model = copy.deepcopy(model).eval()
    attn = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    config = model.config
    num_heads, ignored = {}, [model.lm_head]
    for m in attn:
        if attention:
            num_heads[m.q_proj] = config.num_attention_heads
            num_heads[m.k_proj] = config.num_key_value_heads
            num_heads[m.v_proj] = config.num_key_value_heads
        else:
            ignored += [m.q_proj, m.k_proj, m.v_proj]
    if importance == "magnitude":
        imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    elif importance == "taylor":
        imp = tp.importance.GroupTaylorImportance()
    else:
        raise ValueError(f"unknown Torch-Pruning importance {importance!r}")
    with time_limit(timeout, f"Torch-Pruning ({importance})"):
        pruner = tp.pruner.BasePruner(
            model, example, importance=imp, global_pruning=False, output_transform=lambda o: o.logits,
            pruning_ratio=ratio, ignored_layers=ignored, num_heads=num_heads, prune_num_heads=attention,
            prune_head_dims=False, head_pruning_ratio=head_ratio if attention else 0.0, round_to=ROUND_TO)
        if importance == "taylor":
            model.zero_grad(set_to_none=True)
            for x, y in calibration or []:
                lm_loss(model(x), y).backward()
        for group in pruner.step(interactive=True):
            group.prune()
    model.zero_grad(set_to_none=True)
    _update_config(model, attn)
    _retie(model)
    return model.eval()


def _retie(model: torch.nn.Module) -> None:
    """Torch-Pruning replaces the embedding's and ``lm_head``'s weight by two new, equal tensors,
    which unties them (the pruned model would carry the embedding twice); tie them again."""
    emb, head = model.get_input_embeddings(), model.lm_head
    if emb.weight is not head.weight and emb.weight.shape == head.weight.shape \
            and torch.equal(emb.weight, head.weight):
        head.weight = emb.weight


def _update_config(model: torch.nn.Module, attn: list) -> None:
    """The recipe's attribute updates, for transformers 5's Llama modules."""
    config = model.config
    config.hidden_size = model.lm_head.in_features
    for m in attn:
        heads = m.q_proj.out_features // m.head_dim
        kv_heads = m.k_proj.out_features // m.head_dim
        config.num_attention_heads, config.num_key_value_heads = heads, kv_heads
        m.num_key_value_groups = heads // max(kv_heads, 1)
    mlps = [m for name, m in model.named_modules() if name.endswith("mlp")]
    if mlps:
        config.intermediate_size = mlps[0].gate_proj.out_features
