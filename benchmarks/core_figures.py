"""Plan time, apply time, parameter and MAC ratios and the oracle's error at ratio 0.5.

    python benchmarks/core_figures.py [--models resnet50 densenet121 efficientnet_b0] [--size 224]

Prints a table (tabulate) and writes benchmarks/results/core_figures.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torchvision
from tabulate import tabulate

import fxprune
from fxprune.cost import count


def measure(name: str, size: int, ratio: float, repeats: int) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = (torch.randn(1, 3, size, size),)
    policy = fxprune.Policy(importance="l1", ratio=ratio)
    plan_s, apply_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        plan = fxprune.plan(model, policy, x)
        t1 = time.perf_counter()
        pruned = fxprune.apply(plan)
        t2 = time.perf_counter()
        plan_s.append(t1 - t0)
        apply_s.append(t2 - t1)
    before, after = count(plan.traced), count(pruned)
    check = fxprune.verify(pruned)
    return {
        "model": name, "nodes": len(plan.traced.graph.nodes), "groups": len(plan.groups),
        "plan_s": min(plan_s), "apply_s": min(apply_s),
        "stages_s": {k: round(v, 4) for k, v in plan.timings.items()},
        "params_ratio": after["params"] / before["params"], "macs_ratio": after["macs"] / before["macs"],
        "oracle_error": check.max_error, "oracle_ok": check.ok,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "densenet121", "efficientnet_b0"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3, help="best of N timings")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "core_figures.json"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = [measure(m, args.size, args.ratio, args.repeats) for m in args.models]
    print(tabulate([[r["model"], r["nodes"], r["groups"], f"{r['plan_s']:.3f}", f"{r['apply_s']:.3f}",
                     f"{r['params_ratio']:.3f}", f"{r['macs_ratio']:.3f}", f"{r['oracle_error']:.1e}"] for r in rows],
                   headers=["model", "nodes", "groups", "plan s", "apply s", "params kept", "MACs kept", "oracle err"]))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"size": args.size, "ratio": args.ratio, "torch": torch.__version__, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
