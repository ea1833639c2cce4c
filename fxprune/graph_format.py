"""fxprune's safe graph format: an exported ATen graph as JSON, its tensors as plain data.

:func:`encode` turns ``torch.export.export(module, inputs).module(check_guards=False)`` into a
record of plain data (the graph as JSON text, tensors under their original names, strings);
:func:`decode` builds a ``torch.fx.GraphModule`` back from it. Only names on the allow-lists can come out of a record:
ATen operators (minus :data:`DENIED_OPS`, which touch files or global state), the arithmetic
functions of :data:`PY_FUNCTIONS`, dtypes, layouts, memory formats and devices. Attribute and
input names are checked before fx writes them into generated code, so a record cannot make
:func:`decode` import or run anything else. :func:`fxprune.save` / :func:`fxprune.load`
(:mod:`fxprune.saving`) write and read these records with ``torch.save`` /
``torch.load(weights_only=True)``.

Example:
    >>> import torch
    >>> model, x = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()), torch.randn(1, 3, 8, 8)
    >>> record = encode(torch.export.export(model, (x,)).module(check_guards=False), "Sequential")
    >>> torch.allclose(decode(record)(x), model(x))
    True
"""
from __future__ import annotations

import collections
import json
import keyword
import math
import operator
import re
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

__all__ = ["SAVE_FORMAT", "SAVE_VERSION", "PY_FUNCTIONS", "DENIED_OPS", "Unsupported", "Malformed",
           "encode", "decode"]

SAVE_FORMAT = "fxprune.module"
SAVE_VERSION = 2  # 2: ATen graph (JSON) + tensors, safe to load; 1: a pickled module (trusted only)


class Unsupported(Exception):
    """The module holds something the graph format does not store; the message says what.

    Example:
        >>> str(Unsupported("an argument of type object"))
        'an argument of type object'
    """


class Malformed(Exception):
    """A graph record that no fxprune wrote (or one changed after); the message says what is wrong.

    Example:
        >>> decode({"graph": "[]"})
        Traceback (most recent call last):
        ...
        fxprune.graph_format.Malformed: its 'graph' entry is not a graph description
    """


PY_FUNCTIONS: dict[str, Callable] = {  # the only Python callables a graph file may name
    **{f"operator.{n}": getattr(operator, n) for n in (
        "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pos", "abs",
        "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert")},
    **{f"math.{n}": getattr(math, n) for n in ("ceil", "floor", "trunc", "sqrt")},
    **{f"torch.{n}": getattr(torch, n) for n in (
        "sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum") if hasattr(torch, n)},
}
DENIED_OPS = frozenset({  # aten ops that touch files or global state rather than tensors
    "save", "from_file", "_print", "warn", "manual_seed", "seed", "set_grad_enabled",
    "_cufft_set_plan_cache_max_size", "_cufft_clear_plan_cache", "set_", "set_data", "record_stream"})
_ATEN_NAME = re.compile(r"aten\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")
_ATTR_PART = re.compile(r'[^".\\\x00-\x1f\x7f-\U0010ffff]+')  # fx writes it inside "..." in code
_ENUMS = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}
_SPEC_KINDS = {tuple: "tuple", list: "list", dict: "dict", type(None): "none", collections.OrderedDict: "dict",
               fx.immutable_collections.immutable_dict: "dict", fx.immutable_collections.immutable_list: "list"}


def _aten_op(name: str) -> torch._ops.OpOverload:
    match = _ATEN_NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None or match[1] in DENIED_OPS or "__" in name:
        raise Malformed(f"it calls {name!r}, which is not an allowed aten operator")
    op = getattr(getattr(torch.ops.aten, match[1], None), match[2], None)
    if not isinstance(op, torch._ops.OpOverload):
        raise Malformed(f"it calls {name!r}, which this PyTorch does not have")
    return op


def _target_name(target: Any) -> str:
    for name, fn in PY_FUNCTIONS.items():
        if fn is target:
            return name
    name = str(target) if isinstance(target, torch._ops.OpOverload) else ""
    try:
        if _aten_op(name) is target:
            return name
    except Malformed:
        pass
    raise Unsupported(f"the captured graph calls {target!r}; the safe format stores only aten "
                       "operators (not custom ops, control flow or other namespaces)")


