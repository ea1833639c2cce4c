"""Coverage of torchvision's models at ratio 0.5: does the transform succeed, what is pruned, and
does the mask oracle hold with ``exact_only=True`` (float32, tolerance 1e-4)?

    python benchmarks/coverage.py [--models resnet50 fcn_resnet50] [--size 224] [--fast]
                                  [--timeout 900] [--max-rss-gb 16] [--json PATH]

All 80 ``torchvision.models.list_models(module=torchvision.models)`` and the 6 segmentation models
(weights=None, batch 1), each transformed with ``Policy(ratio=0.5)`` (output shapes and dict keys
must not change) and with ``exact_only=True`` (checked by ``fxprune.verify``). All-zero weights
(ViT's head) are redrawn, ConvNeXt's layer scales (1e-6) set to 1 and BatchNorm statistics set
from one random batch, so that the oracle checks every branch; ``signal`` is how much the
original's output moves between two random inputs. ``--fast``: 64x64 inputs where the model
allows (ViT/MaxViT need 224, Inception-v3 96). Each model runs in a forked worker, killed past
``--timeout`` s or ``--max-rss-gb``: a failure is a row, not a crash. Rows go to the JSON
(benchmarks/results/coverage.json) as they finish; a table and a summary line are printed.
"""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import time

import torch
import torchvision
from tabulate import tabulate
from tqdm import tqdm

import fxprune
from fxprune.cost import count

CLASSIFICATION = torchvision.models.list_models(module=torchvision.models)
SEGMENTATION = ["fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101",
                "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]
OUT = os.path.join(os.path.dirname(__file__), "results", "coverage.json")
FAST_SIZE = 64


def input_size(name: str, size: int, fast: bool) -> int:
    """The input side for ``name``: ``size`` (64 with ``fast``) unless the model needs another."""
    if name.startswith("vit_") or name == "maxvit_t":
        return 224  # fixed by the architecture
    if name == "inception_v3":
        return 96 if fast else 299
    return min(size, FAST_SIZE) if fast else size


def build(name: str, side: int | None = None) -> torch.nn.Module:
    """``name`` from torchvision, untrained, in eval mode, all-zero weight tensors redrawn, tiny
    layer scales set to 1 and, given ``side``, BatchNorm statistics set from one random batch."""
    torch.manual_seed(0)
    kwargs = {"weights": None}
    if name in ("inception_v3", "googlenet"):
        kwargs.update(aux_logits=False, init_weights=True)
    if name in SEGMENTATION:
        kwargs["weights_backbone"] = None
    model = torchvision.models.get_model(name, **kwargs).eval()
    with torch.no_grad():  # ViT's zero head; ConvNeXt's layer scale 1e-6 hides its blocks' branches
        for p in (p for p in model.parameters() if p.dim() > 1 and p.abs().max() < 1e-4):
            p.normal_(0, 0.02) if not p.abs().max() else p.fill_(1.0)
    if side:
        calibrate_bn(model, side)
    return model


def calibrate_bn(model: torch.nn.Module, side: int) -> None:
    """BatchNorm statistics from one random batch of 2; with the defaults, activations of untrained
    nets can vanish with depth (GoogLeNet's output is then its bias, whatever the input)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: the batch's own statistics
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, side, side))
    for m in norms:
        m.momentum = 0.1
    model.eval()


def run_isolated(target, args: tuple, timeout: float, max_rss_gb: float) -> tuple:
    """``target(send, *args)`` in a forked worker that sends dicts: ``(last dict sent, error)``. It
    is killed past ``timeout`` s or ``max_rss_gb`` GB resident (0: no limit): a hang costs a row."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(send, target, args), daemon=True)
    proc.start()
    send.close()
    last, error = None, None
    deadline = time.monotonic() + timeout if timeout else float("inf")
    while error is None:
        if receive.poll(0.2):
            try:
                msg = receive.recv()
            except EOFError:
                msg = {"_done": "worker ended without a result"}
            if "_done" in msg:
                error = msg["_done"]
                break
            last = msg
        elif not proc.is_alive() and not receive.poll():
            error = f"worker ended without a result (exit code {proc.exitcode})"
        elif max_rss_gb and _rss_gb(proc.pid) > max_rss_gb:
            error = f"killed: over {max_rss_gb:g} GB of memory"
        elif time.monotonic() > deadline:
            error = f"killed: no result within {timeout:g} s"
    proc.kill()  # no-op once it has ended
    proc.join()
    return last, error


def _worker(send, target, args) -> None:
    try:
        target(send.send, *args)
        send.send({"_done": None})
    except BaseException as err:  # reported to the parent as this row's error
        send.send({"_done": short(err)})


def _rss_gb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0) / 2**20
    except OSError:
        return 0.0


