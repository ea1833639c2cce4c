"""Data-free channel pruning of LeNet-5 on real MNIST, no fine-tuning: test accuracy per criterion.

The setting of the Similar Channel Pruning thesis (seed 1 in shared/METHODS.md), on our own
LeNet-5 trained on MNIST (``train_baselines.load_or_train``; cached checkpoint). Every hidden
layer (conv1, conv2, fc1, fc2) loses the same fraction of its channels (``Policy(ratio=r)``,
local scope); the output layer fc3 is never pruned (its channels are the model's output). No
fine-tuning and no recalibration (LeNet-5 has no BatchNorm). All criteria are data-free except
``sensitivity``, which reads one batch of ``--calib`` (default 256) TRAINING images, never test
images. ``random`` runs with several seeds and is reported as mean ± std.

Usage:
    python benchmarks/reproduce/criteria_lenet_mnist.py             # full run, a few minutes on 1 CPU
    python benchmarks/reproduce/criteria_lenet_mnist.py --fast      # seconds: 2 criteria, 2 ratios

Prints a table (rows: criterion, columns: fraction of channels removed), writes JSON records
``{method, seed, removed, macs_kept, params_kept, accuracy}`` to
benchmarks/results/criteria_lenet_mnist.json and a plot to benchmarks/results/criteria_lenet_mnist.png.
These are our figures on our model and data, not the thesis' numbers.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import fxprune  # noqa: E402
from benchmarks.reproduce.common import (RESULTS_DIR, accuracy, baseline, load_data, mean_std,  # noqa: E402
                                         measure, pyplot, set_threads, subset, write_json)
from benchmarks.reproduce.train_baselines import CACHE_DIR  # noqa: E402

# label -> (registered criterion, importance_options, description)
METHODS = {
    "scp": ("scp", {}, "SCP, L1 target x L1 next-layer distance, scaled compensation (defaults)"),
    "scp-plain": ("scp", {"compensate": True}, "SCP L1/L1, plain compensation W_t += W_r (as described)"),
    "scp-nocomp": ("scp", {"compensate": False}, "SCP L1/L1 without weight compensation"),
    "scp-target": ("scp", {"target_only": True}, "SCP, target-layer distance only, scaled compensation"),
    "l1": ("l1", {}, "L1 norm of the producer filters"),
    "cpmc": ("cpmc", {}, "CPMC multi-criteria (weights 1, 0.5, 0.5; global min-max)"),
    "sensitivity": ("sensitivity", {}, "second-order sensitivity, diag Hessian from calibration images"),
    "random": ("random", {}, "uniform random channels (mean +- std over --random-seeds)"),
}
NEEDS_CALIBRATION = {"sensitivity"}
RATIOS = [round(0.1 * k, 1) for k in range(1, 10)]


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--criteria", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--ratios", nargs="+", type=float, default=RATIOS, help="fractions of channels removed")
    ap.add_argument("--random-seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--calib", type=int, default=256, help="training images for sensitivity's calibration")
    ap.add_argument("--test-subset", type=int, default=None, help="evaluate on N test images (default: all 10000)")
    ap.add_argument("--baseline-epochs", type=int, default=3,
                    help="epochs of the dense LeNet-5 (3 = the cached one)")
    ap.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "criteria_lenet_mnist.json")
    ap.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --out)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fast", action="store_true",
                    help="tiny run for tests: scp + random, ratios 0.3 0.6, 500 test images")
    args = ap.parse_args(argv)
    if args.fast:
        args.criteria, args.ratios, args.random_seeds = ["scp", "random"], [0.3, 0.6], [0, 1]
        args.test_subset = args.test_subset or 500
    args.plot = args.plot or args.out.with_suffix(".png")
    return args


def prune(model, label, ratio, seed, example, calibration):
    criterion, options, _ = METHODS[label]
    options = dict(options, seed=seed) if label == "random" else options
    return fxprune.transform(model, fxprune.Policy(importance=criterion, ratio=ratio), (example,),
                             calibration=calibration if label in NEEDS_CALIBRATION else None,
                             importance_options=options)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    set_threads(args.threads)
    started = time.perf_counter()
    splits = load_data("mnist")
    model, source = baseline("lenet5", "mnist", args.baseline_epochs, 0, splits, cache_dir=args.cache_dir)
    test = subset(splits.test, args.test_subset, seed=0)
    example = splits.test.tensors[0][:1]
    calibration = [subset(splits.train, args.calib, seed=0).tensors[0]]  # one batch of training images
    dense_macs, dense_params = measure(model, example)
    dense_acc = accuracy(model, test)
    print(f"LeNet-5 on MNIST ({source}); unpruned test accuracy {dense_acc:.4f} on {len(test)} test images")

    records = []
    for label in args.criteria:
        for seed in (args.random_seeds if label == "random" else [None]):
            for ratio in args.ratios:
                pruned = prune(model, label, ratio, seed or 0, example, calibration)
                macs, params = measure(pruned, example)
                records.append({"method": label, "seed": seed, "removed": ratio,
                                "macs_kept": macs / dense_macs, "params_kept": params / dense_params,
                                "accuracy": accuracy(pruned, test)})
    wall = time.perf_counter() - started

    table = summarise(records, args)
    headers = ["criterion"] + [f"{r:.0%}" for r in args.ratios]
    print(f"\nTest accuracy after removing a fraction of every hidden layer's channels "
          f"(no fine-tuning; unpruned {dense_acc:.4f}):")
    print(tabulate(table, headers=headers, tablefmt="github", disable_numparse=True))
    kept = {r["removed"]: (r["macs_kept"], r["params_kept"]) for r in records if r["method"] == args.criteria[0]}
    print("MACs / params kept: " + ", ".join(f"{r:.0%}: {m:.3f}/{p:.3f}" for r, (m, p) in sorted(kept.items())))
    print("Calibration: sensitivity only, one batch of %d MNIST training images; all others data-free." % args.calib)
    for label in args.criteria:
        print(f"  {label:12s} {METHODS[label][2]}")

    payload = {"model": "lenet5", "data": "mnist", "baseline": source, "test_images": len(test),
               "unpruned_accuracy": dense_acc, "dense_macs": dense_macs, "dense_params": dense_params,
               "policy": "Policy(importance=..., ratio=removed), local scope; fc3 (output) never pruned",
               "finetune": None, "calibration": f"sensitivity: {args.calib} MNIST training images",
               "methods": {k: METHODS[k][2] for k in args.criteria}, "table": {"headers": headers, "rows": table},
               "wall_seconds": round(wall, 1), "torch": torch.__version__, "records": records}
    write_json(args.out, payload)
    plot(records, args, dense_acc)
    print(f"wrote {args.out} and {args.plot} ({wall:.0f} s)")
    return payload


def summarise(records: list[dict], args) -> list[list[str]]:
    rows = []
    for label in args.criteria:
        row = [label]
        for ratio in args.ratios:
            accs = [r["accuracy"] for r in records if r["method"] == label and r["removed"] == ratio]
            mean, std = mean_std(accs)
            row.append(f"{mean:.4f}±{std:.4f}" if len(accs) > 1 else f"{mean:.4f}")
        rows.append(row)
    return rows


def plot(records: list[dict], args, dense_acc: float) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in args.criteria:
        stats = [mean_std([r["accuracy"] for r in records if r["method"] == label and r["removed"] == x])
                 for x in args.ratios]
        means = [m for m, _ in stats]
        line, = ax.plot(args.ratios, means, marker="o", label=label)
        if label == "random":
            ax.fill_between(args.ratios, [m - s for m, s in stats], [m + s for m, s in stats],
                            color=line.get_color(), alpha=0.2)
    ax.axhline(dense_acc, color="black", linestyle="--", linewidth=1, label="unpruned")
    ax.set_xlabel("fraction of channels removed per hidden layer")
    ax.set_ylabel("MNIST test accuracy (no fine-tuning)")
    ax.set_title("LeNet-5 / MNIST: data-free pruning by criterion")
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