def _encode_arg(a: Any, index: dict) -> Any:
    if isinstance(a, fx.Node):
        return {"node": index[a]}
    if a is None or isinstance(a, (bool, int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, (list, tuple)):
        items = [_encode_arg(x, index) for x in a]
        return items if isinstance(a, list) else {"tuple": items}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    for key, kind in _ENUMS.items():
        if isinstance(a, kind):
            return {key: str(a).rsplit(".", 1)[-1]}
    raise Unsupported(f"an argument of type {type(a).__name__} ({str(a)[:60]})")


def _decode_arg(a: Any, nodes: list, device: torch.device | None) -> Any:
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    if isinstance(a, list):
        return [_decode_arg(x, nodes, device) for x in a]
    if not isinstance(a, dict) or len(a) != 1:
        raise Malformed(f"an argument is {type(a).__name__}, not a value the format writes")
    (key, value), = a.items()
    if key == "node" and type(value) is int and 0 <= value < len(nodes):
        return nodes[value]
    if key == "tuple" and isinstance(value, list):
        return tuple(_decode_arg(x, nodes, device) for x in value)
    if key == "float" and value in ("inf", "-inf", "nan"):
        return float(value)
    if key == "device" and isinstance(value, str) and re.fullmatch(r"[a-z_]+(:[0-9]+)?", value):
        return device if device is not None else torch.device(value)
    if key in _ENUMS and isinstance(value, str) and value.isidentifier() and not value.startswith("_"):
        found = getattr(torch, value, None)
        if isinstance(found, _ENUMS[key]):
            return found
    raise Malformed(f"an argument {json.dumps(a)[:80]} is not one the format writes")


def _encode_spec(spec: pytree.TreeSpec) -> Any:
    if spec.is_leaf():
        return "*"
    kind = _SPEC_KINDS.get(spec.type)
    if kind is None:
        raise Unsupported(f"inputs or outputs of type {spec.type.__name__} (only tuples, lists, dicts "
                           "and tensors are stored)")
    out: dict = {"kind": kind, "children": [_encode_spec(c) for c in spec.children()]}
    if kind == "dict":
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in spec.context):
            raise Unsupported("a dict input or output whose keys are not strings or integers")
        out["keys"] = list(spec.context)
    return out


def _decode_spec(data: Any) -> Any:
    """A dummy value with the saved structure (leaves are 0); ``pytree.tree_structure`` of it is the
    spec. Only tuples, lists, dicts and None are built: nothing is imported by name."""
    if data == "*":
        return 0
    if not isinstance(data, dict) or not isinstance(data.get("children"), list):
        raise Malformed("an input or output structure is not one the format writes")
    children = [_decode_spec(c) for c in data["children"]]
    kind, keys = data.get("kind"), data.get("keys")
    if kind == "dict" and isinstance(keys, list) and len(keys) == len(children) and all(
            type(k) in (str, int) for k in keys):
        return dict(zip(keys, children))
    if kind in ("tuple", "list", "none") and (kind != "none" or not children):
        return {"tuple": tuple, "list": list, "none": lambda c: None}[kind](children)
    raise Malformed(f"an input or output structure of kind {str(kind)[:30]!r} is not one the format writes")


