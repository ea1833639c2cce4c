"""A small Llama-style causal LM trained on CPU: config, training loop, perplexity, parameter counts.

The model is ``transformers.LlamaForCausalLM`` built from a config (no download): grouped-query
attention, RoPE, SwiGLU MLP, RMSNorm, tied input/output embeddings, byte vocabulary (256).
The dense model is trained once per setting and cached under ``benchmarks/reproduce/.cache``
(keyed by every setting that shapes it, as ``train_baselines`` does for the vision models).

Example:
    >>> model = build_llama(LlamaSettings(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64))
    >>> counts = param_counts(model)
    >>> counts["embedding"], counts["total"] == counts["embedding"] + counts["non_embedding"]
    (8192, True)
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.reproduce.llm_data import VOCAB_SIZE, random_windows, split_xy

EMBEDDING_NAMES = ("embed_tokens", "lm_head")


@dataclasses.dataclass(frozen=True)
class LlamaSettings:
    """Architecture and training recipe of the dense model (all of it goes into the cache key)."""
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 300
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.1
    seed: int = 0


def build_llama(s: LlamaSettings) -> torch.nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of settings ``s`` (seeded by ``s.seed``), eval mode."""
    import transformers as tr
    config = tr.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=s.hidden, intermediate_size=s.intermediate,
                            num_hidden_layers=s.layers, num_attention_heads=s.heads,
                            num_key_value_heads=s.kv_heads, max_position_embeddings=max(s.seq_len, 64),
                            tie_word_embeddings=True, use_cache=False, bos_token_id=None, eos_token_id=None,
                            pad_token_id=None)
    torch.manual_seed(s.seed)
    return tr.LlamaForCausalLM(config).eval()


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: a HF ``ModelOutput``, a dict, a tuple (first item) or a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict):
        return output["logits"]
    return output[0]


def lm_loss(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of ``output``'s logits against ``targets`` ``(B, T)``."""
    logits = logits_of(output)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def perplexity(model: torch.nn.Module, windows: list[torch.Tensor]) -> dict[str, float]:
    """Held-out ``{"nll", "ppl", "bits_per_byte", "tokens"}`` over ``(B, T + 1)`` windows (eval mode)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for window in windows:
            x, y = split_xy(window)
            total += float(lm_loss(model(x), y)) * y.numel()
            tokens += y.numel()
    model.train(was_training)
    nll = total / max(tokens, 1)
    return {"nll": nll, "ppl": math.exp(nll), "bits_per_byte": nll / math.log(2), "tokens": tokens}


def train(model: torch.nn.Module, stream: torch.Tensor, steps: int, batch_size: int, seq_len: int, *,
          lr: float, seed: int, warmup: int = 0, weight_decay: float = 0.0, clip: float = 1.0,
          log_every: int = 0) -> list[float]:
    """AdamW on random windows of ``stream`` (seeded): linear warm-up, cosine to 10% of ``lr``,
    gradient clipping; returns the training loss of every step. The model is left in eval mode."""
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    losses, started = [], time.perf_counter()
    for step, window in enumerate(random_windows(stream, steps, batch_size, seq_len, seed)):
        x, y = split_xy(window)
        loss = lm_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        losses.append(loss.detach().item())
        if log_every and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            print(f"    step {step + 1}/{steps}  loss {recent:.3f}  ({time.perf_counter() - started:.0f} s)", flush=True)
    model.eval()
    return losses


def param_counts(model: torch.nn.Module) -> dict[str, int]:
    """``{"total", "embedding", "non_embedding"}``: distinct parameter tensors (a tied embedding
    counts once); ``embedding`` is every parameter named ``embed_tokens`` or ``lm_head``."""
    seen: set[int] = set()
    total = embedding = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in seen:
            continue
        seen.add(key)
        total += p.numel()
        if any(part in name for part in EMBEDDING_NAMES):
            embedding += p.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def dense_model(s: LlamaSettings, stream: torch.Tensor, cache_dir: Path | None,
                log_every: int = 0) -> tuple[torch.nn.Module, dict]:
    """The trained dense model and how it came about (cached in ``cache_dir`` when given)."""
    key = dataclasses.asdict(s)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"llama_fortunes_h{s.hidden}_l{s.layers}_s{s.steps}_seed{s.seed}.pt"
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("settings") == key:
                model = build_llama(s)
                model.load_state_dict(saved["state_dict"])
                info = dict(saved["info"], source=f"cached checkpoint {path.name}")
                return model.eval(), info
    model = build_llama(s)
    started = time.perf_counter()
    losses = train(model, stream, s.steps, s.batch_size, s.seq_len, lr=s.lr, seed=s.seed, warmup=s.warmup,
                   weight_decay=s.weight_decay, log_every=log_every)
    info = {"train_seconds": round(time.perf_counter() - started, 1),
            "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
            "tokens_seen": s.steps * s.batch_size * s.seq_len}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"settings": key, "state_dict": model.state_dict(), "info": info}, path)
    return model, dict(info, source=f"trained now ({info['train_seconds']:.0f} s)"
                       + (f", cached as {path.name}" if path is not None else ""))


def calibration_pairs(stream: torch.Tensor, batches: int, batch_size: int, seq_len: int,
                      seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(inputs, targets), ...]`` random training windows for the criteria that need data."""
    return [split_xy(w) for w in random_windows(stream, batches, batch_size, seq_len, seed)]


def widths(model: torch.nn.Module) -> dict[str, list[int] | int]:
    """Per-layer kept widths read off parameter shapes: MLP channels, query and key-value outputs,
    and the hidden size (the embedding's width).

    Example:
        >>> widths(build_llama(LlamaSettings(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64)))
        {'hidden': 32, 'mlp': [64], 'q_out': [32], 'kv_out': [16]}
    """
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    out: dict = {"hidden": next(v[1] for k, v in shapes.items() if "embed_tokens" in k),
                 "mlp": [], "q_out": [], "kv_out": []}
    for name, shape in shapes.items():
        for part, key in (("mlp.gate_proj.weight", "mlp"), ("self_attn.q_proj.weight", "q_out"),
                          ("self_attn.k_proj.weight", "kv_out")):
            if name.endswith(part):
                out[key].append(shape[0])
    return out
