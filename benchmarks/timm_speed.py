"""Analysis speed on timm: fxprune's plan+apply beside Torch-Pruning's prune, side by side.

    pip install -e ".[zoo,bench]"
    python benchmarks/timm_speed.py [--models resnet18 ... | --both] [--repeats 3] [--min-time 0]
                                    [--max-repeats 40] [--timeout 300]
                                    [--json benchmarks/results/timm_speed.json]

One timm model per family (the smallest of each, as ``zoo_coverage.py`` picks them), random
weights, eval mode, default input size. Per model, in one forked worker (one thread):

1. a warm-up call of each tool, off the clock (first-call costs: lazy imports, kernel caches);
2. ``--repeats`` rounds in alternating order (fxprune first in even rounds, Torch-Pruning first in
   odd ones) of ``fxprune.plan`` + ``fxprune.apply`` (``Policy("l1", 0.5)``, default capture) and of
   Torch-Pruning 1.6.1's ``MetaPruner(MagnitudeImportance(p=1), 0.5)`` construction + ``step()`` on
   a deep copy made off the clock (with the harness's list of output layers to leave alone); the
   median of each is kept, and their ratio. With ``--min-time S``, rounds go on (up to
   ``--max-repeats``) until each tool's timed runs add up to S seconds: a 0.03 s prune gets
   enough rounds for its median to settle;
3. a 90% bootstrap interval of that ratio, resampling whole rounds (``ratio_interval``): how far
   the ratio moves with the machine's noise.

The models both tools handle (both succeed in the warm-up) give the median and max of
fxprune/Torch-Pruning, and which ratios above 1.0 have intervals that stay above it (a
difference this run can tell apart from noise); the three slowest models of each fxprune stage (trace, shapes, coupling,
importance, select, apply) are listed, with each model's node count to show time per node.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import random
import statistics
import sys
import time
import warnings

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch
from tabulate import tabulate
from tqdm import tqdm

import fxprune
from fxprune import model_zoo

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "timm_speed.json")
RATIO = 0.5
STAGES = ("trace", "shapes", "coupling", "importance", "select", "apply")
# The timm models (one per module, as zoo_coverage.py picks them) that Torch-Pruning 1.6.1 prunes
# in this harness: the set the ratios are taken over (``--both``).
BOTH_HANDLE = ("beit_base_patch16_224", "convmixer_768_32", "cspnext_tiny", "densenet121", "dla46x_c",
               "ese_vovnet19b_slim_dw", "ghostnet_050", "hardcorenas_b", "hgnetv2_b0", "hrnet_w18_small",
               "inception_next_atto", "inception_resnet_v2", "inception_v3", "inception_v4", "lcnetv2_small",
               "legacy_seresnet18", "legacy_xception", "mobilenetv3_small_050", "nasnetalarge", "pnasnet5large",
               "rdnet_tiny", "regnetx_002", "repghostnet_050", "repvit_m1", "resnetv2_18",
               "samvit_base_patch16_224", "selecsls42", "starnet_s050", "swiftformer_xs", "test_byobnet",
               "test_convnext", "test_efficientnet", "test_resnet", "vgg11", "vit_tiny_patch16_dinov3_qkvb",
               "xception41p")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


zoo = _load("zoo_coverage")
cov = zoo.cov


def _fxprune_once(model: torch.nn.Module, inputs: tuple) -> tuple[float, dict, int]:
    start = time.perf_counter()
    plan = fxprune.plan(model, fxprune.Policy("l1", RATIO), inputs)
    planned = time.perf_counter()
    fxprune.apply(plan)
    end = time.perf_counter()
    stages = {k: v for k, v in plan.timings.items() if k in STAGES}
    stages["apply"] = end - planned
    return end - start, stages, len(plan.traced.graph.nodes)


def _tp_once(model: torch.nn.Module, inputs: tuple, out) -> float:
    import torch_pruning as tp
    work = copy.deepcopy(model)
    example = inputs[0] if len(inputs) == 1 else inputs
    ignored = zoo._ignored(work, out)  # the harness's choice of output layers: off the clock
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(work, example, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=RATIO, global_pruning=False, ignored_layers=ignored,
                                  output_transform=cov.leaves)
    pruner.step()
    seconds = time.perf_counter() - start
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    if params(work) >= params(model):
        raise RuntimeError("Torch-Pruning removed nothing")
    with torch.no_grad():
        if zoo.structure(work(*inputs)) != zoo.structure(out):
            raise RuntimeError("Torch-Pruning's pruned model changed the output structure")
    return seconds


def _attempt(fn, *args):
    try:
        return fn(*args), None
    except Exception as err:  # a tool failing on a model is a result, not a crash
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def measure_model(name: str, repeats: int, min_time: float = 0.0, max_repeats: int = 40) -> dict:
    model, inputs = model_zoo.build("timm", name)
    with torch.no_grad():
        out = model(*inputs)
    row: dict = {"model": name}
    fx_warm, fx_error = _attempt(_fxprune_once, model, inputs)
    tp_warm, tp_error = _attempt(_tp_once, model, inputs, out)
    row["fx_error"], row["tp_error"] = fx_error, tp_error
    if fx_warm is None:
        return row
    fx_times, tp_times, stage_runs = [], [], []
    paired = tp_warm is not None
    least = repeats if paired else 1  # no pair to compare: one timed run
    rounds = 0
    while rounds < least or (paired and rounds < max_repeats and min(sum(fx_times), sum(tp_times)) < min_time):
        order = ("fx", "tp") if rounds % 2 == 0 else ("tp", "fx")
        for tool in order:
            if tool == "fx":
                seconds, stages, nodes = _fxprune_once(model, inputs)
                fx_times.append(seconds)
                stage_runs.append(stages)
            elif paired:
                tp_times.append(_tp_once(model, inputs, out))
        rounds += 1
    row["nodes"] = nodes
    row["rounds"] = rounds
    row["fx_s"] = statistics.median(fx_times)
    row["stages"] = {k: statistics.median(r.get(k, 0.0) for r in stage_runs) for k in STAGES}
    if tp_times:
        row["tp_s"] = statistics.median(tp_times)
        row["ratio"] = row["fx_s"] / row["tp_s"]
        row["ratio_lo"], row["ratio_hi"] = ratio_interval(fx_times, tp_times)
    return row


def ratio_interval(fx_times: list[float], tp_times: list[float], level: float = 0.9,
                   resamples: int = 2000) -> tuple[float, float]:
    """A bootstrap interval (``level``, percentile method, fixed seed) of median(fx)/median(tp),
    resampling whole rounds so each fxprune time stays paired with the Torch-Pruning time taken
    beside it. It says how far one run's ratio moves with the machine's noise: a ratio above 1.0
    whose interval reaches below 1.0 is not told apart from parity by this run.

    Example:
        >>> lo, hi = ratio_interval([1.0, 1.1, 0.9, 1.0], [1.0, 1.0, 1.0, 1.0])
        >>> lo <= 1.0 <= hi
        True
    """
    rng = random.Random(0)
    n = len(fx_times)
    ratios = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(fx_times[i] for i in picks) / statistics.median(tp_times[i] for i in picks))
    ratios.sort()
    tail = (1 - level) / 2
    return ratios[int(tail * (resamples - 1))], ratios[int((1 - tail) * (resamples - 1))]


def _worker(send, name: str, repeats: int, min_time: float, max_repeats: int) -> None:
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        send(measure_model(name, repeats, min_time, max_repeats))


def summary(rows: list[dict]) -> str:
    both = [r for r in rows if "ratio" in r]
    lines = []
    if both:
        ratios = [r["ratio"] for r in both]
        worst = max(both, key=lambda r: r["ratio"])
        lines.append(f"fxprune plan+apply / Torch-Pruning prune over the {len(both)} models both handle: "
                     f"median {statistics.median(ratios):.2f}, max {max(ratios):.2f} ({worst['model']}); "
                     f"{sum(x <= 1.0 for x in ratios)}/{len(both)} at or under 1.0")
        banded = [r for r in both if "ratio_lo" in r]
        if banded:
            above = [r for r in banded if r["ratio_lo"] > 1.0]
            unclear = [r for r in banded if r["ratio"] > 1.0 >= r["ratio_lo"]]
            lines.append(f"90% intervals (bootstrap over rounds): {len(above)} above 1.0 as a whole"
                         + (f" ({', '.join(r['model'] for r in above)})" if above else "")
                         + f"; {len(unclear)} above 1.0 with an interval that reaches 1.0"
                         + (f" ({', '.join(r['model'] for r in unclear)})" if unclear else ""))
        lines.append(tabulate(sorted(([r["model"], r["nodes"], r.get("rounds", ""), round(r["fx_s"], 3),
                                       round(r["tp_s"], 3), round(r["ratio"], 2),
                                       f"{r['ratio_lo']:.2f}-{r['ratio_hi']:.2f}" if "ratio_lo" in r else ""]
                                      for r in both), key=lambda x: -x[-2])[:15],
                              headers=["model (15 highest ratios)", "nodes", "rounds", "fxprune s", "TP s",
                                       "ratio", "90% interval"]))
    timed = [r for r in rows if "stages" in r]
    for stage in STAGES:
        slow = sorted(timed, key=lambda r: -r["stages"][stage])[:3]
        lines.append(f"slowest {stage}: " + ", ".join(
            f"{r['model']} {r['stages'][stage]:.2f} s ({r['nodes']} nodes)" for r in slow))
    if timed:
        per_node = [r["fx_s"] / r["nodes"] * 1e3 for r in timed]
        lines.append(f"fxprune ms per graph node: median {statistics.median(per_node):.2f}, max {max(per_node):.2f}")
    failed = [r for r in rows if r.get("fx_error") or "error" in r]
    for r in failed:
        lines.append(f"fxprune failed on {r['model']}: {r.get('fx_error') or r.get('error')}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--both", action="store_true", help="the 36 models both tools handle (BOTH_HANDLE)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per model, at least")
    parser.add_argument("--min-time", type=float, default=0.0,
                        help="more rounds (up to --max-repeats) until each tool's timed runs add up to this many seconds")
    parser.add_argument("--max-repeats", type=int, default=40)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--max-rss-gb", type=float, default=16)
    parser.add_argument("--json", default=OUT)
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --json, run the rest")
    args = parser.parse_args()
    names = [n for _lib, n in zoo.catalogue(["timm"], list(BOTH_HANDLE) if args.both else args.models)]
    rows = []
    if args.resume and os.path.exists(args.json):
        with open(args.json) as f:
            rows = json.load(f)["rows"]
        names = [n for n in names if n not in {r["model"] for r in rows}]
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    for name in tqdm(names, desc="timm speed"):
        result, error = cov.run_isolated(_worker, (name, args.repeats, args.min_time, args.max_repeats),
                                        args.timeout, args.max_rss_gb)
        rows.append(result if result is not None and not error else {"model": name, "error": (error or "no result")[:300]})
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"torch": torch.__version__, "fxprune": fxprune.__version__, "repeats": args.repeats,
                       "min_time": args.min_time, "max_repeats": args.max_repeats,
                       "rows": rows}, f, indent=1)
        os.replace(tmp, args.json)
    print(summary(rows))


if __name__ == "__main__":
    main()
