"""A small Llama-style LM trained on real English text, pruned to half of its non-embedding
parameters by fxprune's criteria and by Torch-Pruning's LLM recipe: held-out perplexity after
pruning, after recalibration (where it applies) and after the same short fine-tune.

Data: the Debian ``fortunes`` package (``apt-get install -y fortunes``; ~2.5 MB of English under
/usr/share/games/fortunes), byte-level (vocabulary 256), every 10th fortune held out
(``llm_data.py``). Model: ``transformers.LlamaForCausalLM`` from a config: hidden 128, 4 layers,
4 attention heads / 2 key-value heads (head dim 32, RoPE), SwiGLU width 384, RMSNorm, tied
embeddings; trained with AdamW for ``--steps`` steps of ``--batch-size`` x ``--seq-len`` bytes
(cached under benchmarks/reproduce/.cache; ``llm_model.py``).

Budget: ``--target`` (0.5) of the non-embedding parameters kept (the tied 256 x hidden embedding
is not counted; where the hidden size is pruned it shrinks too, and both counts are reported).
fxprune runs ``Policy(importance=c, params=f)``, local scope (one ratio for every group: hidden
size, SwiGLU channels, key-value groups), ``f`` searched until the measured non-embedding fraction
is within 0.01 of ``--target``. ``sensitivity-consumer`` is ``sensitivity`` with
``sensitivity_terms="consumer"`` (its layer-wise Hessian has no rule for the embedding, the hidden
size group's producer). Structure variants ``<criterion>@heads-mlp`` (``structures={"hidden": 0.0}``:
whole kv groups and SwiGLU channels, the search setting their ratio) and ``<criterion>@hidden``
(``structures={"heads": 0.0, "kv-groups": 0.0, "mlp": 0.0}``: the hidden size only) fix which
structures are cut; the plain criteria let the policy cut every kind by one ratio. ``@mlp``
(heads and hidden size whole) and ``@qheads-mlp`` (``{"hidden": 0.0, "query-heads": 0.5}``: half
of each kv group's query heads, every kv head kept, the MLP width set by the budget) are what
Torch-Pruning's heads-mlp run does here and what its recipe asks for (below). Torch-Pruning
(``llm_tp.py``) runs its recipe with the width ratio picked so that its predicted non-embedding
fraction is ``--target`` and its head ratio the valid GQA multiple nearest that width ratio. As
published it never finishes on this model (an unbounded index shift through RoPE's
``rotate_half`` concat; ``tp-magnitude-noshim`` records it): ``tp-*`` run it with a shim that
spells that concat's dim positive. Its GQA head pruning then removes no head of this 4-query /
2-kv model (it refuses the only valid ratio, see ``llm_tp.py``), so ``tp-*`` equals
``tp-*-noattn`` (q/k/v ignored); ``tp-*@heads-mlp`` (o_proj, down_proj ignored: hidden size
whole; heads asked for, MLP width) and ``tp-*@hidden`` (q/k/v, gate/up ignored) are the
structure variants.
``fxprune.recalibrate`` only re-estimates BatchNorm statistics; Llama has RMSNorm and no biases,
so that stage is recorded as not applicable. Fine-tune: ``--ft-steps`` AdamW steps at
``--ft-lr`` (cosine to 10%), the same windows for every method of a seed; the dense model given
the same fine-tune is the control row. Seeds change the calibration and fine-tune windows; the
dense model is always the seed-0 one. Criteria that need data read ``--calib-batches`` training
batches (taylor: next-token cross-entropy as ``loss_fn``). ``--merge PATH`` adds methods to a
finished run with the same settings.

Usage:
    python benchmarks/reproduce/llm_perplexity.py        # the README figures (~35 min on 2 shared cores)
    python benchmarks/reproduce/llm_perplexity.py --methods sensitivity-consumer \
        --merge benchmarks/results/llm_perplexity.json    # an added row
    python benchmarks/reproduce/llm_perplexity.py --threads 1 --methods taylor@heads-mlp taylor@hidden \
        tp-taylor@heads-mlp tp-taylor@hidden --merge benchmarks/results/llm_perplexity.json
    python benchmarks/reproduce/llm_perplexity.py --fast           # seconds, for tests

Writes benchmarks/results/llm_perplexity.json (our model, our data: not a published LLM's numbers).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import fxprune  # noqa: E402
from benchmarks.reproduce.common import RESULTS_DIR, mean_std, set_threads, write_json  # noqa: E402
from benchmarks.reproduce.datasets import DatasetUnavailableError  # noqa: E402
from benchmarks.reproduce.llm_data import (FORTUNES_DIR, consecutive_windows, fortunes,  # noqa: E402
                                           random_windows, split_xy)
from benchmarks.reproduce.llm_model import (LlamaSettings, calibration_pairs, dense_model, lm_loss,  # noqa: E402
                                            param_counts, perplexity, train, widths)
from benchmarks.reproduce.llm_tp import TP_FINDINGS, choose_ratio, predicted_non_embedding, tp_prune  # noqa: E402
from benchmarks.reproduce.train_baselines import CACHE_DIR  # noqa: E402

FXPRUNE_METHODS = ("l1", "taylor", "sensitivity", "activation")
# Structure variants: suffix -> Policy(structures=...). With a params budget the named kinds keep
# their ratio and the search sets the others (fxprune.group_kinds): "@heads-mlp" prunes attention
# (whole kv groups: a key/value head with its query heads) and the SwiGLU width, never the hidden
# size; "@hidden" prunes only the hidden size (residual stream, embedding and norms with it).
# "@mlp" (heads and hidden size whole) is what Torch-Pruning's heads-mlp run does on this model
# (its head pruning refuses 4q/2kv, llm_tp.py); "@qheads-mlp" is what that recipe asks for: half
# of the query heads of every kv group ("query-heads": kv heads whole), the MLP width by the budget.
STRUCTURES = {"heads-mlp": {"hidden": 0.0},
              "hidden": {"heads": 0.0, "kv-groups": 0.0, "mlp": 0.0},
              "mlp": {"hidden": 0.0, "heads": 0.0, "kv-groups": 0.0},
              "qheads-mlp": {"hidden": 0.0, "query-heads": 0.5}}
# Criteria of the structure variants (sensitivity with consumer terms: the hidden size group's
# producer is the embedding, for which the layer-wise Hessian has no rule).
STRUCTURE_CRITERIA = {"l1": ("l1", {}), "taylor": ("taylor", {}),
                      "sensitivity-consumer": ("sensitivity", {"sensitivity_terms": "consumer"}),
                      "activation": ("activation", {})}
# Named variants of registered criteria: method name -> (criterion, importance options, structures).
VARIANTS = {"sensitivity-consumer": ("sensitivity", {"sensitivity_terms": "consumer"}, None),
            **{f"{name}@{suffix}": (criterion, options, structures)
               for suffix, structures in STRUCTURES.items()
               for name, (criterion, options) in STRUCTURE_CRITERIA.items()}}
# Settings that must agree for --merge to combine two runs.
SAME_RUN = ("target", "seeds", "hidden", "layers", "heads", "kv_heads", "intermediate", "seq_len", "batch_size",
            "steps", "lr", "ft_steps", "ft_lr", "calib_batches", "eval_batches")
# Torch-Pruning: name -> (importance, attention heads pruned as the recipe does, structure, RoPE shim);
# structures and the shim: llm_tp.py. "-noshim" is the recipe on the unmodified model (it does not
# finish: recorded as skipped with the cause).
TP_METHODS = {"tp-magnitude": ("magnitude", True, "recipe", True), "tp-taylor": ("taylor", True, "recipe", True),
              "tp-magnitude-noattn": ("magnitude", False, "recipe", True),
              "tp-taylor-noattn": ("taylor", False, "recipe", True),
              **{f"tp-{imp}@{structure}": (imp, True, structure, True)
                 for structure in ("heads-mlp", "hidden") for imp in ("magnitude", "taylor")},
              "tp-magnitude-noshim": ("magnitude", True, "recipe", False)}
STAGES = ("pruned", "recalibrated", "finetuned")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(FXPRUNE_METHODS) + list(TP_METHODS),
                    help="fxprune criteria, " + ", ".join(VARIANTS) + " and/or " + ", ".join(TP_METHODS))
    ap.add_argument("--target", type=float, default=0.5, help="fraction of non-embedding parameters kept")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300, help="training steps of the dense model")
    ap.add_argument("--lr", type=float, default=3e-3, help="dense training learning rate (AdamW)")
    ap.add_argument("--ft-steps", type=int, default=40, help="fine-tune steps after pruning (every method)")
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    ap.add_argument("--calib-batches", type=int, default=4, help="training windows batches for data criteria")
    ap.add_argument("--eval-batches", type=int, default=12, help="held-out batches (batch-size x seq-len bytes each)")
    ap.add_argument("--tp-timeout", type=float, default=30, help="seconds allowed for one Torch-Pruning prune")
    ap.add_argument("--tp-head-ratio", default="snap", help="'snap', 'width' (= width ratio) or a number")
    ap.add_argument("--data-root", type=Path, default=FORTUNES_DIR)
    ap.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="dense checkpoint cache ('' : none)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "llm_perplexity.json")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default 2; 1 with --fast). On a loaded machine 1 is far faster: "
                         "4 training steps took 2.0 s with 1 thread and 23.8 s with 2 on 2 cores shared by 8 jobs")
    ap.add_argument("--merge", type=Path, default=None,
                    help="an earlier JSON of this script with the same settings: keep its records of the methods "
                         "not given here and its dense fine-tune controls, run only --methods")
    ap.add_argument("--fast", action="store_true",
                    help="tiny run for tests: hidden 32, 2 layers, 20 steps, 1 seed, no cache")
    args = ap.parse_args(argv)
    if args.fast:
        args.hidden, args.layers, args.intermediate, args.seq_len, args.batch_size = 32, 2, 64, 32, 4
        args.steps, args.ft_steps, args.calib_batches, args.eval_batches, args.seeds = 20, 5, 2, 4, 1
        args.cache_dir = None
    if args.threads is None:
        args.threads = 1 if args.fast else 2
    if args.cache_dir is not None and str(args.cache_dir) == "":
        args.cache_dir = None
    return args


def settings_of(args) -> LlamaSettings:
    return LlamaSettings(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                         intermediate=args.intermediate, seq_len=args.seq_len, batch_size=args.batch_size,
                         steps=args.steps, lr=args.lr)


def structure_of(method: str) -> str:
    """The structure variant of a method name (``"taylor@hidden"`` -> ``"hidden"``; ``""``: any mix).

    Example:
        >>> structure_of("taylor@heads-mlp"), structure_of("l1")
        ('heads-mlp', '')
    """
    return method.partition("@")[2]


def whole_model_fraction(dense: dict, target: float) -> float:
    """The fraction of all parameters that keeps ``target`` of the non-embedding ones."""
    return (dense["embedding"] + target * dense["non_embedding"]) / dense["total"]


def fx_prune(model, method: str, dense: dict, target: float, example, calibration, tries: int = 3,
             start: float | None = None):
    """fxprune at ``Policy(params=f)``, ``f`` first ``start`` (the fraction an earlier criterion
    needed: under local scope the widths do not depend on the criterion) or else the whole-model
    fraction that keeps ``target`` of the non-embedding parameters when the embedding is not pruned;
    when the measured non-embedding fraction misses ``target`` by more than 0.01 (the hidden size,
    and with it the embedding, is pruned too), ``f`` is corrected by the miss and the plan made again."""
    criterion, options, structures = VARIANTS.get(method, (method, {}, None))
    if start is not None:
        fraction = start
    elif structures is not None and "hidden" not in structures and "mlp" in structures:
        fraction = target  # only the hidden size: every parameter, embedding included, scales with it
    else:
        fraction = whole_model_fraction(dense, target)
    for attempt in range(1, tries + 1):
        policy = fxprune.Policy(importance=criterion, params=round(fraction, 6), structures=structures or ())
        pruned = fxprune.transform(model, policy, (example,), calibration=calibration, loss_fn=lm_loss,
                                   importance_options=options)
        kept = param_counts(pruned)["non_embedding"] / dense["non_embedding"]
        if abs(kept - target) <= 0.01 or attempt == tries:
            return pruned, {"policy_params": round(fraction, 6), "budget_attempts": attempt}
        fraction = min(1.0, max(0.01, fraction + (target - kept) * dense["non_embedding"] / dense["total"]))


def prune(model, method, args, data, dense, tp_cache) -> tuple[torch.nn.Module, dict]:
    """The pruned model and what to record about how it was made."""
    if method in TP_METHODS:
        s = settings_of(args)
        head = {"snap": "snap", "width": None}.get(args.tp_head_ratio, args.tp_head_ratio)
        importance, attention, structure, shim = TP_METHODS[method]
        if not attention:
            head = 0.0
        ratio, head_ratio = choose_ratio(s, args.target, head if head in ("snap", None) else float(head),
                                         structure=structure)
        info = {"tp_ratio": round(ratio, 4), "tp_head_ratio": head_ratio, "tp_attention_pruned": attention,
                "tp_structure": structure, "tp_rope_shim": shim,
                "tp_predicted_non_embedding_kept": predicted_non_embedding(s, ratio, head_ratio, structure)
                / predicted_non_embedding(s, 0.0, 0.0)}
        key = method if importance == "magnitude" else None  # data-free: the same model every seed
        if key is not None and key in tp_cache:
            return copy.deepcopy(tp_cache[key]), info
        pruned = tp_prune(model, data["example"][:1, :16], ratio, head_ratio, importance=importance,
                          calibration=data["calib"], attention=attention, structure=structure, rope_shim=shim,
                          timeout=args.tp_timeout)
        if key is not None:
            tp_cache[key] = copy.deepcopy(pruned)
        return pruned, info
    fractions = data.setdefault("fx_fraction", {})  # per structure variant: the criteria share widths
    pruned, info = fx_prune(model, method, dense, args.target, data["example"], data["calib"],
                            start=fractions.get(structure_of(method)))
    fractions[structure_of(method)] = info["policy_params"]
    check = fxprune.verify(pruned)
    info["verify"] = {"ok": bool(check.ok), "max_error": float(check.max_error), "exact": bool(check.exact)}
    return pruned, info


def has_recalibration_target(model) -> bool:
    """True when ``fxprune.recalibrate`` would change something (a BatchNorm with running stats)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
               for m in model.modules())


