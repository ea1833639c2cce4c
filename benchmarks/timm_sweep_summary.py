"""Counts of the timm sweep by outcome, before/after: ok-exact, ok-approx, partial (>50% of the
prunable channels blocked), no-reduction, failure; then fxprune ok, oracle ok, captures through
export and the mean and max blocked share.

    python benchmarks/timm_sweep_summary.py benchmarks/results/zoo_timm_after.json [RERUN.json ...]
    python benchmarks/timm_sweep_summary.py BEFORE.json --exactness EXACTNESS.json   # older sweeps

Reads the JSON of ``zoo_coverage.py --libraries timm``. Rows of sweeps made before the rows
recorded exactness (``approximate_groups``) take it from ``--exactness`` (a list of
``{"model", "pruned", "approx"}`` made by planning each model with the same policy). Rows of
later files (re-runs of some models, e.g. with a longer ``--timeout``) replace earlier ones.
"""
from __future__ import annotations

import argparse
import collections
import json

OUTCOMES = ("ok-exact", "ok-approx", "partial", "no-reduction", "failure")


def outcome(fx: dict, approx: int | None) -> str:
    """The outcome of one model's fxprune row."""
    if not fx.get("ok"):
        return "failure"
    if fx.get("params_ratio", 1.0) >= 0.999:
        return "no-reduction"
    if fx.get("blocked", {}).get("share", 0.0) > 0.5:
        return "partial"
    if approx is None:
        approx = fx.get("approximate_groups")
    return "ok-exact" if approx == 0 else "ok-approx" if approx is not None else "ok (exactness not recorded)"


def summarise(rows: list[dict], exactness: dict[str, int]) -> tuple[collections.Counter, dict]:
    counts: collections.Counter = collections.Counter()
    which: dict = collections.defaultdict(list)
    for r in rows:
        o = outcome(r.get("fx") or {}, exactness.get(r["model"]))
        counts[o] += 1
        which[o].append(r["model"])
    return counts, which


def coverage_line(rows: list[dict]) -> str:
    """fxprune ok, oracle ok, captures through export, and the blocked share of prunable channels
    (mean over the models that transform, max with its model)."""
    fx = [r.get("fx") or {} for r in rows]
    ok = [(r["model"], f) for r, f in zip(rows, fx) if f.get("ok")]
    shares = [((f.get("blocked") or {}).get("share", 0.0), m) for m, f in ok]
    line = (f"fxprune ok {len(ok)}/{len(rows)}, oracle ok {sum(1 for f in fx if (f.get('oracle') or {}).get('ok'))}"
            f"/{len(rows)}, through export {sum(1 for f in fx if f.get('capture') == 'export')}")
    if shares:
        top = max(shares)
        line += (f"; blocked share of prunable channels: mean {100 * sum(s for s, _ in shares) / len(shares):.2f}%, "
                 f"max {100 * top[0]:.1f}% ({top[1]})")
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweeps", nargs="+", help="zoo_coverage JSON files; a later file's rows replace earlier ones")
    ap.add_argument("--exactness", default=None)
    ap.add_argument("--list", action="store_true", help="name the models of every outcome but ok-*")
    args = ap.parse_args()
    by_model: dict = {}
    for path in args.sweeps:
        with open(path) as f:
            by_model.update((r["model"], r) for r in json.load(f)["rows"])
    rows = list(by_model.values())
    exactness = {}
    if args.exactness:
        exactness = {e["model"]: e["approx"] for e in json.load(open(args.exactness)) if "approx" in e}
    counts, which = summarise(rows, exactness)
    print(", ".join(f"{o} {counts.get(o, 0)}" for o in OUTCOMES) + f" (of {len(rows)})")
    print(coverage_line(rows))
    extra = set(counts) - set(OUTCOMES)
    for o in extra:
        print(f"{o}: {counts[o]}")
    if args.list:
        for o in ("partial", "no-reduction", "failure"):
            if which.get(o):
                print(f"{o}: {', '.join(which[o])}")


if __name__ == "__main__":
    main()
