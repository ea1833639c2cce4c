"""ResNet-20 on Fashion-MNIST pruned to a MAC budget by each criterion: accuracy right after
pruning, after BatchNorm recalibration and after a short fine-tune, beside Torch-Pruning.

For every criterion registered with fxprune (``fxprune.importance.available()``), every budget
(``Policy(flops=b)``: fraction of MACs kept; local scope, one ratio searched for all groups) and
every seed, the cached dense ResNet-20 (``train_baselines.load_or_train``) is pruned and scored on
the test set: (1) as pruned; (2) after ``fxprune.recalibrate`` on ``--recal-batches`` batches of
training images (BN statistics only, no weight update); (3) after fine-tuning the recalibrated
model for each of ``--epochs`` (separate runs: SGD momentum 0.9, weight decay 5e-4, cosine from
``--lr`` to 0), each epoch drawing ``--finetune-subset`` random training images (default 12000
of 60000). ``tp-magnitude`` is Torch-Pruning's MetaPruner with MagnitudeImportance(p=1), local,
its ratio bisected to the same MAC budget, then the same recalibration and fine-tune (skipped
with a note when ``torch_pruning`` is not installed). ``lamp`` is a cross-group normaliser (under
local scope it would equal ``l1``), so it runs with ``scope="global", normalize="none"``.
Criteria that need data read ``--calib`` training images (taylor: with labels and cross-entropy;
hrank, sensitivity: images only). ``sensitivity-hessian`` is ``sensitivity`` with
``layer_rates="hessian"``: per-layer rates from one global ranking of the raw second-order
saliencies instead of one ratio for all groups (``-mean``: each layer's saliencies divided by
their mean first). A criterion that errors is skipped with the
reason recorded.
Seeds change the random criterion, the calibration/recalibration images and the fine-tune order;
the dense model is always the seed-0 checkpoint. With one seed, differences of a few tenths of a
point are within run-to-run noise: use ``--seeds 3`` or more before calling a winner.

Usage:
    python benchmarks/reproduce/criteria_resnet20_fmnist.py --epochs 1 2        # every criterion
    python benchmarks/reproduce/criteria_resnet20_fmnist.py --fast              # seconds, for tests
    python benchmarks/reproduce/criteria_resnet20_fmnist.py --data cifar10 --data-root ~/data
        # a user's CIFAR-10 folder (torchvision layout); trains the dense model first. NOT run here.

Writes benchmarks/results/criteria_resnet20_fmnist.json and .png. Our figures on our data only.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch.utils.data import DataLoader, RandomSampler

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import fxprune  # noqa: E402
from benchmarks.reproduce.common import (RESULTS_DIR, accuracy, baseline, batches, load_data,  # noqa: E402
                                         mean_std, measure, pyplot, set_threads, subset, write_json)
from benchmarks.reproduce.train_baselines import CACHE_DIR  # noqa: E402
from fxprune.training import finetune  # noqa: E402

TP = "tp-magnitude"
STAGES = ("accuracy_pruned", "accuracy_recalibrated")
# Named variants of registered criteria: method name -> (criterion, importance options).
VARIANTS = {"sensitivity-hessian": ("sensitivity", {"layer_rates": "hessian"}),
            "sensitivity-hessian-mean": ("sensitivity", {"layer_rates": "hessian-mean"})}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", choices=["fashion_mnist", "cifar10"], default="fashion_mnist")
    ap.add_argument("--data-root", help="CIFAR-10 folder holding cifar-10-batches-py (with --data cifar10)")
    ap.add_argument("--criteria", nargs="+", default=None,
                    help=f"registered criteria and/or {TP!r} (default: all of them)")
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.6], help="fractions of MACs kept")
    ap.add_argument("--epochs", nargs="+", type=int, default=[1, 2], help="fine-tune lengths, each its own run")
    ap.add_argument("--finetune-subset", type=int, default=12000, help="training images per fine-tune epoch")
    ap.add_argument("--seeds", type=int, default=1, help="number of seeds (0..N-1)")
    ap.add_argument("--calib", type=int, default=256, help="training images for criteria that need data")
    ap.add_argument("--recal-batches", type=int, default=20, help="training batches for BN recalibration")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.01, help="fine-tune learning rate (SGD, cosine)")
    ap.add_argument("--test-subset", type=int, default=None, help="evaluate on N test images (default: all)")
    ap.add_argument("--baseline-epochs", type=int, default=4, help="epochs of the dense model (4 = the cached one)")
    ap.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "criteria_resnet20_fmnist.json")
    ap.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --out)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fast", action="store_true",
                    help="tiny run for tests: l1 + random, budget 0.5, 1 epoch, 500-image subsets")
    args = ap.parse_args(argv)
    if args.fast:
        args.criteria = args.criteria or ["l1", "random"]
        args.budgets, args.epochs, args.calib, args.recal_batches = [0.5], [1], 128, 4
        args.finetune_subset, args.test_subset = 500, args.test_subset or 500
    args.criteria = args.criteria or fxprune.importance.available() + list(VARIANTS) + [TP]
    args.plot = args.plot or args.out.with_suffix(".png")
    return args


def prune(model, method, budget, seed, example, calibration):
    """The pruned model and the scope it was pruned with."""
    if method == TP:
        return tp_prune(model, example, budget), "local"
    scope, normalize = ("global", "none") if method == "lamp" else ("local", "mean")
    importance, options = VARIANTS.get(method, (method, {}))
    if method == "random":
        options = {"seed": seed}
    policy = fxprune.Policy(importance=importance, flops=budget, scope=scope, normalize=normalize)
    pruned = fxprune.transform(model, policy, (example,), calibration=calibration, loss_fn=F.cross_entropy,
                               importance_options=options)
    plan = pruned.meta["fxprune"]
    return pruned, plan.selection.get("selection_policy", {}).get("scope", scope)


def tp_prune(model, example, budget, steps=14):
    """Torch-Pruning, MagnitudeImportance(p=1), one ratio for all layers bisected to ``budget``."""
    import torch_pruning as tp
    dense = measure(model, example)[0]
    lo, hi, best = 0.0, 0.95, None
    for _ in range(steps):
        ratio = (lo + hi) / 2
        candidate = copy.deepcopy(model)
        tp.pruner.MetaPruner(candidate, example, importance=tp.importance.MagnitudeImportance(p=1),
                             pruning_ratio=ratio, ignored_layers=[candidate.fc]).step()
        kept = measure(candidate, example)[0] / dense
        if best is None or abs(kept - budget) < abs(best[1] - budget):
            best = (candidate, kept)
        lo, hi = (ratio, hi) if kept > budget else (lo, ratio)
    return best[0].eval()


def run_one(model, method, budget, seed, args, data, dense) -> dict:
    started = time.perf_counter()
    pruned, scope = prune(model, method, budget, seed, data["example"], data["calib"])
    macs, params = measure(pruned, data["example"])
    record = {"method": method, "seed": seed, "budget": budget, "scope": scope,
              "macs_kept": macs / dense[0], "params_kept": params / dense[1],
              "prune_seconds": round(time.perf_counter() - started, 2),
              "accuracy_pruned": accuracy(pruned, data["test"])}
    fxprune.recalibrate(pruned, data["recal"])
    record["accuracy_recalibrated"] = accuracy(pruned, data["test"])
    record["accuracy_finetuned"] = {}
    for epochs in args.epochs:
        tuned = copy.deepcopy(pruned)
        sampler = RandomSampler(data["train"], num_samples=min(args.finetune_subset, len(data["train"])),
                                generator=torch.Generator().manual_seed(seed))
        finetune(tuned, DataLoader(data["train"], batch_size=args.batch_size, sampler=sampler), epochs=epochs,
                 lr=args.lr, weight_decay=5e-4, progress=False, seed=seed)
        record["accuracy_finetuned"][str(epochs)] = accuracy(tuned, data["test"])
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    set_threads(args.threads)
    started = time.perf_counter()
    splits = load_data(args.data, args.data_root)
    model, source = baseline("resnet20", args.data, args.baseline_epochs, 0, splits, cache_dir=args.cache_dir,
                             data_root=args.data_root, tiny_if_absent=1000 if args.fast else None)
    test = subset(splits.test, args.test_subset, seed=0)
    example = splits.test.tensors[0][:1]
    dense = measure(model, example)
    dense_acc = accuracy(model, test)
    print(f"ResNet-20 on {args.data} ({source}); unpruned test accuracy {dense_acc:.4f} on {len(test)} images; "
          f"{dense[0] / 1e6:.1f} M MACs, {dense[1] / 1e3:.1f} k params", flush=True)
    have_tp = _has_torch_pruning()
    records, skipped = [], []
    for seed in range(args.seeds):
        data = {"train": splits.train, "test": test, "example": example,
                "calib": batches(subset(splits.train, args.calib, seed=1000 + seed), 64),
                "recal": [x for x, _ in batches(subset(splits.train, args.recal_batches * args.batch_size,
                                                       seed=2000 + seed), args.batch_size)]}
        for budget in args.budgets:
            for method in args.criteria:
                if method == TP and not have_tp:
                    _skip(skipped, method, budget, seed, "torch_pruning is not installed (pip install torch-pruning)")
                    continue
                try:
                    record = run_one(model, method, budget, seed, args, data, dense)
                except Exception as error:  # a criterion that fails is reported, not fatal
                    _skip(skipped, method, budget, seed, f"{type(error).__name__}: {error}"[:300])
                    continue
                records.append(record)
                write_json(args.out, {"partial": True, "records": records, "skipped": skipped})  # survive a stop
                print(f"  seed {seed} budget {budget:.2f} {method:12s} MACs kept {record['macs_kept']:.3f}  "
                      + "  ".join(f"{v:.4f}" for v in _accs(record)) + f"  ({record['seconds']:.0f} s)", flush=True)
    wall = time.perf_counter() - started

    headers, rows = table(records, args)
    print(f"\nTest accuracy ({len(test)} images; unpruned {dense_acc:.4f}); mean±std over {args.seeds} seed(s); "
          f"fine-tune: SGD lr {args.lr} cosine, {args.finetune_subset} training images per epoch:")
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    for item in skipped:
        print(f"skipped {item['method']} (budget {item['budget']}, seed {item['seed']}): {item['reason']}")
    if args.seeds < 2:
        print("note: one seed only; differences of a few tenths of a point are within noise: rerun with --seeds 3.")
    payload = {"model": "resnet20", "data": args.data, "baseline": source, "unpruned_accuracy": dense_acc,
               "test_images": len(test), "dense_macs": dense[0], "dense_params": dense[1],
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "policy": "Policy(importance=..., flops=budget), local scope (lamp: global, normalize='none')",
               "table": {"headers": headers, "rows": rows}, "skipped": skipped,
               "wall_seconds": round(wall, 1), "torch": torch.__version__, "records": records}
    write_json(args.out, payload)
    plot(records, args, dense_acc)
    print(f"wrote {args.out} and {args.plot} ({wall:.0f} s)")
    return payload


def _has_torch_pruning() -> bool:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return False
    return True


def _skip(skipped, method, budget, seed, reason):
    skipped.append({"method": method, "budget": budget, "seed": seed, "reason": reason})


def _accs(record: dict) -> list[float]:
    return [record[s] for s in STAGES] + list(record["accuracy_finetuned"].values())


def table(records: list[dict], args) -> tuple[list[str], list[list]]:
    headers = ["MACs kept", "criterion", "MACs", "params", "pruned", "+recal"] + [f"+ft {e} ep" for e in args.epochs]
    rows = []
    for budget in args.budgets:
        mine = [r for r in records if r["budget"] == budget]
        methods = sorted({r["method"] for r in mine}, key=lambda m: -_final(mine, m))
        for method in methods:
            runs = [r for r in mine if r["method"] == method]
            cells = [_cell([_accs(r)[k] for r in runs]) for k in range(len(STAGES) + len(args.epochs))]
            rows.append([f"{budget:.2f}", method, f"{mean_std([r['macs_kept'] for r in runs])[0]:.3f}",
                         f"{mean_std([r['params_kept'] for r in runs])[0]:.3f}", *cells])
    return headers, rows


def _final(records: list[dict], method: str) -> float:
    return mean_std([_accs(r)[-1] for r in records if r["method"] == method])[0]


def _cell(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.4f}±{std:.4f}" if len(values) > 1 else f"{mean:.4f}"


def plot(records: list[dict], args, dense_acc: float) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(args.budgets), figsize=(6 * len(args.budgets), 4.5), squeeze=False)
    labels = ["recalibrated"] + [f"fine-tuned {e} ep" for e in args.epochs]
    for ax, budget in zip(axes[0], args.budgets):
        mine = [r for r in records if r["budget"] == budget]
        methods = sorted({r["method"] for r in mine}, key=lambda m: -_final(mine, m))
        width = 0.8 / len(labels)
        for k, label in enumerate(labels):
            stage = len(STAGES) - 1 + k
            values = [mean_std([_accs(r)[stage] for r in mine if r["method"] == m]) for m in methods]
            ax.bar([i + k * width for i in range(len(methods))], [v[0] for v in values], width,
                   yerr=[v[1] for v in values], label=label)
        ax.axhline(dense_acc, color="black", linestyle="--", linewidth=1, label="unpruned")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(methods))], methods, rotation=45, ha="right")
        ax.set_ylim(max(0.0, min([_accs(r)[1] for r in mine] + [dense_acc]) - 0.05), 1.0)
        ax.set_title(f"ResNet-20 / {args.data}: {budget:.0%} of MACs kept")
        ax.set_ylabel("test accuracy")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
