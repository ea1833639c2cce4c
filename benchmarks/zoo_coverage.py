"""Coverage on models nobody here wrote: timm (one model per family), Hugging Face transformers,
Ultralytics YOLO and segmentation_models_pytorch, fxprune beside Torch-Pruning in the same run.

    pip install -e ".[zoo,bench]"
    python benchmarks/zoo_coverage.py [--libraries timm transformers ultralytics smp]
                                      [--models resnet18 bert ...] [--timeout 300] [--max-rss-gb 16]
                                      [--no-tp] [--json PATH]

Every model is built from its library's own config or YAML with random weights (nothing is
downloaded, see ``fxprune.model_zoo``), in eval mode, at the library's default input size (timm)
or a small one (64x64 for YOLO/smp, 8 tokens for text). Per model, in a forked worker killed past
``--timeout`` s or ``--max-rss-gb`` GB:

- fxprune: ``transform(model, Policy("l1", 0.5), inputs)`` with the default ``capture="auto"``:
  the front end used, plan+apply seconds, parameters and MACs after/before, the blocked summary
  (``fxprune.blocked``: share of prunable channels blocked, causes grouped by op), whether every
  pruned group is exact (``exact``, ``exact_groups``, ``approximate_groups``); then the model in float64 with
  ``Policy(ratio=0.5, exact_only=True)`` checked by the mask oracle (``fxprune.verify``, 1e-6
  relative: Hugging Face's RMSNorm computes in float32 whatever the model's dtype).
  Success: the transform finishes and the pruned model runs with the original's output structure.
- Torch-Pruning 1.6.1: ``MetaPruner`` with ``MagnitudeImportance(p=1)``, ratio 0.5, layers whose
  output width is a model output width ignored, on a deepcopy made off the clock. Success: the
  step finishes, parameters drop and the pruned model runs with the same output structure.
  YOLO also runs in train mode (``--train``-style second row, named ``<model>:train``).

Rows go to benchmarks/results/zoo_coverage.json as they finish; a per-library summary, the list
of failures with reasons, and time per front end (median, max) beside Torch-Pruning's are printed.
"""
from __future__ import annotations

import argparse
import collections
import copy
import importlib.util
import json
import os
import statistics
import sys
import time
import warnings

# benchmarks/transformers.py would shadow the transformers package: this folder is not an import root
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch
from tabulate import tabulate
from tqdm import tqdm

import fxprune
from fxprune import model_zoo
from fxprune.blocked import blocked_summary
from fxprune.cost import count

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "zoo_coverage.json")
RATIO = 0.5


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cov = _load("coverage")


def structure(out):
    """Shapes of an output, keeping container types and dict keys (HF ``ModelOutput`` included)."""
    if isinstance(out, torch.Tensor):
        return list(out.shape)
    if isinstance(out, dict):
        return [type(out).__name__, {str(k): structure(v) for k, v in out.items()}]
    if isinstance(out, (list, tuple)):
        return [type(out).__name__, [structure(v) for v in out]]
    return type(out).__name__


FAMILIES = os.path.join(HERE, "results", "timm_families.json")


def _timm_families() -> dict[str, str]:
    """``model_zoo.timm_families()`` (minutes: every timm model is built on the meta device to
    rank its size), cached in benchmarks/results/timm_families.json per timm version."""
    import timm
    if os.path.exists(FAMILIES):
        with open(FAMILIES) as f:
            cached = json.load(f)
        if cached.get("timm") == timm.__version__:
            return cached["families"]
    families = model_zoo.timm_families()
    os.makedirs(os.path.dirname(FAMILIES), exist_ok=True)
    with open(FAMILIES + ".tmp", "w") as f:
        json.dump({"timm": timm.__version__, "families": families}, f, indent=1)
    os.replace(FAMILIES + ".tmp", FAMILIES)
    return families


