"""Attention heads in vision transformers: fxprune beside Torch-Pruning at l1, ratio 0.5.

For torchvision's ViT (a small ``VisionTransformer``), ``swin_t`` and ``maxvit_t`` and timm's
``vit_tiny_patch16_224``, ``deit_tiny_patch16_224`` and ``swin_tiny_patch4_window7_224`` (random
weights, batch 1, small inputs where the model allows) it records:

- fxprune, ``Policy("l1", 0.5)``: the kinds of the pruned groups (head, hidden, mlp, channel), the
  parameter ratio, how many pruned groups are exact;
- the mask oracle: ``Policy(ratio=0.5, exact_only=True)`` in float64, ``fxprune.verify`` max error;
- Torch-Pruning's ``MetaPruner`` with ``MagnitudeImportance(p=1)``, ratio 0.5, the output layer
  ignored and its ViT recipe for heads (``num_heads`` per q/k/v projection,
  ``prune_num_heads=True``, ``prune_head_dims=False``, ``head_pruning_ratio=0.5``; head counts,
  ``head_dim`` and timm's ``attn_dim`` written back into the attention modules): parameter ratio, heads before/after, whether the
  pruned model still runs with outputs of the same shapes.

Each tool runs per model in a forked worker with a time and memory limit (a hang costs a row). Writes
``benchmarks/results/attention_models.json`` and prints a table::

    python benchmarks/attention_models.py [--only swin_t ...] [--timeout 600] [--max-rss-gb 4]
"""
from __future__ import annotations

import argparse
import collections
import copy
import importlib.util
import json
import os
import sys
import time
import warnings

# benchmarks/transformers.py would shadow the transformers package: this folder is not an import root
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch
import torch.nn as nn
from tabulate import tabulate

import fxprune
from fxprune.cost import count

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "attention_models.json")
RATIO = 0.5


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cov = _load("coverage")


def _torchvision(name: str):
    from torchvision import models
    if name == "vit_small":  # vit_b_16's structure at small dims
        model = models.VisionTransformer(image_size=64, patch_size=16, num_layers=4, num_heads=4, hidden_dim=128,
                                         mlp_dim=512, num_classes=1000)
        size = 64
    elif name == "swin_t":
        model, size = models.swin_t(), 112  # windows pad: any size works
    else:
        model, size = models.maxvit_t(), 224  # its grid/window partition is fixed at 224
    return model, size


def _timm(name: str):
    import timm
    extra = {} if "swin" in name else {"img_size": 64}  # Swin's stages need 224 with window 7
    model = timm.create_model(name, pretrained=False, **extra)
    return model, model.pretrained_cfg.get("input_size", (3, 224, 224))[-1] if "swin" in name else 64


MODELS = {"vit_small": ("torchvision", _torchvision), "swin_t": ("torchvision", _torchvision),
          "maxvit_t": ("torchvision", _torchvision), "vit_tiny_patch16_224": ("timm", _timm),
          "deit_tiny_patch16_224": ("timm", _timm), "swin_tiny_patch4_window7_224": ("timm", _timm)}


def build(name: str) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    model, size = MODELS[name][1](name)
    with torch.no_grad():  # torchvision zero-initialises classifier heads: the oracle would compare zeros
        for p in model.parameters():
            if p.dim() > 1 and not p.abs().max():
                p.normal_(0, 0.02)
    return model.eval(), (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def fx_row(name: str) -> dict:
    model, inputs = build(name)
    start = time.perf_counter()
    plan = fxprune.plan(model, fxprune.Policy("l1", RATIO), inputs)
    pruned = fxprune.apply(plan)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        ok = cov.leaves(pruned(*inputs))[0].shape == cov.leaves(model(*inputs))[0].shape
    removed = [g for g in plan.groups if g.removed]
    windowed = {f"{n}.qkv.weight" for n, m in model.named_modules() if type(m).__name__.startswith("ShiftedWindowAttention")}
    row = {"s": seconds, "ok": ok, "capture": plan.capture.get("frontend"),
           "params_ratio": count(pruned)["params"] / count(plan.traced)["params"],
           "pruned_kinds": dict(collections.Counter(g.kind for g in removed)),
           "kept_kinds": dict(collections.Counter(g.kind for g in plan.groups if not g.removed)),
           "pruned_groups": len(removed), "exact_groups": sum(1 for g in removed if g.exact),
           "blocked_ops": len(plan.blocked_ops),
           # torchvision Swin's head groups (the q/k/v rows of its wrapped attention call), which
           # fxprune.group_kinds does not read as heads yet
           "window_head_groups": sum(1 for g in removed if any(p.target in windowed and p.dim == 0 for p in g.params))}
    m64 = copy.deepcopy(model).double()
    x64 = tuple(x.double() for x in inputs)
    exact = fxprune.transform(m64, fxprune.Policy(ratio=RATIO, exact_only=True), x64,
                              capture=plan.capture.get("frontend", "auto"))
    check = fxprune.verify(exact, inputs=x64)
    xplan = exact.meta["fxprune"]
    row["oracle"] = {"ok": check.ok, "max_error": check.max_error, "compared": check.compared,
                     "pruned_kinds": dict(collections.Counter(g.kind for g in xplan.groups if g.removed)),
                     "params_ratio": count(exact)["params"] / count(xplan.traced)["params"]}
    return row


def _heads(model: nn.Module) -> dict:
    """``{module: (q/k/v projection, attribute holding the head count)}`` of every attention module."""
    out = {}
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            out[m] = (m, "num_heads")
            continue
        attr = next((a for a in ("num_heads", "n_heads") if isinstance(getattr(m, a, None), int)), None)
        qkv = next((getattr(m, q) for q in ("qkv", "to_qkv") if isinstance(getattr(m, q, None), nn.Linear)), None)
        if attr and qkv is not None:
            out[m] = (qkv, attr)
    return out


def _ignored(model: nn.Module, out) -> list:
    widths = {t.shape[-1] for t in cov.leaves(out) if t.dim() > 1}
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features in widths]


