"""Property tests: fxprune on random networks built from blocks (see ``netgen.py``).

For every generated (network, policy):

* ``fxprune.transform`` succeeds or raises a documented ``fxprune.FxPruneError``; any other
  exception fails, and so does a ``StageError`` that merely wraps a Python error raised inside
  fxprune (an internal crash) -- except on networks with grouped convolutions
  (``1 < groups < channels``), where any ``FxPruneError`` is an accepted, documented outcome;
* on success the plan is exact (every generated op is exact by the README; on networks with grouped
  convolutions an approximate plan is accepted and then not held to the oracle), the mask oracle
  holds on a fresh float64 input (relative error <= 1e-9), the output structure (tensor / tuple / dict,
  keys, shapes, dtypes) is unchanged, and every group keeps at least ``min(min_channels, size)``
  channels and, when it lost channels and ``round_to`` is set, a multiple of ``round_to``;
* the input model is untouched (parameters, buffers, submodules, train/eval flags), whether the
  transform succeeded or failed;
* planning twice gives the same plan (same removed channels in every group and node).

Number of examples per property: ``FXPRUNE_HYPOTHESIS_EXAMPLES`` (default 25, the CI budget).
Long run (about 0.3 s per example on one core)::

    FXPRUNE_HYPOTHESIS_EXAMPLES=1000 python -m pytest -q tests/property

Examples are derandomized (the same ones on every run). A failure prints the ``NetSpec`` and the
``Policy`` as drawn, and ``netgen.build(spec)`` rebuilds that network exactly. Shrinking a failure
to a smaller network costs minutes (every step is a full prune), so it is off unless
``FXPRUNE_HYPOTHESIS_SHRINK=1``. Minimal reproducers of the bugs found so far are in
``test_regressions.py``.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, note, settings

import fxprune
import netgen

EXAMPLES = int(os.environ.get("FXPRUNE_HYPOTHESIS_EXAMPLES", "25"))
SHRINK = os.environ.get("FXPRUNE_HYPOTHESIS_SHRINK", "") not in ("", "0")
TOLERANCE = 1e-9

SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, print_blob=True,
    phases=[Phase.explicit, Phase.generate] + ([Phase.shrink] if SHRINK else []),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _has_grouped(spec: netgen.NetSpec) -> bool:
    return any(b.kind == "grouped" for b in spec.blocks)


def _internal_crash(err: fxprune.FxPruneError) -> BaseException | None:
    """The Python error a ``StageError`` wraps, when it wraps one (not an fxprune error)."""
    cause = err.__cause__
    if isinstance(err, fxprune.StageError) and cause is not None:
        return None if isinstance(cause, fxprune.FxPruneError) else cause
    return None


def check_case(case: netgen.Case) -> None:
    """All the per-case properties of the module docstring; fails with an assertion."""
    spec, policy = case.spec, case.policy
    model, inputs = case.build()
    fresh = netgen.build_input(spec, 1)
    with torch.no_grad():
        want = netgen.structure(copy.deepcopy(model)(*fresh))  # the generator makes runnable nets
    before = netgen.snapshot(model)
    try:
        pruned = fxprune.transform(model, policy, inputs)
    except fxprune.FxPruneError as err:
        netgen.assert_unchanged(model, before)
        note(f"documented error: {type(err).__name__}: {err}")
        crash = _internal_crash(err)
        assert crash is None or _has_grouped(spec), (
            f"internal error wrapped as {type(err).__name__}: {type(crash).__name__}: {crash}")
        return
    netgen.assert_unchanged(model, before)

    plan = pruned.meta["fxprune"]
    note(fxprune.explain(plan))
    inexact = [(g.name, g.inexact) for g in plan.groups if g.removed and not g.exact]
    assert not inexact or _has_grouped(spec), f"only exact ops are generated; pruned inexact groups: {inexact}"
    if plan.exact:
        result = fxprune.verify(pruned, inputs=fresh)
        assert result.max_error <= TOLERANCE, f"mask oracle: relative error {result.max_error:.3g}"

    with torch.no_grad():
        got = netgen.structure(copy.deepcopy(pruned)(*fresh))
    assert got == want, "output structure changed"

    for g in plan.groups:
        assert g.kept >= min(policy.min_channels, g.size), f"{g.name}: kept {g.kept} < min_channels"
        if policy.round_to and g.removed:
            assert g.kept % policy.round_to == 0, (
                f"{g.name}: kept {g.kept} of {g.size}, not a multiple of round_to={policy.round_to} "
                f"(note: {g.note!r})")
    netgen.assert_unchanged(model, before)


@SETTINGS
@given(netgen.cases())
def test_transform_is_exact_or_raises_documented_error(case):
    check_case(case)


# One block kind at a time (next to conv-bn-act blocks), so that every kind is exercised in CI
# even with the default small budget.
KIND_EXAMPLES = max(3, EXAMPLES // 8)


@pytest.mark.parametrize("kind", sorted(set(netgen.BLOCKS) - {"conv"}))
def test_each_block_kind(kind):
    @settings(SETTINGS, max_examples=KIND_EXAMPLES)
    @given(netgen.cases(kinds=(kind, kind, "conv"), max_blocks=4))
    def run(case):
        check_case(case)

    run()


@SETTINGS
@given(netgen.cases())
def test_plans_are_deterministic(case):
    model, inputs = case.build()
    try:
        first = fxprune.plan(model, case.policy, inputs)
    except fxprune.FxPruneError:
        return
    second = fxprune.plan(model, case.policy, inputs)
    assert netgen.plan_signature(first) == netgen.plan_signature(second)
    # an equal copy of the model gives the same plan too
    third = fxprune.plan(copy.deepcopy(model), case.policy, inputs)
    assert netgen.plan_signature(first) == netgen.plan_signature(third)
