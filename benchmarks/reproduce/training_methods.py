"""ResNet-20 on Fashion-MNIST pruned *during training* to a MAC budget, method against method.

Every method starts from the same dense ResNet-20 (the cached seed-0 checkpoint of
``train_baselines.load_or_train``, 4 epochs) and gets the same number of training epochs
(``--epochs``, each of ``--epoch-images`` random training images, default all 60000; SGD
momentum 0.9, weight decay 5e-4, cosine from ``--lr`` to 0, batch 128):

* ``dense``: the unpruned model trained the same epochs (MACs kept 1.0);
* ``l1+ft``: one-shot ``Policy("l1", flops=b, scope="global")``, then fine-tuned all epochs;
* ``dynamic``: ``DynamicPruner`` (filter L1, global ranking, masks every ``--every`` steps,
  frozen after 75% of the steps), finalized at the end;
* ``dynamic+decor``: the same plus the decorrelation regulariser, one run per ``--alphas`` value;
* ``c2s2``: ``C2S2Pruner`` (loss- and compute-aware, gates at 10x the learning rate without
  weight decay, ``--c2s2-lambda``), search for half the steps, binary gates for the other half;
* ``slimming``: L1 on BN scales (``--slim-weight``) for half the steps, ``bn_scale`` pruning to
  the budget, fine-tuned the other half.

Budgets are fractions of MACs kept (``--budgets``, default 0.5 and 0.6), met through
``Policy(flops=b, scope="global")`` by every method (C2S2: its compute-aware stop, then the budget
enforced by lowest |gate|). The table gives test accuracy (mean ± std over seeds) and measured
MACs kept; JSON records ``{method, budget, alpha, macs_kept, accuracy, seed, ...}`` go to
``--out`` and a plot of accuracy against MACs kept next to it. Seeds change the data order and
the initial state of the training-time methods; the dense model is always the seed-0 checkpoint.
Differences of a few tenths of a point between methods are within seed noise: use ``--seeds 3``.
Our figures on our data only; they are not the papers' (ResNet-56 / CIFAR-10) numbers.

Usage:
    python benchmarks/reproduce/training_methods.py --seeds 3 --epochs 3           # the real run
    python benchmarks/reproduce/training_methods.py --subset 512 --epochs 1 --out /tmp/tm.json
Records are written after every run; a rerun with the same settings skips what is done.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch.utils.data import DataLoader, RandomSampler

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import fxprune  # noqa: E402
from benchmarks.reproduce.common import (RESULTS_DIR, accuracy, baseline, load_data, mean_std,  # noqa: E402
                                         measure, pyplot, set_threads, subset, write_json)
from benchmarks.reproduce.train_baselines import CACHE_DIR  # noqa: E402
from fxprune.training import C2S2Pruner, DynamicPruner, NetworkSlimming  # noqa: E402
from fxprune.training.finetune import cosine_factor  # noqa: E402

METHODS = ("dense", "l1+ft", "dynamic", "dynamic+decor", "c2s2", "slimming")
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", choices=["fashion_mnist", "digits"], default="fashion_mnist")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.6], help="fractions of MACs kept")
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.01, 0.1, 0.7], help="decorrelation weights")
    ap.add_argument("--epochs", type=float, default=3, help="training epochs of every method")
    ap.add_argument("--seeds", type=int, default=1, help="number of seeds (0..N-1)")
    ap.add_argument("--subset", type=int, default=None,
                    help="N training and N test images (a fast run; the dense model is then a throw-away "
                         "one trained 1 epoch on the subset unless the cached checkpoint exists)")
    ap.add_argument("--epoch-images", type=int, default=None,
                    help="training images drawn per epoch (default: the whole training set)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--every", type=int, default=16, help="dynamic pruning: steps between mask updates")
    ap.add_argument("--c2s2-lambda", type=float, default=0.5, help="C2S2 initial λ (see the docstring)")
    ap.add_argument("--slim-weight", type=float, default=1e-4, help="slimming: L1 weight on BN scales")
    ap.add_argument("--baseline-epochs", type=int, default=4)
    ap.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "training_methods.json")
    ap.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --out)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="ignore records already in --out")
    return ap.parse_args(argv)


class Run:
    """One method's training budget: a loader, a step count, a cosine schedule over it."""

    def __init__(self, args, train, seed: int):
        self.args, self.seed = args, seed
        generator = torch.Generator().manual_seed(seed)
        if args.epoch_images and args.epoch_images < len(train):  # each epoch: a fresh random draw
            sampler = RandomSampler(train, num_samples=args.epoch_images, generator=generator)
            self.loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler)
        else:
            self.loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=generator)
        self.total = max(1, int(round(args.epochs * len(self.loader))))

    def optimizer(self, params, gates=()) -> torch.optim.Optimizer:
        groups = [{"params": [p for p in params if p.requires_grad]}]
        if gates:
            groups.append({"params": list(gates), "lr": 10 * self.args.lr, "weight_decay": 0.0})
        return torch.optim.SGD(groups, lr=self.args.lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def train(self, model, steps: int, opt=None, regularizer: Callable | None = None,
              after: Callable | None = None) -> None:
        """``steps`` SGD steps (cycling over the loader), cosine from lr to 0 over them."""
        opt = opt or self.optimizer(model.parameters())
        base = [g["lr"] for g in opt.param_groups]
        model.train()
        done = 0
        while done < steps:
            for x, y in self.loader:
                for group, lr in zip(opt.param_groups, base):
                    group["lr"] = lr * cosine_factor(done, steps)
                task = F.cross_entropy(model(x), y)
                loss = task + regularizer() if regularizer is not None else task
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {float(loss)} at step {done}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if after is not None:
                    after(task.detach())
                done += 1
                if done >= steps:
                    return


def policy(budget: float, **kw) -> fxprune.Policy:
    return fxprune.Policy(flops=budget, scope="global", **kw)


def run_dense(run: Run, dense, example, budget, alpha):
    model = copy.deepcopy(dense)
    run.train(model, run.total)
    return model


def run_l1(run: Run, dense, example, budget, alpha):
    pruned = fxprune.transform(dense, policy(budget, importance="l1"), example)
    run.train(pruned, run.total)
    return pruned


def run_dynamic(run: Run, dense, example, budget, alpha):
    model = copy.deepcopy(dense)
    pruner = DynamicPruner(model, policy(budget), example, every=run.args.every,
                           freeze_at=int(0.75 * run.total), decorrelation=alpha or 0.0)
    run.train(model, run.total, regularizer=pruner.regularizer, after=lambda loss: pruner.step())
    return pruner.finalize()


def run_c2s2(run: Run, dense, example, budget, alpha):
    model = copy.deepcopy(dense)
    half = max(1, run.total // 2)
    pruner = C2S2Pruner(model, policy(budget), example, lam=run.args.c2s2_lambda,
                        cost="both", search_steps=half, finetune_steps=max(1, run.total - half))
    opt = run.optimizer(model.parameters(), gates=list(pruner.parameters()))
    run.train(model, run.total, opt=opt, regularizer=pruner.regularizer, after=lambda loss: pruner.step(loss=loss))
    return pruner.finalize()


def run_slimming(run: Run, dense, example, budget, alpha):
    model = copy.deepcopy(dense)
    half = max(1, run.total // 2)
    slim = NetworkSlimming(model, policy(budget), example, weight=run.args.slim_weight)
    run.train(model, half, regularizer=slim.regularizer)
    pruned = slim.finalize()
    run.train(pruned, max(1, run.total - half))
    return pruned


RUNNERS = {"dense": run_dense, "l1+ft": run_l1, "dynamic": run_dynamic, "dynamic+decor": run_dynamic,
           "c2s2": run_c2s2, "slimming": run_slimming}


def jobs(args) -> list[tuple[str, float, float | None]]:
    """(method, budget, alpha) in run order; dense once (budget 1.0)."""
    out = []
    for method in args.methods:
        if method == "dense":
            out.append((method, 1.0, None))
            continue
        for budget in args.budgets:
            alphas = args.alphas if method == "dynamic+decor" else [None]
            out.extend((method, budget, a) for a in alphas)
    return out


def label(method: str, alpha: float | None) -> str:
    return method if alpha is None else f"{method} α={alpha:g}"


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    set_threads(args.threads)
    splits = load_data(args.data)
    train = subset(splits.train, args.subset, seed=0)
    test = subset(splits.test, args.subset, seed=1)
    dense, origin = baseline("resnet20", args.data, args.baseline_epochs, 0, splits,
                             cache_dir=args.cache_dir, tiny_if_absent=args.subset)
    example = (test.tensors[0][:2],)
    dense_macs, _ = measure(dense, example[0])
    settings = {"epochs": args.epochs, "subset": args.subset, "epoch_images": args.epoch_images, "data": args.data, "lr": args.lr,
                "every": args.every, "c2s2_lambda": args.c2s2_lambda, "slim_weight": args.slim_weight}
    payload = {"settings": settings, "dense_model": origin, "dense_accuracy": accuracy(dense, test),
               "records": []}
    if args.out.is_file() and not args.fresh:
        old = json.loads(args.out.read_text())
        if old.get("settings") == settings:
            payload["records"] = old["records"]
    done = {(r["method"], r["budget"], r["alpha"], r["seed"]) for r in payload["records"]}
    print(f"dense ResNet-20: {origin}; test accuracy {payload['dense_accuracy']:.4f}")
    for seed in range(args.seeds):
        for method, budget, alpha in jobs(args):
            if (method, budget, alpha, seed) in done:
                continue
            torch.manual_seed(seed)
            run = Run(args, train, seed)
            started = time.perf_counter()
            model = RUNNERS[method](run, dense, example, budget, alpha)
            macs, params = measure(model, example[0])
            record = {"method": method, "budget": budget, "alpha": alpha, "seed": seed,
                      "macs_kept": macs / dense_macs, "accuracy": accuracy(model, test),
                      "steps": run.total, "seconds": time.perf_counter() - started}
            if method in ("dynamic", "dynamic+decor", "c2s2"):  # straight out of finalize(): the oracle holds
                record["verified"] = bool(fxprune.verify(model).ok)
            payload["records"].append(record)
            write_json(args.out, payload)
            print(f"seed {seed} {label(method, alpha):22s} budget {budget:.2f}: MACs kept "
                  f"{record['macs_kept']:.3f}, accuracy {record['accuracy']:.4f} ({record['seconds']:.0f} s)")
    print(table(payload["records"]))
    plot(payload["records"], args.plot or args.out.with_suffix(".png"))
    return payload


def summarise(records: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["budget"], r["method"], r["alpha"]), []).append(r)
    rows = []
    for (budget, method, alpha), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1], kv[0][2] or 0)):
        acc, acc_sd = mean_std([r["accuracy"] for r in rs])
        macs, _ = mean_std([r["macs_kept"] for r in rs])
        rows.append({"budget": budget, "label": label(method, alpha), "method": method, "macs": macs,
                     "accuracy": acc, "std": acc_sd, "seeds": len(rs)})
    return rows


def table(records: list[dict]) -> str:
    rows = [[r["budget"], r["label"], f"{r['macs']:.3f}", f"{100 * r['accuracy']:.2f} ± {100 * r['std']:.2f}",
             r["seeds"]] for r in summarise(records)]
    return tabulate(rows, headers=["budget (MACs kept)", "method", "MACs kept", "test accuracy %", "seeds"])


def plot(records: list[dict], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = summarise(records)
    for r in rows:
        if r["method"] == "dense":
            ax.axhline(100 * r["accuracy"], color="k", linestyle="--", linewidth=1, label="dense (MACs 1.0)")
    for name in dict.fromkeys(r["label"] for r in rows if r["method"] != "dense"):
        pts = sorted((r["macs"], r["accuracy"], r["std"]) for r in rows if r["label"] == name)
        ax.errorbar([p[0] for p in pts], [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts],
                    marker="o", capsize=3, label=name, linestyle="-" if len(pts) > 1 else "none")
    ax.set_xlabel("fraction of MACs kept")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("ResNet-20 / Fashion-MNIST: training-time pruning at equal MAC budgets")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
