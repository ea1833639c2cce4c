"""The mask oracle: the pruned model must compute the original with removed channels zeroed."""
from __future__ import annotations

import copy
import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx

from .copying import eval_copy
from .errors import VerificationError
from .rewrite.apply import _apply_edits


class MaskedInterpreter(fx.Interpreter):
    """Runs the original graph, zeroing listed channels of listed node outputs.

    A listed node that the model returns is an output narrowed by ``Policy(prune_outputs=...)``
    (by default no output loses channels): with ``narrow_outputs`` (the default) its removed
    channels are dropped from the returned tensor, as the pruned model drops them.

    Example:
        >>> gm = torch.fx.symbolic_trace(torch.nn.ReLU())
        >>> MaskedInterpreter(gm, {"relu": (1, [0])}, narrow_outputs=False).run(torch.ones(1, 2))
        tensor([[0., 1.]])
        >>> MaskedInterpreter(gm, {"relu": (1, [0])}).run(torch.ones(1, 2))
        tensor([[1.]])
    """

    def __init__(self, gm: fx.GraphModule, zero: dict[str, tuple[int, list[int]]], narrow_outputs: bool = True):
        super().__init__(gm)
        self.zero = {name: (dim, torch.tensor(idx, dtype=torch.long)) for name, (dim, idx) in zero.items()}
        self.narrow_outputs = narrow_outputs

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "output" and self.narrow_outputs:
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), self._narrowed)
            return self.output(n.target, args, kwargs)
        result = super().run_node(n)
        if n.name in self.zero and isinstance(result, torch.Tensor):
            dim, idx = self.zero[n.name]
            if _zero_in_place(n, result):  # the tensor an in-place write changed, or a view about to be written
                result.index_fill_(dim, idx.to(result.device), 0)
            else:
                result = result.index_fill(dim, idx.to(result.device), 0)
        return result

    def _narrowed(self, node: fx.Node) -> Any:
        """A returned value without its removed channels (the pruned model's output width)."""
        value = self.env[node]
        if node.name not in self.zero or not isinstance(value, torch.Tensor):
            return value
        dim, idx = self.zero[node.name]
        keep = torch.ones(value.shape[dim], dtype=torch.bool)
        keep[idx] = False
        return value.index_select(dim, keep.nonzero().squeeze(1).to(value.device))


