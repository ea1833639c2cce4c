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

Measured here (torch 2.14.1, transformers 5.25, torch-pruning 1.6.1), and what we do about it:

1. **The recipe as written never finishes** (a true infinite loop, not a slow search).
   ``BasePruner.__init__`` builds every group (``DependencyGraph.get_all_groups``); the group rooted
   at a ``q_proj``/``k_proj``/``v_proj`` output never closes. Cause: RoPE's ``rotate_half``
   (``torch.cat((-x2, x1), dim=-1)`` on the 4-D ``(batch, heads, seq, head_dim)`` tensor): torch
   saves ``dim=-1`` in ``CatBackward0._saved_dim`` as 2**64 - 1, which passes Torch-Pruning's
   "concat on another dimension" test (``_saved_dim != 1 and _saved_dim < MAX_VALID_DIM``) in
   ``update_concat_index_mapping``, so the concat gets the index mapping of a feature-dim concat
   with offsets from the wrong axis (the sequence length: ``[0, 16, 32]`` for a 16-token example),
   while the two slices of the last dim (``_saved_dim == 3``) get none. The cycle
   ``k -> slice -> neg -> cat -> * sin -> + <- k * cos`` then shifts every channel index by the
   offset on each pass and nothing bounds it to the tensor's width: instrumented on a 1-layer
   hidden-32 copy, every one of 11,000 ``Group.add_dep`` calls in 90 s added a new
   ``(node, indices)`` state, the indices of a 32-wide ``q_proj`` growing 256, 528, 800, ... -
   so ``_fix_dependency_graph_non_recursive``'s visited check (exact index lists) never stops it.
   ``dump_traceback_later`` on the real model after 20, 40, ... 300 s: always inside
   ``get_all_groups -> get_pruning_group -> _fix_dependency_graph_non_recursive`` (``add_dep`` /
   ``has_pruning_op``, the latter O(group size) so each pass also gets slower).
   **Shim** (``rope_cat_dim_shim``, on by default): while Torch-Pruning traces, Llama's
   ``rotate_half`` is replaced by the same computation with the concat dim spelled positive
   (``x.dim() - 1``); Torch-Pruning's own rule then sees a concat off the feature dim and maps no
   index, the groups close (the whole model's groups in seconds) and the recipe runs. Heads are
   removed whole (``prune_head_dims=False``), so RoPE's within-head rotation needs no mapping.
2. **Its GQA head pruning cannot remove heads from a 4-query / 2-key-value model.** The recipe
   prunes query heads only (each kv group loses ``ceil(ceil(head_ratio * heads) / kv_heads)``
   query heads; ``k_proj``/``v_proj`` stay whole: the published Qwen2/Llama-3 outputs keep every kv
   head). The only non-zero ratio that keeps a whole number of query heads per kv head here, 0.5,
   leaves 2 query heads for 2 kv heads; ``BasePruner._prune`` updates ``num_heads[q_proj]`` to 2
   *before* its GQA test, which then finds q and k/v head counts equal, keeps the k/v indices in the
   group, and ``check_pruning_group`` refuses the group (``k_proj``/``v_proj`` would lose all of
   their 64 channels): no head is removed and nothing is reported. The same code removes query
   heads on an 8-query / 2-kv copy (8 -> 4, kv kept), so it is the head counts, not the shim.
   :func:`predicted_non_embedding` models exactly this (``tp_kept_heads``), so the width ratio is
   solved for what Torch-Pruning does, and the run records the measured widths.

3. **Pruning the hidden size changes what RMSNorm computes.** Torch-Pruning narrows each
   ``LlamaRMSNorm`` weight and leaves its ``mean(x**2, -1)`` over the channels kept, so every norm's
   output is ``sqrt(kept / width)`` (0.71 at 64 of 128) of the model with those channels zeroed;
   fxprune rewrites the mean's divisor (``mean * kept / width``) and stays exact under its mask
   oracle. The hidden-size rows start from this offset (``tp-*@hidden``, ``tp-*``).

Structures (``structure=``): ``"recipe"`` is the script's configuration (hidden size, MLP width and
heads by one ratio); ``"heads-mlp"`` adds every ``o_proj`` and ``down_proj`` to ``ignored_layers``
(no group is rooted at the residual stream's writers, so the hidden size stays whole) and prunes
query heads by ``head_ratio`` and the MLP width by ``ratio``; ``"hidden"`` ignores ``q_proj``,
``k_proj``, ``v_proj``, ``gate_proj`` and ``up_proj`` (heads and MLP whole; only the hidden size,
with the embedding and norms, by ``ratio``). ``attention=False`` (the earlier workaround, kept as
``tp-*-noattn``) ignores q/k/v: the hidden size and MLP width are pruned, no head is.

Example:
    >>> from benchmarks.reproduce.llm_model import LlamaSettings, build_llama
    >>> s = LlamaSettings(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64)
    >>> predicted_non_embedding(s, 0.0, 0.0) == param_counts(build_llama(s))["non_embedding"]
    True
"""
from __future__ import annotations

import contextlib
import copy
import math
import signal
from typing import Callable

import torch

from benchmarks.reproduce.llm_model import LlamaSettings, lm_loss, param_counts  # noqa: F401

ROUND_TO = 4
# What the module docstring explains, short, for the results JSON.
TP_FINDINGS = {
    "recipe_hang": "infinite loop, not a slow search: DependencyGraph.get_pruning_group rooted at q_proj/k_proj/"
                   "v_proj never closes. RoPE rotate_half's torch.cat(dim=-1) on the 4-D head tensor is saved by "
                   "torch as CatBackward0._saved_dim = 2**64-1, which passes update_concat_index_mapping's "
                   "'other dimension' test (_saved_dim != 1 and < MAX_VALID_DIM), so the concat gets feature-dim "
                   "offsets taken from the sequence axis while the two last-dim slices get none; each pass of "
                   "the cycle k -> slice -> neg -> cat -> *sin -> + <- k*cos shifts every index by the offset, "
                   "unbounded (indices 256, 528, 800, ... on a 32-wide q_proj), so no (node, indices) state "
                   "repeats and _fix_dependency_graph_non_recursive never stops",
    "rope_shim": "rotate_half's concat spelled dim=x.dim()-1 while Torch-Pruning traces (same tensor): its own "
                 "rule maps no index through the concat, every group closes, the recipe runs",
    "gqa_heads": "the recipe prunes query heads only (each kv group alike; k_proj/v_proj whole). With 4 query / "
                 "2 kv heads the only valid non-zero head ratio (0.5) leaves 2 query heads = 2 kv heads: "
                 "BasePruner._prune lowers num_heads[q_proj] before its GQA test, which then sees no GQA, keeps "
                 "the k/v indices, and check_pruning_group refuses the group (k_proj/v_proj would lose all 64 "
                 "channels): no head is removed, silently; on 8 query / 2 kv heads the same code removes them",
    "rmsnorm": "hidden-size pruning leaves LlamaRMSNorm's mean over the kept channels: each norm's output is "
               "sqrt(kept/width) (0.71 at 64 of 128) of the masked model's; fxprune rewrites the divisor (exact)",
}


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


def tp_kept_heads(heads: int, kv_heads: int, head_ratio: float) -> tuple[int, int]:
    """``(query heads, kv heads)`` Torch-Pruning 1.6.1 keeps under local head pruning (see the module
    docstring, point 2): query heads leave every kv group alike, kv heads stay; when the query heads
    left would equal the kv heads of a GQA model its group check refuses the pruning (nothing goes).

    Example:
        >>> tp_kept_heads(8, 2, 0.5), tp_kept_heads(4, 2, 0.5), tp_kept_heads(4, 4, 0.5)
        ((4, 2), (4, 2), (2, 2))
    """
    if head_ratio <= 0:
        return heads, kv_heads
    removed = math.ceil(head_ratio * heads)
    if heads == kv_heads:
        return heads - removed, kv_heads - removed
    kept = heads - math.ceil(removed / kv_heads) * kv_heads
    if kept == kv_heads or kept <= 0:
        return heads, kv_heads
    return kept, kv_heads


STRUCTURES = ("recipe", "heads-mlp", "hidden")


def predicted_non_embedding(s: LlamaSettings, ratio: float, head_ratio: float, structure: str = "recipe") -> int:
    """Non-embedding parameters after the recipe at ``ratio`` / ``head_ratio`` (used to pick the ratio;
    the run reports the measured count). ``attention=False`` is ``head_ratio=0``."""
    d = s.hidden // s.heads
    h = s.hidden if structure == "heads-mlp" else _kept(s.hidden, ratio)
    i = s.intermediate if structure == "hidden" else _kept(s.intermediate, ratio)
    q_heads, kv_heads = tp_kept_heads(s.heads, s.kv_heads, 0.0 if structure == "hidden" else head_ratio)
    q, kv = q_heads * d, kv_heads * d
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    return s.layers * per_layer + h


def valid_head_ratios(s: LlamaSettings) -> list[float]:
    """Head ratios that keep a whole number of query heads per key-value head."""
    step = s.kv_heads / s.heads
    return [k * step for k in range(int(round(1 / step)))]


def choose_ratio(s: LlamaSettings, target: float, head_ratio: str | float | None = "snap",
                 steps: int = 40, structure: str = "recipe") -> tuple[float, float]:
    """``(pruning_ratio, head_pruning_ratio)`` whose predicted non-embedding fraction is nearest ``target``.

    ``head_ratio``: a number (fixed), ``None`` (equal to the width ratio, the script's choice) or
    ``"snap"`` (the valid GQA multiple nearest the width ratio). ``structure``: see the module
    docstring (``"hidden"`` prunes no head: its head ratio is 0).

    Example:
        >>> s = LlamaSettings()
        >>> r, h = choose_ratio(s, 0.5, structure="hidden")   # hidden 128 -> 64 halves every weight
        >>> _kept(s.hidden, r), h
        (64, 0.0)
    """
    dense = predicted_non_embedding(s, 0.0, 0.0)
    if structure == "hidden":
        head_ratio = 0.0

    def bisect(head: Callable[[float], float]) -> float:
        lo, hi, best = 0.0, 0.95, (0.0, float("inf"))
        for _ in range(steps):
            r = (lo + hi) / 2
            kept = predicted_non_embedding(s, r, head(r), structure) / dense
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
        err = abs(predicted_non_embedding(s, r, hr, structure) / dense - target)
        options.append((abs(r - hr) + 10 * err, r, hr))
    _, r, hr = min(options)
    return r, hr


@contextlib.contextmanager
def rope_cat_dim_shim(enabled: bool = True):
    """While active, transformers' Llama ``rotate_half`` concatenates on ``x.dim() - 1`` instead of
    ``-1`` (the same tensor): Torch-Pruning then leaves RoPE's concat without an index mapping and
    its dependency search closes (module docstring, point 1).

    Example:
        >>> import transformers.models.llama.modeling_llama as ml
        >>> x = torch.arange(8.0).view(1, 1, 2, 4)
        >>> with rope_cat_dim_shim():
        ...     shimmed = ml.rotate_half(x)
        >>> torch.equal(shimmed, ml.rotate_half(x))
        True
    """
    import transformers.models.llama.modeling_llama as ml
    if not enabled:
        yield
        return
    original = ml.rotate_half

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=x.dim() - 1)
    ml.rotate_half = rotate_half
    try:
        yield
    finally:
        ml.rotate_half = original


def tp_prune(model: torch.nn.Module, example: torch.Tensor, ratio: float, head_ratio: float, *,
             importance: str = "magnitude", calibration: list | None = None, attention: bool = True,
             structure: str = "recipe", rope_shim: bool = True, timeout: float | None = None) -> torch.nn.Module:
    """A pruned deep copy of ``model`` by the recipe; raises what Torch-Pruning raises (or a timeout).

    ``attention=False``: the earlier workaround (q/k/v ignored, no head pruning, ``head_ratio``
    unused). ``structure``: ``"recipe"``, ``"heads-mlp"`` or ``"hidden"`` (module docstring).
    ``rope_shim=False`` runs the recipe on the unmodified model (it does not finish: point 1)."""
    import torch_pruning as tp
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}; got {structure!r}")
    model = copy.deepcopy(model).eval()
    attn = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    mlps = [m for name, m in model.named_modules() if name.endswith("mlp")]
    config = model.config
    num_heads, ignored = {}, [model.lm_head]
    prune_heads = attention and structure != "hidden"
    for m in attn:
        if prune_heads:
            num_heads[m.q_proj] = config.num_attention_heads
            num_heads[m.k_proj] = config.num_key_value_heads
            num_heads[m.v_proj] = config.num_key_value_heads
        else:
            ignored += [m.q_proj, m.k_proj, m.v_proj]
        if structure == "heads-mlp":
            ignored.append(m.o_proj)  # the residual stream's writers: no hidden-size group
    for m in mlps:
        if structure == "heads-mlp":
            ignored.append(m.down_proj)
        elif structure == "hidden":
            ignored += [m.gate_proj, m.up_proj]  # no MLP-width group
    if importance == "magnitude":
        imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    elif importance == "taylor":
        imp = tp.importance.GroupTaylorImportance()
    else:
        raise ValueError(f"unknown Torch-Pruning importance {importance!r}")
    what = f"Torch-Pruning ({importance})" + ("" if rope_shim else
                                                " without the RoPE shim (dependency search through rotate_half's "
                                                "concat never closes: llm_tp.py point 1)")
    with time_limit(timeout, what), rope_cat_dim_shim(rope_shim):
        pruner = tp.pruner.BasePruner(
            model, example, importance=imp, global_pruning=False, output_transform=lambda o: o.logits,
            pruning_ratio=ratio, ignored_layers=ignored, num_heads=num_heads, prune_num_heads=prune_heads,
            prune_head_dims=False, head_pruning_ratio=head_ratio if prune_heads else 0.0, round_to=ROUND_TO)
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