def catalogue(libraries: list[str], only: list[str] | None) -> list[tuple[str, str]]:
    """``(library, model name)`` pairs to run; timm's are the smallest model of each family."""
    rows = []
    for lib in libraries:
        if lib == "timm":
            names = sorted(set(_timm_families().values()))
        elif lib == "transformers":
            names = list(model_zoo.TRANSFORMERS)
        elif lib == "ultralytics":
            names = [*model_zoo.ULTRALYTICS, *(f"{n}:train" for n in model_zoo.ULTRALYTICS)]
        else:
            names = list(model_zoo.SMP)
        rows += [(lib, n) for n in names if not only or n in only or n.split(":")[0] in only]
    return rows


def _build(lib: str, name: str):
    base, _, mode = name.partition(":")
    model, inputs = model_zoo.build(lib, base)
    if mode == "train":
        model.train()
    return model, inputs


def _blocked(plan) -> dict:
    """Share of prunable channels (those not kept for a model output) that are blocked, and the
    top causes grouped by op (``fxprune.blocked``, the summary line of ``fxprune.explain``)."""
    return blocked_summary(plan).to_dict()


def _exactness(plan) -> dict:
    """Whether every group the default transform prunes is exact, with the counts of each."""
    pruned = [g for g in plan.groups if g.removed]
    exact = sum(1 for g in pruned if g.exact)
    return {"exact": exact == len(pruned), "exact_groups": exact, "approximate_groups": len(pruned) - exact}


def _float64(model: torch.nn.Module, inputs: tuple) -> tuple:
    model = copy.deepcopy(model).double()
    return model, tuple(x.double() if x.is_floating_point() else x for x in inputs)


def fx_row(lib: str, name: str) -> dict:
    model, inputs = _build(lib, name)
    with torch.no_grad():
        expected = structure(model(*inputs))
    start = time.perf_counter()
    plan = fxprune.plan(model, fxprune.Policy("l1", RATIO), inputs)
    planned = time.perf_counter()
    pruned = fxprune.apply(plan)
    seconds = time.perf_counter() - start
    pruned.train(model.training)
    with torch.no_grad():
        ok = structure(pruned(*inputs)) == expected
    before, after = count(plan.traced), count(pruned)
    row = {"capture": plan.capture.get("frontend"), "fx_error": plan.capture.get("fx_error"),
           "s": seconds, "plan_s": planned - start, "apply_s": seconds - (planned - start),
           "ok": ok, "params_ratio": after["params"] / max(before["params"], 1),
           "macs_ratio": after["macs"] / max(before["macs"], 1), "blocked": _blocked(plan),
           "groups": len(plan.groups), "pruned_groups": sum(1 for g in plan.groups if g.removed),
           **_exactness(plan),
           "pruned_kinds": dict(collections.Counter(getattr(g, "kind", "channel") for g in plan.groups if g.removed)),
           "aten_left": sorted({str(n.target) for n in plan.traced.graph.nodes
                                if isinstance(n.target, torch._ops.OpOverload)})}
    m64, x64 = _float64(model, inputs)
    exact = fxprune.transform(m64, fxprune.Policy("l1", RATIO, exact_only=True), x64,
                              # the same front end; FX with timm's leaf layers is reached through auto
                              capture="auto" if plan.capture.get("timm_leaves") else plan.capture.get("frontend", "auto"))
    # 1e-6: some models compute in float32 inside (HF RMSNorm) whatever their dtype
    check = fxprune.verify(exact, inputs=x64, tolerance=1e-6)
    row["oracle"] = {"ok": check.ok, "max_error": check.max_error, "compared": check.compared}
    return row


def _ignored(model: torch.nn.Module, out) -> list:
    widths = {t.shape[-1] for t in cov.leaves(out) if t.dim() > 1} | {t.shape[1] for t in cov.leaves(out) if t.dim() > 1}
    return [m for m in model.modules()
            if (isinstance(m, torch.nn.Linear) and m.out_features in widths)
            or (isinstance(m, torch.nn.modules.conv._ConvNd) and m.out_channels in widths)]


