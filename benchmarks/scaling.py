"""How fxprune's plan + apply time grows with the graph: time per FX node across model families.

    python benchmarks/scaling.py [--models resnet18 resnet152] [--size 224] [--repeats 3]

For ResNet-18/34/50/101/152 and DenseNet-121/169/201 at ratio 0.5 (``Policy(ratio=0.5)``):
nodes = ``len(plan.traced.graph.nodes)``, seconds of ``fxprune.plan`` + ``fxprune.apply`` (best
of N repeats; per stage, the best of each stage from ``plan.timings``, 'rewrite' being apply)
and their time per node. Per family, the largest over the smallest time per node (1.0 = time
grows linearly with the node count), and the time per node of the biggest model over the
smallest's. Prints tables and writes benchmarks/results/scaling.json.
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
from tqdm import tqdm

import fxprune

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scaling.json")
FAMILIES = {"resnet": ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"],
            "densenet": ["densenet121", "densenet169", "densenet201"]}
STAGES = ["trace", "shapes", "coupling", "importance", "select", "edits", "rewrite"]


def family(name: str) -> str:
    return next((f for f, names in FAMILIES.items() if name in names), name.rstrip("0123456789_"))


def once(model: torch.nn.Module, x: tuple) -> tuple[float, dict, object]:
    """One plan + apply: total seconds, seconds per stage, the plan."""
    start = time.perf_counter()
    plan = fxprune.plan(model, fxprune.Policy(ratio=0.5), x)
    planned = time.perf_counter()
    fxprune.apply(plan)
    end = time.perf_counter()
    stages = dict(plan.timings, rewrite=end - planned)
    return end - start, stages, plan


def warm_up() -> None:
    """Prune a tiny net first: lazy imports and first-call costs stay off the clock."""
    n = torch.nn
    fxprune.transform(n.Sequential(n.Conv2d(3, 8, 3), n.ReLU(), n.Conv2d(8, 8, 3)).eval(),
                      fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 16, 16),))


def measure(name: str, size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = (torch.randn(1, 3, size, size),)
    totals, stages = [], {}
    for _ in range(repeats):
        seconds, per_stage, plan = once(model, x)
        totals.append(seconds)
        for k, v in per_stage.items():
            stages[k] = min(v, stages.get(k, v))
        nodes, groups = len(plan.traced.graph.nodes), len(plan.groups)
        del plan
        gc.collect()
    del model
    gc.collect()
    best = min(totals)
    return {"model": name, "family": family(name), "nodes": nodes, "groups": groups, "total_s": best,
            "us_per_node": 1e6 * best / nodes, "stages_s": stages,
            "stages_us_per_node": {k: 1e6 * v / nodes for k, v in stages.items()}}


def family_ratios(rows: list[dict], floor_s: float = 1e-3) -> list[dict]:
    """Per family: largest / smallest time per node, in total and per stage (stages under
    ``floor_s`` in some model are left out: their ratio is timer noise), and the time per node of
    the model with the most nodes over the one with the fewest (below 1: sublinear growth)."""
    out = []
    for fam in dict.fromkeys(r["family"] for r in rows):
        members = sorted((r for r in rows if r["family"] == fam), key=lambda r: r["nodes"])
        if len(members) < 2:
            continue
        per_node = [r["us_per_node"] for r in members]
        entry = {"family": fam, "models": [r["model"] for r in members],
                 "nodes": [members[0]["nodes"], members[-1]["nodes"]],
                 "ratio": max(per_node) / min(per_node),
                 "largest_over_smallest_model": per_node[-1] / per_node[0],
                 "stages": {}}
        for k in STAGES:
            if all(r["stages_s"].get(k, 0) >= floor_s for r in members):
                vals = [r["stages_us_per_node"][k] for r in members]
                entry["stages"][k] = max(vals) / min(vals)
        out.append(entry)
    return out


def tables(rows: list[dict], fams: list[dict]) -> str:
    heads = ["model", "nodes", "groups", "plan+apply s", "us/node"] + [f"{k} us/node" for k in STAGES]
    body = [[r["model"], r["nodes"], r["groups"], f"{r['total_s']:.3f}", f"{r['us_per_node']:.0f}"]
            + [f"{r['stages_us_per_node'].get(k, 0):.0f}" for k in STAGES] for r in rows]
    parts = [tabulate(body, headers=heads)]
    if fams:
        body = [[f["family"], f"{f['nodes'][0]}-{f['nodes'][1]}", f"{f['ratio']:.2f}",
                 f"{f['largest_over_smallest_model']:.2f}"]
                + [f"{f['stages'][k]:.2f}" if k in f["stages"] else "" for k in STAGES] for f in fams]
        parts.append(tabulate(body, headers=["family", "nodes", "max/min us/node", "biggest/smallest model"]
                              + STAGES))
    return "\n\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=[m for names in FAMILIES.values() for m in names])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3, help="best of N")
    ap.add_argument("--json", default=OUT)
    args = ap.parse_args()
    warm_up()
    rows = [measure(m, args.size, args.repeats) for m in tqdm(args.models, desc="scaling", unit="model")]
    fams = family_ratios(rows)
    print(tables(rows, fams))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"size": args.size, "repeats": args.repeats, "torch": torch.__version__,
                   "rows": rows, "families": fams}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
