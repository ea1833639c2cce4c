"""Policies from a YAML or JSON file: ``fxprune prune resnet50 --policy policy.yaml``.

A policy file is a mapping whose keys are :class:`fxprune.Policy` fields::

    importance: l1
    flops: 0.5            # keep 50% of the MACs
    scope: global
    round_to: 8
    ignore: [fc]          # module names
    overrides:            # module names or fnmatch patterns -> ratio
      "layer4.*": 0.7
      layer1.0.conv1: 0.0
    prune_outputs: false  # true: outputs may get narrower; or a list of output indices/names

Module types cannot be named in a file (``ignore`` and ``overrides`` take names and patterns
only). YAML needs ``pyyaml`` (``pip install 'fxprune[yaml]'``); JSON needs nothing.

Example:
    >>> import json, os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "policy.json")
    >>> with open(path, "w") as f:
    ...     json.dump({"importance": "l2", "ratio": 0.25, "ignore": ["fc"]}, f)
    >>> policy_from_file(path, ratio=0.3).to_dict()["ratio"]
    0.3
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import PolicyError
from .policy import Policy

FILE_KEYS = ("importance", "ratio", "scope", "flops", "params", "latency", "device", "round_to",
             "min_channels", "exact_only", "normalize", "allocation", "ignore", "overrides", "structures",
             "prune_outputs")
BUDGET_KEYS = ("flops", "params", "latency")
YAML_SUFFIXES = (".yaml", ".yml")


def _parse(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in YAML_SUFFIXES:
        try:
            import yaml
        except ImportError as err:
            raise PolicyError(f"policy file {str(path)!r} is YAML, which needs pyyaml: "
                              "pip install pyyaml (or pip install 'fxprune[yaml]'), "
                              "or write the policy as a .json file") from err
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise PolicyError(f"policy file {str(path)!r} is not valid YAML: {err}") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise PolicyError(f"policy file {str(path)!r} is not valid JSON ({err}); "
                          "name YAML files *.yaml or *.yml") from err


def read_policy_file(path: str | Path) -> dict:
    """The checked ``Policy`` keyword arguments stored in a YAML (``.yaml``/``.yml``) or JSON file.

    Unknown keys raise :class:`fxprune.PolicyError` listing the valid ones; values are checked
    later by ``Policy`` itself.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "p.json")
        >>> _ = open(path, "w").write('{"ratio": 0.5, "overrides": {"layer4.*": 0.7}}')
        >>> read_policy_file(path)
        {'ratio': 0.5, 'overrides': {'layer4.*': 0.7}}
    """
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"policy file {str(path)!r} does not exist")
    data = _parse(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PolicyError(f"policy file {str(path)!r} must hold a mapping of Policy fields, "
                          f"got a {type(data).__name__}; valid keys: {', '.join(FILE_KEYS)}")
    unknown = sorted(str(k) for k in data if k not in FILE_KEYS)
    if unknown:
        raise PolicyError(f"policy file {str(path)!r}: unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"valid keys: {', '.join(FILE_KEYS)}")
    ignore = data.get("ignore", ())
    if isinstance(ignore, str):
        data["ignore"] = ignore = [ignore]
    if not isinstance(ignore, (list, tuple)) or not all(isinstance(i, str) for i in ignore):
        raise PolicyError(f"policy file {str(path)!r}: 'ignore' must be a list of module names, "
                          f"got {ignore!r}")
    overrides = data.get("overrides", {})
    if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
        raise PolicyError(f"policy file {str(path)!r}: 'overrides' must map module names or "
                          f"name patterns to ratios (e.g. {{'layer4.*': 0.7}}), got {overrides!r}")
    structures = data.get("structures", {})
    if not isinstance(structures, dict) or not all(isinstance(k, str) for k in structures):
        raise PolicyError(f"policy file {str(path)!r}: 'structures' must map group kinds to ratios "
                          f"(e.g. {{'heads': 0.25, 'mlp': 0.5}}), got {structures!r}")
    outputs = data.get("prune_outputs", False)
    if isinstance(outputs, (str, int)) and not isinstance(outputs, bool):
        data["prune_outputs"] = outputs = [outputs]
    if not isinstance(outputs, (bool, list)):
        raise PolicyError(f"policy file {str(path)!r}: 'prune_outputs' must be true, false or a list of "
                          f"output indices or names (e.g. [0, logits]), got {outputs!r}")
    return data


def merge(file_values: dict, flag_values: dict) -> dict:
    """File values overridden by the flags that were given (``None`` means not given).

    A budget flag (``flops``, ``params``, ``latency``) or an explicit ``ratio`` replaces any
    budget from the file, so the command line always says what is removed.

    Example:
        >>> merge({"flops": 0.5, "importance": "l2"}, {"ratio": 0.3, "importance": None})
        {'importance': 'l2', 'ratio': 0.3}
    """
    given = {k: v for k, v in flag_values.items() if v is not None}
    merged = dict(file_values)
    if any(k in given for k in (*BUDGET_KEYS, "ratio")):
        for key in BUDGET_KEYS:
            merged.pop(key, None)
    merged.update(given)
    return merged


def policy_from_file(path: str | Path, **flags: Any) -> Policy:
    """A :class:`fxprune.Policy` from a policy file, with ``flags`` (not ``None``) taking precedence.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "p.json")
        >>> _ = open(path, "w").write('{"importance": "l2", "flops": 0.6}')
        >>> policy_from_file(path).budget
        ('macs', 0.6)
    """
    return Policy(**merge(read_policy_file(path), flags))