def tp_row(lib: str, name: str) -> dict:
    import torch_pruning as tp
    model, inputs = _build(lib, name)
    with torch.no_grad():
        out = model(*inputs)
    expected = structure(out)
    work = copy.deepcopy(model)
    example = inputs[0] if len(inputs) == 1 else inputs
    ignored = _ignored(work, out)  # the harness's choice of output layers: off the clock
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(work, example, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=RATIO, global_pruning=False, ignored_layers=ignored,
                                  output_transform=cov.leaves)
    pruner.step()
    seconds = time.perf_counter() - start
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    work.train(model.training)
    with torch.no_grad():
        ok = structure(work(*inputs)) == expected
    return {"s": seconds, "params_ratio": params(work) / params(model), "ok": ok and params(work) < params(model)}


def _worker(send, tool: str, lib: str, name: str) -> None:
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        send(fx_row(lib, name) if tool == "fx" else tp_row(lib, name))


def measure(lib: str, name: str, limits: tuple, with_tp: bool) -> dict:
    row = {"library": lib, "model": name}
    for tool in ("fx", "tp") if with_tp else ("fx",):
        result, error = cov.run_isolated(_worker, (tool, lib, name), *limits)
        row[tool] = result if result is not None and not error else {"ok": False, "error": (error or "no result")[:400]}
    return row


def summary(rows: list[dict]) -> str:
    by_lib: dict = collections.defaultdict(lambda: collections.Counter())
    for r in rows:
        c = by_lib[r["library"]]
        c["models"] += 1
        c["fx_ok"] += bool(r["fx"].get("ok"))
        c["oracle_ok"] += bool(r["fx"].get("oracle", {}).get("ok"))
        c["tp_ok"] += bool(r.get("tp", {}).get("ok"))
        c["export"] += r["fx"].get("capture") == "export"
    table = [[lib, c["models"], c["fx_ok"], c["oracle_ok"], c["export"], c["tp_ok"]] for lib, c in by_lib.items()]
    lines = [tabulate(table, headers=["library", "models", "fxprune ok", "oracle ok", "via export", "Torch-Pruning ok"])]
    for frontend in ("fx", "export"):
        times = [r["fx"]["s"] for r in rows if r["fx"].get("capture") == frontend and "s" in r["fx"]]
        if times:
            lines.append(f"fxprune plan+apply via {frontend}: median {statistics.median(times):.2f} s, "
                         f"max {max(times):.2f} s over {len(times)} models")
    tp_times = [r["tp"]["s"] for r in rows if "s" in r.get("tp", {})]
    if tp_times:
        lines.append(f"Torch-Pruning prune: median {statistics.median(tp_times):.2f} s, max {max(tp_times):.2f} s "
                     f"over {len(tp_times)} models")
    failures = [r for r in rows if not r["fx"].get("ok") or not r["fx"].get("oracle", {}).get("ok")]
    if failures:
        lines.append("fxprune failures:")
        for r in failures:
            why = r["fx"].get("error") or f"oracle {r['fx'].get('oracle')}" or "output structure changed"
            lines.append(f"  {r['library']}/{r['model']}: {why[:300]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--libraries", nargs="+", default=list(model_zoo.LIBRARIES), choices=model_zoo.LIBRARIES)
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--max-rss-gb", type=float, default=16)
    parser.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    parser.add_argument("--json", default=OUT)
    args = parser.parse_args()
    todo = catalogue(args.libraries, args.models)
    rows = []
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    for lib, name in tqdm(todo, desc="zoo"):
        rows.append(measure(lib, name, (args.timeout, args.max_rss_gb), not args.no_tp))
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"torch": torch.__version__, "fxprune": fxprune.__version__, "ratio": RATIO, "rows": rows},
                      f, indent=1, default=str)
        os.replace(tmp, args.json)
    print(summary(rows))


if __name__ == "__main__":
    main()