def encode(gm: fx.GraphModule, model_name: str) -> dict:
    """The record :func:`fxprune.save` writes for
    ``gm = torch.export.export(...).module(check_guards=False)``: plain data (JSON text, tensors,
    strings), so ``torch.load(weights_only=True)`` reads it.

    Raises :class:`Unsupported` for anything the format does not store (custom ops, non-tensor
    attributes, inputs or outputs of other types than tuples, lists, dicts and tensors).

    Example:
        >>> import torch
        >>> program = torch.export.export(torch.nn.Linear(4, 2), (torch.randn(1, 4),))
        >>> gm = program.module(check_guards=False)
        >>> record = encode(gm, "Linear")
        >>> record["format"], record["version"], sorted(record["parameters"])
        ('fxprune.module', 2, ['bias', 'weight'])
    """
    codegen = gm.graph._codegen
    if not isinstance(codegen, _PyTreeCodeGen):
        raise Unsupported("the captured module has no input/output structure")
    index: dict = {}
    nodes: list = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            entry = [node.op, node.target]
        elif node.op == "call_function":
            entry = [node.op, _target_name(node.target), _encode_arg(list(node.args), index),
                     {k: _encode_arg(v, index) for k, v in node.kwargs.items()}]
        elif node.op == "output":
            entry = [node.op, _encode_arg(node.args[0], index)]
        else:
            raise Unsupported(f"a {node.op} node ({node.name}) in the captured graph")
        index[node] = len(nodes)
        nodes.append(entry)
    params = dict(gm.named_parameters(remove_duplicate=False))
    buffers = dict(gm.named_buffers(remove_duplicate=False))
    constants = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        if node.target not in params and node.target not in buffers:
            value = gm.get_submodule(node.target.rpartition(".")[0]) if "." in node.target else gm
            constants[node.target] = getattr(value, node.target.rpartition(".")[2])
    for name, t in {**params, **buffers, **constants}.items():
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise Unsupported(f"{name!r} is a {type(t).__name__}, not a plain tensor")
    graph = {"inputs": list(codegen.pytree_info.orig_args), "in_spec": _encode_spec(codegen.pytree_info.in_spec),
             "out_spec": _encode_spec(codegen.pytree_info.out_spec), "nodes": nodes,
             "frozen": [n for n, p in params.items() if not p.requires_grad],
             "non_persistent": [n for n in buffers if n.rpartition(".")[2] in
                                gm.get_submodule(n.rpartition(".")[0])._non_persistent_buffers_set]}
    return {"format": SAVE_FORMAT, "version": SAVE_VERSION, "model": model_name,
            "torch": str(torch.__version__), "graph": json.dumps(graph),
            "parameters": {n: p.detach() for n, p in params.items()}, "buffers": buffers,
            "constants": constants}


def _attach(gm: torch.nn.Module, name: Any, value: torch.Tensor, kind: str) -> None:
    """Register ``value`` at dotted ``name`` under ``gm`` (parent modules made as needed)."""
    parts = name.split(".") if isinstance(name, str) else []
    if not parts or not all(_ATTR_PART.fullmatch(p) and not p.startswith("__") for p in parts):
        raise Malformed(f"the tensor name {str(name)[:80]!r} is not a module attribute path")
    owner = gm
    for part in parts[:-1]:
        child = owner._modules.get(part)
        if child is None:
            if hasattr(owner, part):
                raise Malformed(f"the tensor name {name!r} clashes with the attribute {part!r}")
            child = torch.nn.Module()
            owner.add_module(part, child)
        owner = child
    if hasattr(owner, parts[-1]):
        raise Malformed(f"the tensor name {name!r} is used twice or clashes with an attribute")
    if kind == "parameter":
        owner.register_parameter(parts[-1], value)
    else:
        owner.register_buffer(parts[-1], value, persistent=kind == "buffer")


def _tensor_table(record: dict, key: str) -> dict:
    table = record.get(key)
    if not isinstance(table, dict) or not all(isinstance(t, torch.Tensor) for t in table.values()):
        raise Malformed(f"its {key!r} entry is not a table of tensors")
    return table


def _attach_tensors(gm: torch.nn.Module, record: dict, graph: dict) -> set:
    frozen, non_persistent = set(graph.get("frozen", ())), set(graph.get("non_persistent", ()))
    shared: dict = {}  # one Parameter for names that share a tensor (tied weights)
    for name, t in _tensor_table(record, "parameters").items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)
        param = shared.get(key) if t.numel() else None
        if param is None:
            param = shared[key] = torch.nn.Parameter(t, requires_grad=name not in frozen and t.is_floating_point())
        _attach(gm, name, param, "parameter")
    for name, t in _tensor_table(record, "buffers").items():
        _attach(gm, name, t, "non-persistent" if name in non_persistent else "buffer")
    for name, t in _tensor_table(record, "constants").items():
        _attach(gm, name, t, "non-persistent")
    return {n for key in ("parameters", "buffers", "constants") for n in record[key]}


