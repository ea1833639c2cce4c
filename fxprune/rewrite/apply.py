"""The rewrite pass: sliced copies of every affected tensor, updated sizes and literals."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..copying import copy_graph_module
from . import tied
from .literals import rewrite as rewrite_literal
from .slicers import fix_module, hyper_parameters, replace_tensor
from ..coupling.rules import arg
from ..coupling.state import ChannelInfo
from ..coupling.units import long_tensor
from ..errors import InputError, StageError, VerificationError
from ..gc_pause import paused_collector
from ..shapes import is_tensor_shape, propagate, shape


def _owner(gm: fx.GraphModule, target: str) -> tuple[torch.nn.Module, str]:
    *path, name = target.split(".")
    return (gm.get_submodule(".".join(path)) if path else gm), name


def _apply_edits(gm: fx.GraphModule, edits: dict) -> None:
    ties = tied.holders(dict(gm.named_modules())) if edits else {}
    for target, value in edits.items():
        owner, name = _owner(gm, target)
        old = getattr(owner, name)
        replace_tensor(owner, name, value.to(dtype=old.dtype, device=old.device))
        tied.share(ties, old, owner, name)


def _check_parametrized(owner: torch.nn.Module, name: str, tensor: torch.Tensor, target: str) -> None:
    """A parametrized tensor takes the cut through its ``right_inverse``: it must read back as
    the cut (a parametrization that changes sliced values would make the prune inexact)."""
    if "parametrizations" not in owner._modules:  # where parametrize registers them (most modules: none)
        return
    from torch.nn.utils import parametrize
    if not parametrize.is_parametrized(owner, name):
        return
    back = getattr(owner, name).detach()
    eps = torch.finfo(tensor.dtype).eps if tensor.is_floating_point() else 0
    if back.shape != tensor.shape or not torch.allclose(back, tensor, rtol=100 * eps, atol=0):
        raise StageError("rewrite", target, f"the parametrization of {target} does not give back the "
                                            "pruned tensor; remove it before pruning "
                                            "(torch.nn.utils.parametrize.remove_parametrizations)")


class Kept:
    """Kept positions of channel-unit tuples under one removal, memoised by tuple identity (the
    per-channel ops of a graph hand the same tuple from node to node).

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
        >>> p = fxprune.plan(m, fxprune.Policy("l1", 0.5), (torch.randn(1, 3, 8, 8),))
        >>> Kept(p, p.removed_roots()).count(p.analysis.params[("0.weight", 0)].units)
        4
    """

    def __init__(self, plan, removed: set[int]):
        roots = plan.analysis.units.root_tensor()
        dead_root = torch.zeros(len(roots), dtype=torch.bool)
        dead_root[long_tensor(sorted(removed))] = True
        self.dead = dead_root[roots].tolist()
        self.memo: dict[int, tuple[tuple, list[int]]] = {}
        self.indices: dict[int, tuple[tuple, torch.Tensor]] = {}

    def index(self, units: tuple[int, ...]) -> torch.Tensor:
        """Kept positions as a long tensor (for ``index_select``), memoised like ``positions``."""
        hit = self.indices.get(id(units))
        if hit is None or hit[0] is not units:
            hit = self.indices[id(units)] = (units, long_tensor(self._kept(units)))
        return hit[1]

    def _kept(self, units: tuple[int, ...]) -> list[int]:
        hit = self.memo.get(id(units))
        if hit is None or hit[0] is not units:
            dead = self.dead
            hit = self.memo[id(units)] = (units, [i for i, u in enumerate(units) if not dead[u]])
        return hit[1]

    def positions(self, units: tuple[int, ...]) -> list[int]:
        return list(self._kept(units))

    def count(self, units: tuple[int, ...]) -> int:
        return len(self._kept(units))


def _planned_slices(plan, kept: Kept) -> list[tuple[str, int, torch.Tensor]]:
    """(param target, dim, kept positions) for every parameter dim that loses channels."""
    out = []
    for (target, dim), ps in plan.analysis.params.items():
        if kept.count(ps.units) != len(ps.units):
            out.append((target, dim, kept.index(ps.units)))
    return out


def _copy_sharing(traced: fx.GraphModule, slices: list, modules: dict | None = None) -> fx.GraphModule:
    """Deep copy of ``traced`` that does not copy the tensors about to be sliced (they are
    replaced by fresh sliced tensors, so nothing stays shared). ``modules``: ``traced``'s
    ``named_modules`` table where the caller has it (the plan's analysis does)."""
    modules = dict(traced.named_modules()) if modules is None else modules
    memo = {}
    for target, _dim, _keep in slices:
        path, _, name = target.rpartition(".")
        tensor = getattr(modules[path], name)
        memo[id(tensor)] = tensor
    return copy_graph_module(traced, memo, codegen=False)  # ``finish`` generates the code once


def _traced_modules(plan) -> dict | None:
    """The analysis's ``named_modules`` table of the plan's traced module, when it is that
    module's (None: walk it again)."""
    an = plan.analysis
    return an.modules if getattr(an, "gm", None) is plan.traced else None


def _module_widths(plan, kept: Kept) -> dict[str, int]:
    """Kept width of every module whose size attributes follow channel units (see
    ``Analysis.size_module``), for those that lose channels."""
    out = {}
    for target, units in plan.analysis.module_widths.items():
        width = kept.count(units)
        if width != len(units):
            out[target] = width
    return out


def _cut(modules: dict[str, torch.nn.Module], slices: list) -> dict[str, torch.Tensor]:
    """The kept part of every sliced tensor (all of its sliced dims cut in one go), read from
    the modules of ``modules`` (a ``named_modules`` table)."""
    out = {}
    for target, cuts in tied.merge_cuts(modules, slices).items():  # a tied tensor is cut once
        path, _, name = target.rpartition(".")
        tensor = getattr(modules[path], name).detach()
        for dim, index in cuts:
            tensor = tensor.index_select(dim, index if index.device == tensor.device else index.to(tensor.device))
        out[target] = tensor
    return out


def _slice_tensors(gm: fx.GraphModule, cut: dict[str, torch.Tensor], widths: dict[str, int],
                   modules: dict[str, torch.nn.Module]) -> None:
    """Put the cut tensors in place, then let each module's fixer update its size attributes
    (``modules``: ``gm``'s ``named_modules`` table)."""
    before = {}
    for target in widths:
        owner = modules[target]
        before[id(owner)] = (owner, {**hyper_parameters(owner), "kept": widths[target]})
    ties = tied.holders(modules)
    for target, tensor in cut.items():
        path, _, name = target.rpartition(".")
        owner = modules[path]
        old = getattr(owner, name)
        owners = [owner, *(m for m, _ in ties.get(id(old), ()) if m is not owner)]
        for m in owners:
            if m is not gm and id(m) not in before:
                before[id(m)] = (m, hyper_parameters(m))
        replace_tensor(owner, name, tensor, copy=False)
        tied.share(ties, old, owner, name)
        _check_parametrized(owner, name, tensor, target)
    for owner, hp in before.values():
        fix_module(owner, hp)


def _rewrite_literals(gm: fx.GraphModule, plan, kept: Kept) -> bool:
    """Rewrite sizes written into the graph; True when some node was visited for it."""
    info = plan.analysis.info
    touched = False
    for node in list(gm.graph.nodes):
        if node.name in plan.analysis.literals:
            rewrite_literal(node, *plan.analysis.literals[node.name], kept.count)
            touched = True
        if node.name in plan.analysis.resized:
            _rewrite_split(node, info[node.name], kept)
            touched = True
        elif node.target in ("view", "reshape", torch.reshape, "expand"):
            out = info.get(node.name)
            _rewrite_shape(node, out if isinstance(out, ChannelInfo) else None, plan, kept)
            touched = True
    return touched


def _rewrite_split(node: fx.Node, pieces: tuple, kept: Kept) -> None:
    sizes = [kept.count(p.units) for p in pieces]
    dim = arg(node, 2, "dim", 0)
    x = node.args[0]
    if node.op == "call_method":
        node.target = "split"
    else:
        node.target = torch.split
    node.args, node.kwargs = (x, sizes), {"dim": dim}


def _size_source(size: fx.Node) -> tuple[fx.Node, int] | None:
    """(tensor, dim) when ``size`` reads one size of a tensor: ``x.shape[i]`` or ``x.size(i)``."""
    if size.op == "call_method" and size.target == "size" and len(size.args) == 2:
        return size.args[0], size.args[1]
    src = size.args[0] if size.op == "call_function" and size.target is operator.getitem else None
    if isinstance(src, fx.Node) and ((src.op == "call_function" and src.target is getattr and src.args[1] == "shape")
                                     or (src.op == "call_method" and src.target == "size" and len(src.args) == 1)):
        return src.args[0], size.args[1]
    return None


def _follows(size: fx.Node, width: int, plan, kept: Kept) -> bool:
    """True when a run-time size at the channel dim reads a tensor that keeps ``width`` channels there."""
    src = _size_source(size)
    info = plan.analysis.info.get(src[0].name) if src and isinstance(src[0], fx.Node) else None
    if not isinstance(info, ChannelInfo) or not isinstance(src[1], int):
        return False
    nd = len(shape(src[0]) or ())
    return (src[1] + nd if src[1] < 0 else src[1]) == info.dim and kept.count(info.units) == width


def _shrinks(size: fx.Node, plan, kept: Kept) -> bool | None:
    """Whether a run-time size reads a channel dim that loses channels (None: not a plain size read)."""
    src = _size_source(size)
    if src is None or not isinstance(src[0], fx.Node) or not isinstance(src[1], int):
        return None
    info = plan.analysis.info.get(src[0].name)
    nd = len(shape(src[0]) or ())
    if not isinstance(info, ChannelInfo) or (src[1] + nd if src[1] < 0 else src[1]) != info.dim:
        return False
    return kept.count(info.units) != len(info.units)


def _reads_shrinking(size: fx.Node, plan, kept: Kept, depth: int = 6) -> bool:
    """Whether a run-time size reads, directly or through arithmetic (``C // heads``), a channel
    dim that loses channels."""
    direct = _shrinks(size, plan, kept)
    if direct is not None:
        return direct
    if depth == 0 or size.op != "call_function":
        return False
    return any(_reads_shrinking(a, plan, kept, depth - 1) for a in size.all_input_nodes)


def _rewrite_shape(node: fx.Node, out: ChannelInfo | None, plan, kept: Kept) -> None:
    """The channel entry of a view/reshape/expand becomes the kept width, unless it is -1 or a run-time
    size of a tensor with the same kept width (``x.shape[-1]`` of another space does not shrink
    with this one: it becomes a literal). Every other entry keeps its traced size: one that reads
    a channel count that shrinks (``B, N, C = x.shape`` of a pruned ``x``, reused for a tensor whose
    channels stay) becomes that traced size as a literal."""
    traced = shape(node)
    rest = list(node.args[1:])
    packed = len(rest) == 1 and isinstance(rest[0], (list, tuple))
    dims = list(rest[0]) if packed else rest
    if "shape" in node.kwargs:
        dims, packed = list(node.kwargs["shape"]), None
    changed = False
    if is_tensor_shape(traced) and len(traced) == len(dims):
        for d, size in enumerate(dims):
            if (out is None or d != out.dim) and isinstance(size, fx.Node) and _reads_shrinking(size, plan, kept):
                dims[d], changed = traced[d], True
    if out is not None and out.dim < len(dims):
        width = kept.count(out.units)
        size = dims[out.dim]
        if isinstance(size, fx.Node) and not _follows(size, width, plan, kept) \
                and not (width == len(out.units) and _shrinks(size, plan, kept) is False) \
                or isinstance(size, int) and size not in (-1, width):
            dims[out.dim], changed = width, True
    if not changed:
        return
    if packed is None:
        node.kwargs = {**node.kwargs, "shape": tuple(dims)}
    else:
        node.args = (node.args[0], tuple(dims)) if packed else (node.args[0], *dims)


def _is_impure(node: fx.Node) -> bool:
    if node.is_impure():
        return True
    if node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_"):
        return True
    if node.op == "call_module":
        return bool(getattr(node.graph.owning_module.get_submodule(node.target), "inplace", False))
    return False


def _eliminate_dead_code(graph: fx.Graph) -> bool:
    """``Graph.eliminate_dead_code`` asking ``_is_impure`` only of nodes nobody uses (torch.fx asks
    every node, which looks up each module: a third of the rewrite on large graphs)."""
    removed = False
    for node in reversed(graph.nodes):
        if not node.users and node.op not in ("output", "placeholder") and not _is_impure(node):
            graph.erase_node(node)
            removed = True
    return removed


def finish(gm: fx.GraphModule, graph_changed: bool = True, codegen: bool = False) -> fx.GraphModule:
    """The finish sequence of every rewrite: DCE, drop unused submodules, lint, recompile.

    With ``graph_changed=False`` (only tensors were replaced) and nothing dead, the graph is an
    unchanged copy of torch.fx's trace (nothing to lint) and the code generated when it was
    copied is kept, unless ``codegen`` says the copy was made without code (then it is generated).
    """
    removed = _eliminate_dead_code(gm.graph)
    if removed or graph_changed:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
    if removed or graph_changed or codegen:
        gm.recompile()
    return gm


def check_shapes(gm: fx.GraphModule, plan, kept: Kept) -> None:
    """Run the pruned module once and compare every channel tensor's shape to the plan's.

    The example inputs ran through the original, so a failure here is fxprune's: a
    ``StageError`` naming the pruned node that failed, never an input error."""
    try:
        propagate(gm, plan.example_inputs)
    except InputError as err:
        node, why = _failing_node(gm, plan.example_inputs)
        raise StageError("rewrite", node, f"the pruned module fails its shape re-check: {why} "
                                          "(an fxprune bug: please report it with the model)") from err
    originals = {n.name: shape(n) for n in plan.traced.graph.nodes}
    second_dims = getattr(plan.analysis, "second_dims", {})  # k.T @ v: v's channels, a second dim
    for node in gm.graph.nodes:
        out = plan.analysis.info.get(node.name)
        if not isinstance(out, ChannelInfo) or not is_tensor_shape(originals.get(node.name)):
            continue
        want = list(originals[node.name])
        want[out.dim] = kept.count(out.units)
        literal = plan.analysis.literals.get(node.name)
        if literal is not None and literal[0] == "repeat_kv":  # its n_rep dim shrinks too
            units, kv, d, _ = literal[1]
            want[d] = kept.count(units) // kv
        second = second_dims.get(node.name)
        if second is not None:
            want[second[0]] = kept.count(second[1])
        if tuple(want) != shape(node):
            raise VerificationError(
                f"shape re-check failed at node {node.name!r}: planned {tuple(want)}, got {shape(node)}")


def _failing_node(gm: fx.GraphModule, inputs: tuple) -> tuple[str | None, str]:
    """(name, error) of the first node of ``gm`` that fails on ``inputs``."""
    class Finder(fx.Interpreter):
        failed: tuple[str | None, str] = (None, "no node failed on a second run")

        def run_node(self, n: fx.Node):
            try:
                return super().run_node(n)
            except Exception as err:
                Finder.failed = (n.name, f"{n.format_node()} raised {type(err).__name__}: {err}")
                raise

    with torch.no_grad():
        try:
            Finder(gm).run(*inputs)
        except Exception as err:
            if Finder.failed[0] is None:
                return None, f"{type(err).__name__}: {err}"
    return Finder.failed


def apply(plan) -> fx.GraphModule:
    """Build the pruned GraphModule of a plan (the plan's ``traced`` module is left as it is).

    Example:
        >>> import fxprune, torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
        >>> p = fxprune.plan(m, fxprune.Policy("l1", 0.5), (torch.randn(1, 3, 8, 8),))
        >>> fxprune.apply(p).get_submodule("0").out_channels
        4
    """
    with paused_collector():
        return _apply(plan)


def _apply(plan) -> fx.GraphModule:
    kept = Kept(plan, plan.removed_roots())
    slices = _planned_slices(plan, kept)
    gm = _copy_sharing(plan.traced, slices if not plan.edits else [], _traced_modules(plan))
    gm.meta.pop("fxprune", None)
    try:
        _apply_edits(gm, plan.edits)
        modules = dict(gm.named_modules())
        _slice_tensors(gm, _cut(modules, slices), _module_widths(plan, kept), modules)
        finish(gm, graph_changed=_rewrite_literals(gm, plan, kept), codegen=True)
    except (StageError, VerificationError):
        raise
    except Exception as err:
        raise StageError("rewrite", None, f"{type(err).__name__}: {err}") from err
    check_shapes(gm, plan, kept)
    gm.meta["fxprune"] = plan
    return gm
