"""Latency-targeted pruning, confirmed by the harness: ``Policy(latency=t)`` on real models.

    python benchmarks/latency_target.py [--models resnet18 resnet50 mobilenet_v2] [--targets 0.5 0.6 0.7]
                                        [--size 224] [--threads 1] [--rounds 3] [--runs 20]

For every model and target: the latency lookup table of this device (``fxprune.latency_lut``,
built once and cached under ``$FXPRUNE_CACHE`` or ``~/.cache/fxprune``), then
``fxprune.bench.prune_to_latency``: prune with the table, time original and pruned side by side
(interleaved, median of ``--runs``), and while the measured fraction misses the target by more
than 5%, ask the table for ``asked * target / measured`` and prune again (at most ``--rounds``).
The table shows round 1 (the table alone: predicted against measured, the open-loop error) and
the final round (within 5%?). Writes benchmarks/results/latency_target.json.
Random-initialised torchvision weights; l1 criterion; ``round_to=8`` (``--round-to``); batch 1;
CPU unless ``--device cuda``.
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
from fxprune.bench import environment, prune_to_latency
from fxprune.latency_lut import LatencyTable

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "latency_target.json")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "mobilenet_v2"])
    ap.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.6, 0.7])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--round-to", type=int, default=8,
                    help="widths a multiple of N (fast kernels; 0: none); latency jumps at odd widths")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows, records = [], []
    for name in args.models:
        model = torchvision.models.get_model(name).eval()
        x = (torch.randn(1, 3, args.size, args.size),)
        started = time.perf_counter()
        table = LatencyTable.for_model(model, fxprune.Policy(device=args.device), x, threads=args.threads,
                                       progress=True)
        table_seconds = time.perf_counter() - started
        for target in args.targets:
            policy = fxprune.Policy(latency=target, device=args.device, round_to=args.round_to or None)
            pruned, history = prune_to_latency(model, policy, x, tolerance=args.tolerance, rounds=args.rounds,
                                               latency_table=table, runs=args.runs, threads=args.threads)
            first, last = history[0], min(history, key=lambda r: abs(r.error))
            ok = abs(last.error) <= args.tolerance
            rows.append([name, f"{target:.2f}", f"{first.predicted:.3f}", f"{first.measured:.3f}",
                         f"{first.error:+.1%}", len(history), f"{last.asked:.3f}", f"{last.measured:.3f}",
                         f"{last.error:+.1%}", "yes" if ok else "no",
                         f"{last.comparison.pruned_macs / last.comparison.original_macs:.3f}"])
            records.append({"model": name, "target": target, "table_seconds": round(table_seconds, 1),
                            "rounds": [r.to_dict() for r in history], "within_tolerance": ok,
                            "macs_kept": last.comparison.pruned_macs / last.comparison.original_macs,
                            "original_ms": last.comparison.original.median_ms,
                            "pruned_ms": last.comparison.pruned.median_ms})
            print(f"{name} target {target}: " + ", ".join(
                f"asked {r.asked:.3f} predicted {r.predicted:.3f} measured {r.measured:.3f}" for r in history),
                flush=True)
    headers = ["model", "target", "round 1 predicted", "round 1 measured", "round 1 error", "rounds",
               "final asked", "final measured", "final error", f"within {args.tolerance:.0%}", "MACs kept"]
    print(f"\nLatency-targeted pruning ({args.device}, {args.threads} thread(s), batch 1, "
          f"{args.size}x{args.size}, median of {args.runs} interleaved runs):")
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    doc = {"settings": vars(args), "environment": environment(), "records": records,
           "table": {"headers": headers, "rows": rows}}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2, default=str)
    print(f"wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