_IN_PLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _writes_in_place(node: fx.Node) -> bool:
    """Whether ``node`` writes into its first argument (``copy_``, ``add_``, ``x[i] = v``)."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and bool(node.args) and (
        node.target in _IN_PLACE_FUNCTIONS or bool(node.kwargs.get("inplace"))
        or (name.endswith("_") and not name.endswith("__")))


def _zero_in_place(node: fx.Node, result: torch.Tensor) -> bool:
    """Zero ``result`` in place when ``node`` wrote into it (the removed channels of the tensor
    it changed are zero again) or when it is a view a user writes into (a view zeroed out of
    place would take that write away from the tensor it views)."""
    if _writes_in_place(node):
        return True
    return result._base is not None and any(_writes_in_place(u) and u.args[0] is node for u in node.users)


def _leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _leaves(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value, key=str) for t in _leaves(value[k])]
    return []


@dataclasses.dataclass
class Verification:
    """The oracle's verdict: ``max_error`` is the largest relative error over all outputs.

    ``compared`` counts the output tensors compared. Nothing compared is no evidence: when the
    model returns no tensor (``None``, a shape, an int), ``ok`` is False, ``max_error`` is NaN
    and ``reason`` says why; ``reason`` also explains other failures ("" when ``ok``).

    Example:
        >>> v = Verification(False, float("nan"), 1e-4, True, 0, "the model returned no tensor")
        >>> bool(v), v.reason
        (False, 'the model returned no tensor')
    """

    ok: bool
    max_error: float
    tolerance: float
    exact: bool
    compared: int = 0
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


def masked_outputs(plan, inputs: tuple) -> Any:
    """Outputs of the original with ``plan.edits`` applied and removed channels zeroed (node
    outputs listed by ``plan.removed_channels()``, parameter rows by ``plan.masked_params()``);
    outputs narrowed by ``Policy(prune_outputs=...)`` hold only their kept channels."""
    ref = copy.deepcopy(plan.traced)
    _apply_edits(ref, plan.edits)
    for target, (dim, idx) in plan.masked_params().items():
        *path, name = target.split(".")
        tensor = getattr(ref.get_submodule(".".join(path)) if path else ref, name)
        with torch.no_grad():
            tensor.index_fill_(dim, torch.tensor(idx, dtype=torch.long, device=tensor.device), 0)
    ref.eval()
    with torch.no_grad():
        return MaskedInterpreter(ref, plan.removed_channels()).run(*inputs)


def relative_error(a: Any, b: Any) -> float:
    """max |a-b| / max |b| over all output tensors (flattened tuples/dicts)."""
    la, lb = _leaves(a), _leaves(b)
    if len(la) != len(lb):
        return float("inf")
    worst = 0.0
    for x, y in zip(la, lb):
        if x.shape != y.shape:
            return float("inf")
        scale = y.abs().max().item() if y.numel() else 0.0
        diff = (x.double() - y.double()).abs().max().item() if y.numel() else 0.0
        worst = max(worst, diff / max(scale, 1e-30))
    return worst


def verify(pruned: fx.GraphModule, inputs: tuple | None = None, plan=None, tolerance: float | None = None,
           raise_on_failure: bool = False) -> Verification:
    """Check a pruned model against the mask oracle (eval mode, no grad, on private copies).

    The tolerance defaults to 1e-9 for float64 outputs and 1e-4 otherwise. An output narrowed by
    ``Policy(prune_outputs=...)`` is compared on its kept channels. A model that returns
    no tensor cannot be checked: the result is then not ok (``max_error`` NaN, ``reason`` says
    so), and ``raise_on_failure=True`` raises ``VerificationError`` with the reason.

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
        >>> x = (torch.randn(2, 3, 8, 8),)
        >>> fxprune.verify(fxprune.transform(m, fxprune.Policy("l1", 0.5), x)).ok
        True
    """
    plan = plan if plan is not None else pruned.meta.get("fxprune")
    if plan is None:
        raise VerificationError("no plan: pass plan= or a module returned by fxprune.transform")
    inputs = plan.example_inputs if inputs is None else (inputs if isinstance(inputs, tuple) else (inputs,))
    expected = masked_outputs(plan, inputs)
    model = eval_copy(pruned)
    with torch.no_grad():
        got = model(*inputs)
    leaves = _leaves(expected)
    if tolerance is None:
        tolerance = 1e-9 if leaves and all(t.dtype == torch.float64 for t in leaves) else 1e-4
    if not leaves:
        result = Verification(False, float("nan"), tolerance, plan.exact, 0,
                              f"nothing to compare: the model returned no tensor (got {_kind(expected)})")
    else:
        err = relative_error(got, expected)
        why = "" if err <= tolerance else (
            f"outputs differ in number or shape from the mask oracle's ({_kind(got)} vs {_kind(expected)})"
            if err == float("inf") else f"relative error {err:.3g} > tolerance {tolerance:g}")
        result = Verification(err <= tolerance, err, tolerance, plan.exact, len(leaves), why)
    if raise_on_failure and not result.ok:
        verdict = "does not match" if result.compared else "cannot be checked against"
        raise VerificationError(f"pruned model {verdict} the mask oracle: {result.reason}")
    return result


def _kind(value: Any) -> str:
    """A short description of an output: its type and, for containers, the tensor count."""
    if not isinstance(value, (list, tuple, dict)):
        return type(value).__name__
    n = len(_leaves(value))
    return f"{type(value).__name__} with {n} tensor{'s' * (n != 1)}"