def run_one(model, method, seed, args, data, dense, tp_cache) -> dict:
    started = time.perf_counter()
    pruned, info = prune(model, method, args, data, dense, tp_cache)
    counts = param_counts(pruned)
    record = {"method": method, "seed": seed, **info,
              "non_embedding_kept": counts["non_embedding"] / dense["non_embedding"],
              "total_kept": counts["total"] / dense["total"], "params": counts, "widths": widths(pruned),
              "prune_seconds": round(time.perf_counter() - started, 1)}
    record["pruned"] = perplexity(pruned, data["eval"])["ppl"]
    if has_recalibration_target(pruned):
        fxprune.recalibrate(pruned, [x for x, _ in data["calib"]])
        record["recalibrated"] = perplexity(pruned, data["eval"])["ppl"]
    else:
        record["recalibrated"] = None
    train(pruned, data["train"], args.ft_steps, args.batch_size, args.seq_len, lr=args.ft_lr,
          seed=3000 + seed, weight_decay=0.0)  # same windows for every method of a seed
    record["finetuned"] = perplexity(pruned, data["eval"])["ppl"]
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def run_all(model, args, corpus, data: dict, dense: dict, controls: list | None = None) -> tuple[list, list, list]:
    """Every seed and method: ``(records, skipped, dense fine-tune controls)``; ``controls`` given
    (from ``--merge``) are reused instead of fine-tuning the dense model again."""
    records, skipped, tp_cache, tp_errors = [], [], {}, {}
    reuse, controls = controls is not None, list(controls or [])
    for seed in range(args.seeds):
        data["calib"] = calibration_pairs(corpus.train, args.calib_batches, args.batch_size, args.seq_len,
                                          seed=1000 + seed)
        if not reuse:
            control = copy.deepcopy(model)  # the dense model given the same fine-tune: what it alone buys
            train(control, corpus.train, args.ft_steps, args.batch_size, args.seq_len, lr=args.ft_lr,
                  seed=3000 + seed, weight_decay=0.0)
            controls.append({"seed": seed, "finetuned": perplexity(control, data["eval"])["ppl"]})
            del control
        for method in args.methods:
            if method in tp_errors:  # Torch-Pruning's failures here are structural, not data dependent
                skipped.append({"method": method, "seed": seed, "reason": "as seed 0: " + tp_errors[method]})
                continue
            try:
                record = run_one(model, method, seed, args, data, dense, tp_cache)
            except Exception as error:  # a method that fails is reported, not fatal
                reason = f"{type(error).__name__}: {error}"[:400]
                if method in TP_METHODS:
                    tp_errors[method] = reason
                skipped.append({"method": method, "seed": seed, "reason": reason})
                print(f"  seed {seed} {method:13s} FAILED: {reason}", flush=True)
                continue
            records.append(record)
            write_json(args.out.with_suffix(".partial.json"),  # survives a stop; the results file stays whole
                       {"partial": True, "records": records, "skipped": skipped})
            print(f"  seed {seed} {method:13s} non-emb kept {record['non_embedding_kept']:.3f} "
                  f"(total {record['total_kept']:.3f})  ppl pruned {record['pruned']:.3f}  "
                  f"finetuned {record['finetuned']:.3f}  ({record['seconds']:.0f} s)", flush=True)
    return records, skipped, controls


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    set_threads(args.threads)
    started = time.perf_counter()
    corpus = fortunes(args.data_root)
    s = settings_of(args)
    print(f"{corpus.source}: {len(corpus.train)} training bytes ({corpus.entries[0]} fortunes), "
          f"{len(corpus.held_out)} held-out bytes ({corpus.entries[1]} fortunes)", flush=True)
    model, source = dense_model(s, corpus.train, args.cache_dir, log_every=0 if args.fast else 50)
    dense = param_counts(model)
    data = {"train": corpus.train,
            "eval": consecutive_windows(corpus.held_out, args.eval_batches, args.batch_size, args.seq_len),
            "example": split_xy(random_windows(corpus.train, 1, args.batch_size, args.seq_len, seed=999)[0])[0]}
    dense_eval = perplexity(model, data["eval"])
    print(f"dense Llama ({source['source']}): {dense['total']} parameters ({dense['non_embedding']} non-embedding); "
          f"held-out perplexity {dense_eval['ppl']:.3f} ({dense_eval['bits_per_byte']:.3f} bits/byte) on "
          f"{dense_eval['tokens']} bytes", flush=True)
    prior = merged_from(args)
    if prior:  # start from the budget fractions the earlier run's fxprune criteria needed
        data["fx_fraction"] = {}
        for r in prior["records"]:
            if "policy_params" in r:
                data["fx_fraction"].setdefault(structure_of(r["method"]), r["policy_params"])
    records, skipped, controls = run_all(model, args, corpus, data, dense, prior and prior["dense_finetune_control"])
    if prior:
        records = [r for r in prior["records"] if r["method"] not in args.methods] + records
        skipped = [k for k in prior["skipped"] if k["method"] not in args.methods] + skipped
    wall = time.perf_counter() - started
    headers, rows = table(records, dense_eval["ppl"], controls, args)
    verdict = compare(records)
    verdict["by_structure"] = {name: compare(records, name) for name in STRUCTURES}
    for name, part in verdict["by_structure"].items():
        verdict["lines"] += [f"@{name}: {line}" for line in part["lines"]]
    print(f"\nHeld-out perplexity (bytes; {dense_eval['tokens']} held-out bytes), mean±std over {args.seeds} "
          f"seed(s); budget {args.target:.0%} of non-embedding parameters; fine-tune {args.ft_steps} AdamW steps, "
          f"lr {args.ft_lr}:")
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    for item in skipped:
        print(f"skipped {item['method']} (seed {item['seed']}): {item['reason']}")
    for line in verdict["lines"]:
        print(line)
    payload = dict(describe(args, s, corpus, dense, dense_eval, source), dense_finetune_control=controls,
                   table={"headers": headers, "rows": rows}, verdict=verdict, skipped=skipped,
                   wall_seconds=round(wall, 1), records=records)
    write_json(args.out, payload)
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(f"wrote {args.out} ({wall:.0f} s)")
    return payload


