"""Does ``capture="auto"`` cost anything on models torch.fx traces? plan + apply with
``capture="fx"`` and ``capture="auto"`` side by side, alternating, in one process; and what the
export front end costs on the same models (``capture="export"``).

    python benchmarks/capture_overhead.py [--models resnet50 mobilenet_v3_large densenet121 vit_b_16]
                                          [--size 224] [--repeats 5] [--json PATH]

One thread; the first call of each mode is a warm-up off the clock; the median of ``--repeats``
is reported with the ratios auto/fx and export/fx. Writes benchmarks/results/capture_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import torch
import torchvision
from tabulate import tabulate

import fxprune

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "capture_overhead.json")
MODES = ("fx", "auto", "export")


def once(model: torch.nn.Module, x: tuple, mode: str) -> float:
    start = time.perf_counter()
    fxprune.apply(fxprune.plan(model, fxprune.Policy(ratio=0.5), x, capture=mode))
    return time.perf_counter() - start


def measure(name: str, size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = (torch.randn(1, 3, size, size),)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for mode in MODES:
        once(model, x, mode)  # warm-up
    for _ in range(repeats):
        for mode in MODES:
            times[mode].append(once(model, x, mode))
    med = {m: statistics.median(t) for m, t in times.items()}
    return {"model": name, "size": size, "median_s": med, "auto_over_fx": med["auto"] / med["fx"],
            "export_over_fx": med["export"] / med["fx"], "all_s": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v3_large", "densenet121", "vit_b_16"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows = [measure(name, args.size, args.repeats) for name in args.models]
    print(tabulate([[r["model"], *(f"{r['median_s'][m]:.2f}" for m in MODES), f"{r['auto_over_fx']:.2f}",
                     f"{r['export_over_fx']:.2f}"] for r in rows],
                   headers=["model", "fx s", "auto s", "export s", "auto/fx", "export/fx"]))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json + ".tmp", "w") as f:
        json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)
    os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