def tp_row(name: str) -> dict:
    import torch_pruning as tp
    model, inputs = build(name)
    with torch.no_grad():
        out = model(*inputs)
    work = copy.deepcopy(model)
    heads = _heads(work)
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(work, inputs[0], importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=RATIO, global_pruning=False, ignored_layers=_ignored(work, out),
                                  num_heads={qkv: getattr(m, attr) for m, (qkv, attr) in heads.items()},
                                  prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=RATIO,
                                  output_transform=cov.leaves)
    before = sum(getattr(m, attr) for m, (qkv, attr) in heads.items())
    pruner.step()
    for m, (qkv, attr) in heads.items():  # the recipe writes the head counts back
        setattr(m, attr, pruner.num_heads.get(qkv, getattr(m, attr)))
        if isinstance(getattr(m, "head_dim", None), int) and not isinstance(m, nn.MultiheadAttention):
            m.head_dim = qkv.out_features // (3 * getattr(m, attr))
            if isinstance(getattr(m, "attn_dim", None), int):  # timm's Attention reshapes heads to attn_dim
                m.attn_dim = getattr(m, attr) * m.head_dim
    seconds = time.perf_counter() - start
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    row = {"s": seconds, "params_ratio": params(work) / params(model), "heads_before": before,
           "heads_after": sum(getattr(m, attr) for m, (qkv, attr) in heads.items())}
    try:
        with torch.no_grad():
            row["ok"] = cov.leaves(work(*inputs))[0].shape == cov.leaves(out)[0].shape
    except Exception as err:  # the pruned model no longer runs
        row.update(ok=False, error=f"{type(err).__name__}: {err}"[:300])
    return row


def _worker(send, tool: str, name: str) -> None:
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        send(fx_row(name) if tool == "fx" else tp_row(name))


def measure(name: str, timeout: float, max_rss_gb: float) -> dict:
    row = {"library": MODELS[name][0], "model": name}
    for tool in ("fx", "tp"):
        result, error = cov.run_isolated(_worker, (tool, name), timeout, max_rss_gb)
        row[tool] = result if result is not None and not error else {"ok": False, "error": (error or "no result")[:400]}
    return row


def _kinds(kinds: dict) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "-"


def table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        fx, tp = r["fx"], r["tp"]
        oracle = fx.get("oracle", {})
        kinds = _kinds(fx.get("pruned_kinds", {})) if "error" not in fx else fx["error"][:60]
        if fx.get("window_head_groups"):
            kinds += f" ({fx['window_head_groups']} of them Swin heads)"
        lines.append([r["model"], kinds,
                      f"{fx['params_ratio']:.3f}" if "params_ratio" in fx else "-",
                      f"{fx.get('exact_groups', '-')}/{fx.get('pruned_groups', '-')}",
                      _kinds(oracle.get("pruned_kinds", {})),
                      f"{oracle['max_error']:.1e}" if "max_error" in oracle else "-",
                      f"{tp['params_ratio']:.3f}" if "params_ratio" in tp else "-",
                      f"{tp['heads_before']}->{tp['heads_after']}" if "heads_before" in tp else "-",
                      "ok" if tp.get("ok") else (tp.get("error", "fails") or "fails")[:60]])
    return tabulate(lines, headers=["model", "fxprune l1 0.5: pruned kinds", "params", "exact/pruned",
                                    "exact-only kinds", "oracle max err (f64)", "TP params", "TP heads", "TP runs"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", choices=sorted(MODELS))
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per model and tool")
    ap.add_argument("--max-rss-gb", type=float, default=4.0, help="memory per model and tool (0: no limit)")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    rows = []
    for name in args.only or list(MODELS):
        rows.append(measure(name, args.timeout, args.max_rss_gb))
        print(f"{name}: done", flush=True)
    if args.only and os.path.exists(args.out):  # re-measured rows replace theirs, the others stay
        with open(args.out) as f:
            old = json.load(f)["rows"]
        fresh = {r["model"]: r for r in rows}
        rows = [fresh.pop(r["model"], r) for r in old] + list(fresh.values())
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"ratio": RATIO, "torch_pruning": _tp_version(), "torch": torch.__version__, "rows": rows},
                  f, indent=1, default=str)
    print(table(rows))


def _tp_version() -> str:
    try:
        import torch_pruning as tp
        return tp.__version__
    except ImportError:  # pragma: no cover
        return "not installed"


if __name__ == "__main__":
    main()
