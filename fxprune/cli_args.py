"""Arguments shared by the ``fxprune`` subcommands, and the error they raise.

:mod:`fxprune.cli` (``prune``, the parser, ``main``) and :mod:`fxprune.cli_commands` (``bench``,
``report``, ``demo``) both import from here; neither imports the other's helpers, so the command
line has no import cycle.

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> add_model_arguments(p); add_policy_arguments(p)
    >>> policy_from_args(p.parse_args(["resnet18", "--ratio", "0.3"])).ratio
    0.3
"""
from __future__ import annotations

import argparse

from .errors import FxPruneError

CAPTURE_MODES = ("auto", "fx", "export")  # fxprune.capture.CAPTURE_MODES, without importing torch here
POLICY_FLAGS = ("ratio", "importance", "flops", "params", "latency", "scope", "normalize", "allocation",
                "round_to", "min_channels", "exact_only", "ignore", "prune_outputs")


class CliError(FxPruneError):
    """A command-line argument cannot be used; the message names the argument and what to do.

    ``fxprune`` prints it as one line, ``fxprune: error: <message>``, and exits with code 2.

    Example:
        >>> str(CliError("--out x.pt: the folder 'x' does not exist; create it first"))
        "--out x.pt: the folder 'x' does not exist; create it first"
    """


def add_model_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The model and its example input: shared by ``prune``, ``bench`` and ``report``.

    Example:
        >>> p = argparse.ArgumentParser(); add_model_arguments(p)
        >>> p.parse_args(["mypkg.models:small_net", "--input-size", "32"]).input_size
        32
    """
    p.add_argument("model", nargs=None if required else "?",
                   help="torchvision model name (e.g. resnet50), timm name, or module:factory (the "
                        "current folder is searched first for the module, as `python -m` does)")
    p.add_argument("--input-size", type=int, default=None, help="square input size (default 224)")
    p.add_argument("--input-shape", type=int, nargs="+", default=None, help="full example input shape")
    p.add_argument("--batch", type=int, default=1, help="batch size of the example input")
    p.add_argument("--state-dict", default=None, metavar="FILE",
                   help="weights to load into the model first: a file of torch.save(model.state_dict()), "
                        "read with torch.load(weights_only=True) (no pickled code is run)")


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    """Policy flags; each one given on the command line overrides the ``--policy`` file.

    Example:
        >>> p = argparse.ArgumentParser(); add_policy_arguments(p)
        >>> p.parse_args(["--round-to", "8"]).round_to
        8
    """
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
    g.add_argument("--prune-outputs", nargs="*", default=None, metavar="OUTPUT",
                   help="let channels that reach a model output be pruned (that output gets narrower): alone, "
                        "every output; with values, only these outputs (indices in the returned tuple, or dict "
                        "keys such as logits). Without it every output keeps its width")


def add_capture_argument(p: argparse.ArgumentParser) -> None:
    """``--capture {auto,fx,export}``: the front end that captures the model, passed to
    ``fxprune.transform(..., capture=...)``; shared by every command that prunes.

    Example:
        >>> p = argparse.ArgumentParser(); add_capture_argument(p)
        >>> p.parse_args([]).capture, p.parse_args(["--capture", "export"]).capture
        ('auto', 'export')
    """
    p.add_argument("--capture", choices=CAPTURE_MODES, default="auto",
                   help="how the model is captured: fx (torch.fx symbolic trace, fast), export (torch.export, "
                        "for models with Python control flow fx cannot trace) or auto (default: fx; when fx fails "
                        "inside timm layers fxprune has rules for, fx again with those kept whole; then "
                        "export); the report says which one ran and why")


def capture_line(capture: dict) -> str:
    """The report line saying which front end captured the model and why (``plan.capture``).

    Example:
        >>> capture_line({"frontend": "export", "reason": "capture='export' was asked for"})
        "captured with torch.export: capture='export' was asked for"
    """
    frontend = capture.get("frontend")
    name = {"fx": "torch.fx", "export": "torch.export"}.get(frontend, str(frontend))
    return f"captured with {name}: {capture.get('reason', '')}"


def add_trusted_argument(p: argparse.ArgumentParser) -> None:
    """``--trusted``: allow loading a ``--pruned`` file whose pickle runs code when loaded.

    Example:
        >>> p = argparse.ArgumentParser(); add_trusted_argument(p)
        >>> p.parse_args([]).trusted, p.parse_args(["--trusted"]).trusted
        (False, True)
    """
    p.add_argument("--trusted", action="store_true",
                   help="the --pruned file comes from a source you trust: allow it to run the code "
                        "pickled in it while loading (a pickled module, e.g. from fxprune prune --format "
                        "pickle or torch.save(module), needs this; the default graph format of fxprune "
                        "prune --out and fxprune.save does not); without it such a file is refused")


def prune_outputs_flag(values: list[str] | None):
    """``--prune-outputs [OUTPUT ...]`` as a ``Policy.prune_outputs`` value: not given -> None (the
    policy file or the default decides), given alone -> True, with values -> indices and names.

    Example:
        >>> prune_outputs_flag(None), prune_outputs_flag([]), prune_outputs_flag(["0", "logits"])
        (None, True, [0, 'logits'])
    """
    if values is None:
        return None
    if not values:
        return True
    return [int(v) if v.isdigit() else v for v in values]


def policy_from_args(args: argparse.Namespace):
    """The Policy given by ``--policy`` and the policy flags (flags win).

    Example:
        >>> p = argparse.ArgumentParser(); add_policy_arguments(p)
        >>> policy_from_args(p.parse_args(["--ratio", "0.3", "--importance", "l2"])).importance
        'l2'
    """
    from .policy import Policy
    from .policy_file import merge, read_policy_file
    flags = {key: getattr(args, key) for key in POLICY_FLAGS}
    flags["prune_outputs"] = prune_outputs_flag(flags["prune_outputs"])
    file_values = read_policy_file(args.policy) if args.policy else {}
    return Policy(**merge(file_values, flags))