def structure(out):
    """Shapes of an output, keeping dict keys and tuple/list nesting."""
    if isinstance(out, torch.Tensor):
        return list(out.shape)
    if isinstance(out, dict):
        return {str(k): structure(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [structure(v) for v in out]
    return type(out).__name__


def leaves(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in leaves(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in leaves(v)]
    return []


def signal(a, b) -> float:
    """max |f(x) - f(x')| / max |f(x)| over outputs (near 0: the oracle checks little)."""
    return max(((u - v).abs().max() / u.abs().max().clamp_min(1e-30)).item()
               for u, v in zip(leaves(a), leaves(b)))


def short(err: BaseException, width: int = 160) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:width]


def group_counts(plan) -> dict:
    g = plan.groups
    return {"groups": len(g), "pruned": sum(1 for x in g if x.removed),
            "exact": sum(1 for x in g if x.exact and not x.blocked),
            "approximate": sum(1 for x in g if not x.exact and not x.blocked),
            "blocked": sum(1 for x in g if x.blocked)}


def ratios(plan, pruned) -> dict:
    b, a = count(plan.traced), count(pruned)
    return {f"{k}_ratio": a[k] / b[k] if b[k] else None for k in ("params", "macs")}


def run_default(model, x: tuple, expected) -> dict:
    """Default policy: groups, ratios, plan/apply seconds, output structure unchanged."""
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5), x)
    plan = pruned.meta["fxprune"]
    with torch.no_grad():
        got = structure(pruned(*x))
    return {"nodes": len(plan.traced.graph.nodes), **group_counts(plan), **ratios(plan, pruned),
            "plan_s": sum(v for k, v in plan.timings.items() if k != "rewrite"),
            "apply_s": plan.timings.get("rewrite", 0.0), "shape_ok": got == expected,
            "stages_s": {k: round(v, 4) for k, v in plan.timings.items()}}


def run_exact(model, x: tuple) -> dict:
    """``exact_only=True``: ratios and the mask oracle."""
    pruned = fxprune.transform(model, fxprune.Policy(ratio=0.5, exact_only=True), x)
    plan = pruned.meta["fxprune"]
    check = fxprune.verify(pruned)
    r = ratios(plan, pruned)
    row = {"exact_params_ratio": r["params_ratio"], "exact_macs_ratio": r["macs_ratio"],
           "oracle_error": check.max_error, "oracle_ok": bool(check.ok)}
    return row


def kind(name: str) -> str:
    return "segmentation" if name in SEGMENTATION else "classification"


class Tiny(torch.nn.Module):
    """A small conv net with a residual add, a concatenation, a gate and a torch function, so
    that pruning it first keeps lazy imports and first-call costs (of module calls, of function
    calls, of torch's override tables) off the clock of either tool."""

    def __init__(self):
        super().__init__()
        n = torch.nn
        self.stem = n.Sequential(n.Conv2d(3, 8, 3), n.BatchNorm2d(8), n.ReLU())
        self.branch = n.Sequential(n.Conv2d(8, 8, 3, padding=1), n.BatchNorm2d(8))
        self.side = n.Conv2d(8, 4, 1)
        self.pool = n.AdaptiveAvgPool2d(1)
        self.head = n.Linear(12, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.branch(x))
        side = self.side(x)
        x = torch.cat([x, side * torch.sigmoid(side.mean((2, 3), keepdim=True))], dim=1)
        return self.head(torch.flatten(self.pool(x), 1))


def tiny() -> torch.nn.Module:
    """See ``Tiny`` (inputs of 16x16)."""
    return Tiny().eval()


