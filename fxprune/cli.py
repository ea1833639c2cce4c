"""The command line: ``fxprune prune | bench | report | demo``.

``fxprune prune resnet50 --ratio 0.5 --out pruned.pt`` prunes and prints widths, parameters and
MACs before/after; ``bench``, ``report`` and ``demo`` live in :mod:`fxprune.cli_commands`.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import torch


def build_model(name: str) -> torch.nn.Module:
    """A torchvision model by name (no weights are downloaded), a timm model name when timm is
    installed, or ``module:factory``.

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
        try:
            import timm
        except ImportError:
            timm = None
        if timm is not None and name in timm.list_models():
            return timm.create_model(name, pretrained=False)
        raise SystemExit(f"unknown model {name!r}; torchvision models: {', '.join(sorted(known))}"
                         + ("" if timm is None else "; or any name of timm.list_models()"))
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


def add_model_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The model and its example input: shared by ``prune``, ``bench`` and ``report``."""
    p.add_argument("model", nargs=None if required else "?",
                   help="torchvision model name (e.g. resnet50), timm name, or module:factory")
    p.add_argument("--input-size", type=int, default=None, help="square input size (default 224)")
    p.add_argument("--input-shape", type=int, nargs="+", default=None, help="full example input shape")
    p.add_argument("--batch", type=int, default=1, help="batch size of the example input")
    p.add_argument("--state-dict", default=None, help="weights to load into the model first")


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    """Policy flags; each one given on the command line overrides the ``--policy`` file."""
    g = p.add_argument_group("policy (flags override --policy file values)")
    g.add_argument("--policy", default=None, metavar="FILE",
                   help="YAML (.yaml/.yml, needs pyyaml) or JSON file whose keys are Policy fields")
    g.add_argument("--ratio", type=float, default=None,
                   help="fraction of each group's channels to remove (default 0.5)")
    g.add_argument("--importance", default=None, help="importance criterion name (default l1)")
    g.add_argument("--flops", type=float, default=None, help="fraction of MACs to keep (a budget)")
    g.add_argument("--params", type=float, default=None, help="fraction of parameters to keep (a budget)")
    g.add_argument("--latency", type=float, default=None,
                   help="fraction of the latency to keep (a budget), predicted from a lookup table "
                        "measured once per device and cached (see fxprune.latency_lut)")
    g.add_argument("--scope", choices=("local", "global"), default=None, help="rank channels per group or globally")
    g.add_argument("--normalize", choices=("mean", "max", "lamp", "none"), default=None,
                   help="score normalisation across groups (global scope)")
    g.add_argument("--allocation", choices=("uniform", "cost"), default=None, help="how a budget is shared")
    g.add_argument("--round-to", type=int, default=None, help="keep widths a multiple of N")
    g.add_argument("--min-channels", type=int, default=None, help="narrowest width a group may get (default 1)")
    g.add_argument("--exact-only", action="store_true", default=None,
                   help="prune only groups whose removal is exact")
    g.add_argument("--ignore", nargs="+", default=None, metavar="NAME", help="module names never pruned")


def policy_from_args(args: argparse.Namespace):
    """The Policy given by ``--policy`` and the policy flags (flags win).

    Example:
        >>> ns = parser().parse_args(["prune", "resnet18", "--ratio", "0.3"])
        >>> policy_from_args(ns).ratio
        0.3
    """
    import fxprune
    from .policy_file import merge, read_policy_file
    flags = {key: getattr(args, key) for key in ("ratio", "importance", "flops", "params", "latency", "scope",
                                                 "normalize", "allocation", "round_to", "min_channels",
                                                 "exact_only", "ignore")}
    file_values = read_policy_file(args.policy) if args.policy else {}
    return fxprune.Policy(**merge(file_values, flags))


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, tuple]:
    """The model (eval mode, weights loaded) and its example inputs from the shared arguments."""
    model = build_model(args.model).eval()
    if args.state_dict:
        model.load_state_dict(torch.load(args.state_dict, map_location="cpu"))
    size = args.input_size or (299 if args.model == "inception_v3" else 224)
    x = torch.randn(args.batch, 3, size, size) if not args.input_shape else torch.randn(*args.input_shape)
    return model, (x,)


def _prune(args: argparse.Namespace) -> int:
    import warnings
    import fxprune
    from .errors import BudgetWarning
    from .report import size_report, size_table
    model, inputs = load_model(args)
    policy = policy_from_args(args)
    with warnings.catch_warnings():  # a missed budget is said once, below, with exit code 3
        warnings.simplefilter("ignore", BudgetWarning)
        pruned = fxprune.transform(model, policy, inputs)
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
    sel = pruned.meta["fxprune"].selection
    if check.ok and sel.get("met") is False:
        print(f"fxprune: budget not met: asked to keep {sel['target']:.2%} of the {sel['metric']}, reached "
              f"{sel['achieved']:.2%}: {sel.get('reason', '')}", file=sys.stderr)
        return 3
    return 0 if check.ok else 1


def parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fxprune`` command, with all subcommands.

    Example:
        >>> parser().parse_args(["prune", "resnet18", "--json"]).json
        True
    """
    from . import cli_commands
    p = argparse.ArgumentParser(prog="fxprune", description="Structured channel pruning as a torch.fx pass.")
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("prune", help="prune a model and print widths, parameters and MACs before/after",
                        description="Prune a model and print each group's width, parameters and MACs "
                                    "before and after, and the mask oracle's error. Example: fxprune prune "
                                    "resnet50 --policy policy.yaml --round-to 8 --out pruned.pt")
    add_model_arguments(pr)
    add_policy_arguments(pr)
    pr.add_argument("--out", default=None, help="where to save the pruned GraphModule (torch.save)")
    pr.add_argument("--json", action="store_true", help="print the report as JSON")
    pr.set_defaults(func=_prune)
    cli_commands.add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fxprune`` command.

    Example:
        >>> import contextlib, io, json
        >>> with contextlib.redirect_stdout(io.StringIO()) as out:
        ...     code = main(["prune", "squeezenet1_1", "--input-size", "64", "--json"])
        >>> code, json.loads(out.getvalue())["oracle"]["ok"]
        (0, True)
    """
    import fxprune
    from .bench import BenchError
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (fxprune.FxPruneError, BenchError) as err:
        print(f"fxprune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
