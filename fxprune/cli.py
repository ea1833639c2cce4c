"""The command line: ``fxprune prune | bench | report | demo``.

``fxprune prune resnet50 --ratio 0.5 --out pruned.pt`` prunes and prints how the model was
captured (``--capture auto|fx|export``), widths, parameters and MACs before/after, and saves the
pruned model in fxprune's safe graph format (``fxprune.load("pruned.pt")``; ``--format pickle``
for a pickled GraphModule, which loads only with ``trusted=True``); ``bench``, ``report`` and
``demo`` live in :mod:`fxprune.cli_commands`. The arguments they share are in
:mod:`fxprune.cli_args`, the model loading in :mod:`fxprune.cli_model`, the output files in
:mod:`fxprune.cli_io`; the ``fxprune`` script itself is :mod:`fxprune.launcher`.

Exit codes: 0 done, 1 the pruned model failed the oracle check, 2 an error (one line
``fxprune: error: ...`` on stderr naming the argument and what to do), 3 a budget was not met,
130 interrupted (Ctrl-C; one line saying what, if anything, was written; no half-written file).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .cli_args import (CliError, add_capture_argument, add_model_arguments, add_policy_arguments, capture_line,
                       policy_from_args)
from .cli_io import WRITTEN, check_out_path, interrupted_message, save_graph, save_module
from .cli_model import build_model, load_model

__all__ = ["main", "parser", "build_model", "load_model", "policy_from_args", "save_module", "save_graph",
           "add_model_arguments", "add_policy_arguments", "add_capture_argument", "CliError"]


SAVE_FORMATS = ("graph", "pickle")


def _prune(args: argparse.Namespace) -> int:
    import warnings
    import fxprune
    from .errors import BudgetWarning
    from .report import size_report, size_table
    if args.format and not args.out:
        raise CliError(f"--format {args.format}: says how to save the pruned model; give --out FILE too")
    if args.out:
        check_out_path(args.out, "--out")  # before the work, not after a long prune
    model, inputs = load_model(args)
    policy = policy_from_args(args)
    with warnings.catch_warnings():  # a missed budget is said once, below, with exit code 3
        warnings.simplefilter("ignore", BudgetWarning)
        pruned = fxprune.transform(model, policy, inputs, capture=args.capture)
    report = size_report(pruned)
    check = fxprune.verify(pruned)
    report["oracle"] = {"max_error": check.max_error, "ok": check.ok, "exact": check.exact}
    report["model"], report["policy"] = args.model, policy.to_dict()
    report["capture"] = dict(pruned.meta["fxprune"].capture)
    fmt = args.format or "graph"
    if args.out:
        if fmt == "pickle":
            save_module(pruned, args.out)
        else:
            save_graph(pruned, args.out, inputs)
        report["saved"], report["saved_format"] = args.out, fmt
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(capture_line(report["capture"]))
        print(size_table(report, only_changed=False))
        print(f"\noracle: max relative error {check.max_error:.2e} ({'ok' if check.ok else 'FAILED'});"
              f" plan+apply {sum(report['timings'].values()):.2f}s")
        if args.out:
            print(_saved_line(args.out, fmt))
    sel = pruned.meta["fxprune"].selection
    if check.ok and sel.get("met") is False:
        print(f"fxprune: budget not met: asked to keep {sel['target']:.2%} of the {sel['metric']}, reached "
              f"{sel['achieved']:.2%}: {sel.get('reason', '')}", file=sys.stderr)
        return 3
    return 0 if check.ok else 1


def _saved_line(path: str, fmt: str) -> str:
    if fmt == "pickle":
        return (f"saved to {path} as a pickled GraphModule: loading it runs code from the file, so only if you "
                f"trust it: fxprune.load({path!r}, trusted=True) or torch.load({path!r}, weights_only=False)")
    return f"saved to {path}  (safe graph format; reload: fxprune.load({path!r}))"


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
    add_capture_argument(pr)
    add_policy_arguments(pr)
    pr.add_argument("--out", default=None, metavar="FILE",
                    help="where to save the pruned model (checked before pruning, written whole or not at all), "
                         "in fxprune's safe graph format: fxprune.load(FILE) reads it without running code from "
                         "the file")
    pr.add_argument("--format", choices=SAVE_FORMATS, default=None,
                    help="graph (default): the safe format above; pickle: a pickled GraphModule, for tools that "
                         "need one; loading it runs code from the file, so it needs fxprune.load(FILE, "
                         "trusted=True) (or torch.load(FILE, weights_only=False)) and --trusted in bench/report")
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
    from .bench.latency import BenchError
    from .errors import FxPruneError
    WRITTEN.clear()
    try:
        args = parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        print(interrupted_message(), file=sys.stderr)
        return 130
    except (FxPruneError, BenchError) as err:
        print(f"fxprune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