def measure(send, name: str, size: int, fast: bool) -> None:
    """Runs in the worker; sends the row after each run, so a kill keeps what was measured."""
    row = {"model": name, "kind": kind(name), "transform_ok": False}
    row["size"] = side = input_size(name, size, fast)
    fxprune.transform(tiny(), fxprune.Policy(ratio=0.5), (torch.randn(1, 3, 16, 16),))  # warm-up
    model = build(name, side)
    torch.manual_seed(1)
    x = (torch.randn(1, 3, side, side),)
    with torch.no_grad():
        out = model(*x)
        row["signal"] = signal(out, model(torch.randn_like(x[0])))
    expected = structure(out)
    stage = "error"
    try:
        row.update(run_default(model, x, expected))
        row["transform_ok"], stage = True, "exact_error"
        send(row)
        gc.collect()
        row.update(run_exact(model, x))
    except Exception as err:  # a failure is a result of this benchmark, not a crash
        row[stage] = short(err)
    send(row)


def safe_measure(name: str, size: int, fast: bool, timeout: float, max_rss_gb: float) -> dict:
    start = time.perf_counter()
    row, error = run_isolated(measure, (name, size, fast), timeout, max_rss_gb)
    row = row or {"model": name, "kind": kind(name), "transform_ok": False}
    if error:
        row["exact_error" if row["transform_ok"] else "error"] = error
    row["wall_s"] = round(time.perf_counter() - start, 2)
    return row


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.2e}" if v and abs(v) < 1e-2 else f"{v:.3f}"
    return "" if v is None else str(v)[:60]


COLUMNS = [("model", "model"), ("size", "size"), ("nodes", "nodes"), ("groups", "groups"),
           ("exact", "exact"), ("approximate", "approx"), ("blocked", "blocked"),
           ("params_ratio", "params"), ("macs_ratio", "MACs"), ("plan_s", "plan s"),
           ("apply_s", "apply s"), ("shape_ok", "shapes"), ("exact_params_ratio", "params (exact)"),
           ("oracle_error", "oracle err"), ("oracle_ok", "oracle"), ("signal", "signal"),
           ("error", "error"), ("exact_error", "exact_only error")]


def table(rows: list[dict]) -> str:
    return tabulate([[_fmt(r.get(k)) for k, _ in COLUMNS] for r in rows], headers=[h for _, h in COLUMNS])


def summary(rows: list[dict]) -> str:
    cls, seg = ([r for r in rows if r["kind"] == k] for k in ("classification", "segmentation"))
    ok = sum(1 for r in cls if r["transform_ok"] and r.get("shape_ok"))
    oracle = sum(1 for r in cls if r.get("oracle_ok"))
    seg_ok = sum(1 for r in seg if r["transform_ok"] and r.get("shape_ok") and r.get("oracle_ok"))
    return (f"transform ok: {ok}/{len(cls)}, oracle (exact_only) ok: {oracle}/{len(cls)}, "
            f"segmentation: {seg_ok}/{len(seg)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=CLASSIFICATION + SEGMENTATION)
    ap.add_argument("--size", type=int, default=224, help="input side (segmentation: at most 224)")
    ap.add_argument("--fast", action="store_true", help=f"{FAST_SIZE}x{FAST_SIZE} inputs where possible")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per model (0: none)")
    ap.add_argument("--max-rss-gb", type=float, default=16, help="memory cap per model (0: none)")
    ap.add_argument("--json", default=OUT)
    args = ap.parse_args()
    if set(args.models) - set(CLASSIFICATION + SEGMENTATION):
        ap.error(f"unknown models: {sorted(set(args.models) - set(CLASSIFICATION + SEGMENTATION))}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    rows = []
    for name in tqdm(args.models, desc="coverage", unit="model"):
        size = min(args.size, 224) if name in SEGMENTATION else args.size
        rows.append(safe_measure(name, size, args.fast, args.timeout, args.max_rss_gb))
        with open(args.json, "w") as f:
            json.dump({"ratio": 0.5, "size": args.size, "fast": args.fast, "torch": torch.__version__,
                       "torchvision": torchvision.__version__, "rows": rows}, f, indent=1)
    print(table(rows))
    print(summary(rows))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
