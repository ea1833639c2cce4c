"""The analysis half of the pipeline: capture -> shapes -> coupling, shared by plan, rebuild and
the latency table.

Example:
    >>> import torch
    >>> from fxprune import Policy
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
    >>> gm, an, groups, *_ = analyse_model(m, Policy(), (torch.randn(1, 3, 8, 8),), {})
    >>> gm.meta["fxprune_capture"]["frontend"], len(groups)
    ('fx', 2)
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterable

import torch

from .capture import CaptureInfo, capture as capture_graph, export_fallback, first_line, timm_leaf_retry
from .coupling.build import analyse
from .coupling.groups import build_groups
from .errors import FxPruneError, StageError
from .gc_pause import paused_collector
from .model_checks import check_model, unwrap
from .shapes import propagate


@contextlib.contextmanager
def stage(name: str, timings: dict):
    """Name and time a stage (time spent in it again is added); re-raise foreign errors as
    'stage X failed: why'.

    Example:
        >>> timings = {}
        >>> with stage("demo", timings):
        ...     pass
        >>> "demo" in timings
        True
    """
    start = time.perf_counter()
    try:
        yield
    except FxPruneError:
        raise
    except Exception as err:
        raise StageError(name, None, f"{type(err).__name__}: {err}") from err
    finally:  # a stage entered again (the model checks before the trace, a retry) adds up
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def _captured_with_shapes(model: torch.nn.Module, inputs: tuple, timings: dict, how: str,
                          leaf_modules: Iterable, concrete_args: dict | None):
    """Capture and propagate shapes; an FX graph the shape pass cannot run (a branch baked
    wrongly at trace time) is traced again with timm's leaf layers kept whole (where the model has
    some not kept yet, ``timm_leaf_retry``), else, with ``auto``, captured again with torch.export."""
    with stage("trace", timings):
        gm, info = capture_graph(model, inputs, how, leaf_modules, concrete_args)
    try:
        with stage("shapes", timings):
            propagate(gm, inputs)
        return gm, info
    except FxPruneError as shape_err:
        if info.frontend != "fx" or how == "export":
            raise
        why = StageError("shapes", None, f"the FX graph did not run: {first_line(shape_err)}")
        if info.fx_error is None:  # not yet retried: timm's layers kept whole, all of them
            with stage("trace", timings):
                retried = timm_leaf_retry(model, leaf_modules, concrete_args, why, requested=how)
            if retried is not None:
                with contextlib.suppress(FxPruneError), stage("shapes", timings):
                    propagate(retried[0], inputs)
                    return retried
        if how == "fx":
            raise
        try:
            with stage("trace", timings):
                gm, info = export_fallback(model, inputs, concrete_args, why)
            with stage("shapes", timings):
                propagate(gm, inputs)
        except FxPruneError:
            raise shape_err from None
        return gm, info


def analyse_model(model: torch.nn.Module, policy, inputs: tuple, timings: dict,
                  leaf_modules: Iterable = (), concrete_args: dict | None = None,
                  capture: str = "auto") -> tuple:
    """Stages capture, shapes and coupling: ``(traced, analysis, groups, component map, channel index)``.

    The front end used and why is at ``traced.meta["fxprune_capture"]`` (``CaptureInfo.to_dict``).

    Example:
        >>> import torch
        >>> from fxprune import Policy
        >>> gm, *_ = analyse_model(torch.nn.Linear(4, 2), Policy(), (torch.randn(1, 4),), {}, capture="export")
        >>> gm.meta["fxprune_capture"]["frontend"]
        'export'
    """
    with paused_collector():
        with stage("trace", timings):
            model = unwrap(model)
            check_model(model, leaf_modules)
        gm, info = _captured_with_shapes(model, inputs, timings, capture, leaf_modules, concrete_args)
        gm.meta["fxprune_capture"] = info.to_dict()
        by_query_heads = policy.structure_ratio("query-heads") is not None  # fxprune.coupling.gqa_rules
        gm.meta["fxprune_coupling"] = {"gqa": "query-heads" if by_query_heads else "kv-groups"}
        with stage("coupling", timings):
            an = analyse(gm, getattr(policy, "prune_outputs", False))
            groups, comp_to_group, index = build_groups(
                an, lambda owner: policy.ignores(owner, an.modules.get(owner)))
    return gm, an, groups, comp_to_group, index


__all__ = ["CaptureInfo", "analyse_model", "stage"]
