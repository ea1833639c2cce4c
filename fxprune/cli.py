"""The command line: ``fxprune prune resnet50 --ratio 0.5 --out pruned.pt``."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import torch


def build_model(name: str) -> torch.nn.Module:
    """A torchvision model by name (no weights are downloaded), or ``module:factory``.

    Example:
        >>> type(build_model("resnet18")).__name__
        'ResNet'
    """
    if ":" in name:
        import importlib
        module, factory = name.split(":", 1)
        return getattr(importlib.import_module(module), factory)()
    import torchvision
    known = torchvision.models.list_models()
    if name not in known:
        raise SystemExit(f"unknown model {name!r}; torchvision models: {', '.join(sorted(known))}")
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, weights=None, **kwargs)


def save_module(pruned: torch.fx.GraphModule, path: str) -> None:
    """Save a plain GraphModule that ``torch.load(path, weights_only=False)`` restores without fxprune."""
    import copy
    plain = copy.copy(pruned)
    plain.meta = {}
    for node in plain.graph.nodes:
        node.meta.pop("fxprune", None)
    torch.save(plain, path)


def _prune(args: argparse.Namespace) -> int:
    import fxprune
    from .report import size_report, size_table
    model = build_model(args.model).eval()
    if args.state_dict:
        model.load_state_dict(torch.load(args.state_dict, map_location="cpu"))
    size = args.input_size or (299 if args.model == "inception_v3" else 224)
    x = torch.randn(args.batch, 3, size, size) if not args.input_shape else torch.randn(*args.input_shape)
    policy = fxprune.Policy(importance=args.importance, ratio=args.ratio, round_to=args.round_to,
                            min_channels=args.min_channels, exact_only=args.exact_only)
    pruned = fxprune.transform(model, policy, (x,))
    report = size_report(pruned)
    check = fxprune.verify(pruned)
    report["oracle"] = {"max_error": check.max_error, "ok": check.ok, "exact": check.exact}
    report["model"], report["policy"] = args.model, policy.to_dict()
    if args.out:
        save_module(pruned, args.out)
        report["saved"] = args.out
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(size_table(report, only_changed=False))
        print(f"\noracle: max relative error {check.max_error:.2e} ({'ok' if check.ok else 'FAILED'});"
              f" plan+apply {sum(report['timings'].values()):.2f}s")
        if args.out:
            print(f"saved to {args.out}  (reload: torch.load({args.out!r}, weights_only=False))")
    return 0 if check.ok else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxprune", description="Structured channel pruning as a torch.fx pass.")
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("prune", help="prune a model and print widths, parameters and MACs before/after")
    pr.add_argument("model", help="torchvision model name (e.g. resnet50) or module:factory")
    pr.add_argument("--ratio", type=float, default=0.5, help="fraction of each group's channels to remove")
    pr.add_argument("--importance", default="l1", help="importance criterion name")
    pr.add_argument("--round-to", type=int, default=None, help="keep widths a multiple of N")
    pr.add_argument("--min-channels", type=int, default=1)
    pr.add_argument("--exact-only", action="store_true", help="prune only groups whose removal is exact")
    pr.add_argument("--input-size", type=int, default=None, help="square input size (default 224)")
    pr.add_argument("--input-shape", type=int, nargs="+", default=None, help="full example input shape")
    pr.add_argument("--batch", type=int, default=1)
    pr.add_argument("--state-dict", default=None, help="weights to load into the model first")
    pr.add_argument("--out", default=None, help="where to save the pruned GraphModule (torch.save)")
    pr.add_argument("--json", action="store_true", help="print the report as JSON")
    pr.set_defaults(func=_prune)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fxprune`` command.

    Example:
        >>> main(["prune", "squeezenet1_1", "--input-size", "64", "--json"])  # doctest: +SKIP
        0
    """
    import fxprune
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except fxprune.FxPruneError as err:
        print(f"fxprune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