def _identifier(name: Any, what: str = "input name") -> str:
    """``name`` if fx may write it into generated code as it is (inputs and keyword names)."""
    if not (isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)
            and name != "self" and not name.startswith("__")):
        raise Malformed(f"the {what} {str(name)[:40]!r} is not a Python identifier")
    return name


def _build_graph(graph: dict, attributes: set, device: torch.device | None) -> fx.Graph:
    out, nodes = fx.Graph(), []
    for entry in graph["nodes"]:
        op = entry[0] if isinstance(entry, list) and entry else None
        if op == "placeholder" and len(entry) == 2:
            node = out.placeholder(_identifier(entry[1]))
        elif op == "get_attr" and len(entry) == 2 and entry[1] in attributes:
            node = out.get_attr(entry[1])
        elif op == "call_function" and len(entry) == 4 and isinstance(entry[2], list) and isinstance(entry[3], dict):
            kwargs = {_identifier(k, "keyword name"): _decode_arg(v, nodes, device) for k, v in entry[3].items()}
            node = out.call_function(_aten_op(entry[1]) if entry[1] not in PY_FUNCTIONS else
                                     PY_FUNCTIONS[entry[1]], tuple(_decode_arg(entry[2], nodes, device)), kwargs)
        elif op == "output" and len(entry) == 2:
            node = out.output(_decode_arg(entry[1], nodes, device))
        else:
            raise Malformed(f"node {len(nodes)} ({json.dumps(entry)[:80]}) is not one the format writes")
        nodes.append(node)
    inputs = [_identifier(n) for n in graph["inputs"]]
    args_kwargs = _decode_spec(graph["in_spec"])
    in_spec = pytree.tree_structure(args_kwargs)
    out_spec = pytree.tree_structure(_decode_spec(graph["out_spec"]))
    if not (isinstance(args_kwargs, tuple) and len(args_kwargs) == 2 and isinstance(args_kwargs[0], tuple)
            and isinstance(args_kwargs[1], dict) and len(inputs) == sum(map(len, args_kwargs))
            and in_spec.num_leaves == sum(n.op == "placeholder" for n in nodes)):
        raise Malformed("its input structure does not match its inputs")
    results = nodes[-1].args[0] if nodes and nodes[-1].op == "output" else None
    if not isinstance(results, (tuple, list)) or len(results) != out_spec.num_leaves:
        raise Malformed("its output structure does not match its outputs")
    out._codegen = _PyTreeCodeGen(_PyTreeInfo(inputs, in_spec, out_spec))
    out.lint()
    return out


def decode(record: dict, device: torch.device | None = None) -> fx.GraphModule:
    """The module (eval mode) of a record :func:`encode` wrote; raises :class:`Malformed` for
    anything it does not write. Only allow-listed callables are put in the graph; device
    literals become ``device`` when given.

    Example:
        >>> import torch
        >>> model, x = torch.nn.Linear(4, 2), torch.randn(3, 4)
        >>> gm = decode(encode(torch.export.export(model, (x,)).module(check_guards=False), "Linear"))
        >>> torch.allclose(gm(x), model(x)), gm.training
        (True, False)
    """
    try:
        graph = json.loads(record["graph"]) if isinstance(record.get("graph"), str) else None
    except (json.JSONDecodeError, RecursionError):
        graph = None
    if not isinstance(graph, dict) or not all(isinstance(graph.get(k), list) for k in ("inputs", "nodes")):
        raise Malformed("its 'graph' entry is not a graph description")
    gm = fx.GraphModule(torch.nn.Module(), fx.Graph(), class_name="FxPruneModule")
    attributes = _attach_tensors(gm, record, graph)
    gm.graph = _build_graph(graph, attributes, device)
    return gm.eval()