def merged_from(args) -> dict | None:
    """The earlier run named by ``--merge`` (None without it); its settings must match this run's."""
    if args.merge is None:
        return None
    prior = json.loads(Path(args.merge).read_text())
    if prior.get("partial"):
        raise SystemExit(f"--merge: {args.merge} is an unfinished run")
    differ = [k for k in SAME_RUN if prior["settings"].get(k) != getattr(args, k)]
    if differ:
        raise SystemExit(f"--merge: {args.merge} was run with other settings: {', '.join(differ)}")
    return prior


def describe(args, s, corpus, dense: dict, dense_eval: dict, source: dict) -> dict:
    """The run's setting for the JSON: model, data, dense figures, versions, source tree."""
    return {"model": "LlamaForCausalLM (transformers " + _version("transformers") + ")",
            "architecture": dataclasses.asdict(s), "data": corpus.source,
            "bytes": {"train": len(corpus.train), "held_out": len(corpus.held_out), "evaluated": dense_eval["tokens"]},
            "dense": {"params": dense, "ppl": dense_eval["ppl"], "bits_per_byte": dense_eval["bits_per_byte"],
                      **source},
            "torch_pruning_findings": TP_FINDINGS,
            "recalibration": "not applicable: fxprune.recalibrate re-estimates BatchNorm statistics; this "
                             "Llama has RMSNorm (no running statistics) and no biases",
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "versions": {"torch": torch.__version__, "torch_pruning": _version("torch-pruning"),
                         "transformers": _version("transformers")},
            "source_tree": _source_tree()}


