"""torchvision's transformers at ratio 0.5: does the transform succeed, what is pruned, exact or
approximate, and does the mask oracle hold with ``exact_only=True`` (float32, 1e-4)?

    python benchmarks/transformers.py [--models vit_b_16 swin_t maxvit_t] [--size 224]

torchvision zero-initialises ViT's classification head (and the class token); with such a head
every output is the bias and the oracle would compare constants, so parameters that are all
zero are redrawn from N(0, 0.02) first. Prints a table (tabulate) and writes
benchmarks/results/transformers.json (rows are written as they finish).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch
import torchvision
from tabulate import tabulate

import fxprune

MODELS = ["vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14", "swin_t", "swin_s", "swin_b",
          "swin_v2_t", "swin_v2_s", "swin_v2_b", "maxvit_t"]
OUT = os.path.join(os.path.dirname(__file__), "results", "transformers.json")


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.abs().max():
                p.normal_(0, 0.02)
    return model


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def measure(name: str, size: int) -> dict:
    model, x = build(name), (torch.randn(1, 3, size, size),)
    t0 = time.perf_counter()
    approx = fxprune.transform(model, fxprune.Policy(ratio=0.5), x)
    seconds = time.perf_counter() - t0
    plan = approx.meta["fxprune"]
    with torch.no_grad():
        same_shape = approx(*x).shape == model(*x).shape
    row = {
        "model": name, "nodes": len(plan.traced.graph.nodes), "groups": len(plan.groups),
        "pruned": sum(1 for g in plan.groups if g.removed),
        "exact": sum(1 for g in plan.groups if g.exact and not g.blocked),
        "approximate": sum(1 for g in plan.groups if not g.exact and not g.blocked),
        "blocked": sum(1 for g in plan.groups if g.blocked), "blocked_ops": len(plan.blocked_ops),
        "params_ratio": _params(approx) / _params(model), "plan_apply_s": seconds, "shape_ok": same_shape,
    }
    del approx, plan
    gc.collect()
    exact = fxprune.transform(model, fxprune.Policy(ratio=0.5, exact_only=True), x)
    check = fxprune.verify(exact, inputs=(torch.randn_like(x[0]),))
    row.update({"exact_params_ratio": _params(exact) / _params(model), "oracle_error": check.max_error,
                "oracle_ok": check.ok})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    rows = []
    for name in args.models:
        try:
            rows.append(measure(name, args.size))
        except Exception as err:  # a failure is a result of this benchmark, not a crash
            rows.append({"model": name, "error": f"{type(err).__name__}: {err}"[:300]})
        gc.collect()
        os.makedirs(os.path.dirname(OUT), exist_ok=True)
        with open(OUT, "w") as f:
            json.dump({"size": args.size, "rows": rows}, f, indent=1)
    keys = ["model", "nodes", "groups", "pruned", "exact", "approximate", "blocked", "params_ratio",
            "plan_apply_s", "exact_params_ratio", "oracle_error", "oracle_ok", "error"]
    table = [[r.get(k, "") if not isinstance(r.get(k), float) else f"{r[k]:.3g}" for k in keys] for r in rows]
    print(tabulate(table, headers=keys))


if __name__ == "__main__":
    main()