def _source_tree() -> dict:
    """The commit the run used and fxprune files that differed from it (results depend on both)."""
    root = Path(__file__).resolve().parents[2]

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD")
    if not commit:  # an exported snapshot (git archive): say which commit it was taken from
        return {"commit": os.environ.get("FXPRUNE_SOURCE_COMMIT", "unknown"), "snapshot": str(root)}
    changed = [line[3:] for line in git("status", "--porcelain", "--", "fxprune", "passes").splitlines()]
    return {"commit": commit, "uncommitted_library_files": changed}


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _cell(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean, std = mean_std(values)
    return f"{mean:.3f}±{std:.3f}" if len(values) > 1 else f"{mean:.3f}"


def table(records: list[dict], dense_ppl: float, controls: list[dict], args) -> tuple[list[str], list[list]]:
    headers = ["method", "non-emb kept", "total kept", "ppl pruned", "+recal", f"+ft {args.ft_steps} steps"]
    rows = [["dense (unpruned)", "1.000", "1.000", f"{dense_ppl:.3f}", "n/a",
             _cell([c["finetuned"] for c in controls])]]
    methods = sorted({r["method"] for r in records}, key=lambda m: _mean(records, m, "finetuned"))
    for method in methods:
        runs = [r for r in records if r["method"] == method]
        rows.append([method, _cell([r["non_embedding_kept"] for r in runs]), _cell([r["total_kept"] for r in runs]),
                     *(_cell([r[stage] for r in runs]) for stage in STAGES)])
    return headers, rows


def _mean(records: list[dict], method: str, stage: str) -> float:
    values = [r[stage] for r in records if r["method"] == method and r[stage] is not None]
    return mean_std(values)[0] if values else float("inf")


def compare(records: list[dict], structure: str | None = None) -> dict:
    """Per stage: fxprune's best criterion against Torch-Pruning's best variant (lower perplexity wins);
    ``structure`` (``"heads-mlp"``, ``"hidden"``) compares only the methods of that structure variant."""
    lines, stages = [], {}
    if structure is not None:
        records = [r for r in records if structure_of(r["method"]) == structure]
    fx = sorted({r["method"] for r in records if r["method"] not in TP_METHODS})
    tp = sorted({r["method"] for r in records if r["method"] in TP_METHODS})
    if not fx or not tp:
        return {"stages": {}, "lines": ["no comparison: fxprune or Torch-Pruning has no result"],
                "fxprune_beats_tp_every_stage": None}
    for stage in STAGES:
        if all(r[stage] is None for r in records):
            stages[stage] = {"applicable": False}
            continue
        best_fx = min(fx, key=lambda m: _mean(records, m, stage))
        best_tp = min(tp, key=lambda m: _mean(records, m, stage))
        spread = {m: mean_std([r[stage] for r in records if r["method"] == m]) for m in (best_fx, best_tp)}
        kept = {m: mean_std([r["non_embedding_kept"] for r in records if r["method"] == m])[0] for m in (best_fx, best_tp)}
        gap = spread[best_tp][0] - spread[best_fx][0]
        stages[stage] = {"fxprune_best": best_fx, "fxprune_ppl": spread[best_fx][0], "fxprune_std": spread[best_fx][1],
                         "tp_best": best_tp, "tp_ppl": spread[best_tp][0], "tp_std": spread[best_tp][1],
                         "non_embedding_kept": kept, "fxprune_better": gap > 0,
                         "beyond_seed_spread": abs(gap) > spread[best_fx][1] + spread[best_tp][1]}
        lines.append(f"{stage}: fxprune best {best_fx} {spread[best_fx][0]:.3f} vs Torch-Pruning best {best_tp} "
                     f"{spread[best_tp][0]:.3f} (non-emb kept {kept[best_fx]:.3f} vs {kept[best_tp]:.3f}): "
                     f"{'fxprune' if gap > 0 else 'Torch-Pruning'} lower by {abs(gap):.3f}"
                     f"{'' if stages[stage]['beyond_seed_spread'] else ' (within the seed spread)'}")
    applicable = [v for v in stages.values() if v.get("applicable", True)]
    every = all(v["fxprune_better"] for v in applicable)
    lines.append(f"fxprune's best criterion beats Torch-Pruning's at every applicable stage: {'yes' if every else 'no'}")
    return {"stages": stages, "lines": lines, "fxprune_beats_tp_every_stage": every}


if __name__ == "__main__":
    try:
        main()
    except DatasetUnavailableError as missing:  # say what to install, without a traceback
        sys.exit(f"error: {missing}")
