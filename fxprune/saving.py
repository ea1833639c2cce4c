"""Save and load modules: :func:`save` writes fxprune's safe graph format (or, asked for, a pickle),
:func:`load` reads it back without running code from the file.

The graph format (:mod:`fxprune.graph_format`) is data, never code: the module is captured with
``torch.export`` and stored as a graph of ATen operators (JSON) with its tensors, in a
``torch.save`` file that :func:`load` reads with ``torch.load(weights_only=True)``. A file
cannot make :func:`load` import or call anything but ATen operators and a few arithmetic
functions. Pickled modules (``format="pickle"``, older fxprune files, ``torch.save(module)``)
run whatever code the file names while being read, so :func:`load` opens them only with
``trusted=True``. Both are re-exported by :mod:`fxprune.exporters` and :mod:`fxprune`.

Example:
    >>> import tempfile, os, torch
    >>> model, x = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU()), torch.randn(3, 4)
    >>> path = save(model, os.path.join(tempfile.mkdtemp(), "m.pt"), (x,))
    >>> torch.equal(load(path)(x), model(x))
    True
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import pickletools
import threading
import types
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from . import graph_format
from .atomic import atomic_write
from .errors import FxPruneError
from .graph_format import SAVE_FORMAT, SAVE_VERSION

__all__ = ["save", "load", "SaveError", "LoadError", "SAVE_FORMAT", "SAVE_VERSION", "PICKLE_VERSION"]

PICKLE_VERSION = 1
_PICKLE_HINT = ("save with format='pickle' instead: any module, but the file can only be read with "
                "fxprune.load(path, trusted=True), because loading it runs code")


class LoadError(FxPruneError, ValueError):
    """A saved module could not be loaded; the message names the file and what is wrong with it.

    Example:
        >>> str(LoadError("model.pt", "the file does not exist"))
        "cannot load 'model.pt': the file does not exist"
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = os.fspath(path), reason
        super().__init__(f"cannot load {self.path!r}: {reason}")


class SaveError(FxPruneError, ValueError):
    """A module could not be saved in the requested format; the message says why and what to do.

    Example:
        >>> str(SaveError("m.pt", "no example inputs", "pass example_inputs=(x,)"))
        "cannot save to 'm.pt': no example inputs (what to do: pass example_inputs=(x,))"
    """

    def __init__(self, path: str | os.PathLike, reason: str, hint: str):
        self.path, self.reason, self.hint = os.fspath(path), reason, hint
        super().__init__(f"cannot save to {self.path!r}: {reason} (what to do: {hint})")


def _as_tuple(example_inputs: Any) -> tuple:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _describe(err: BaseException, limit: int = 600) -> str:
    text = " ".join(str(err).split()) or "(no message)"
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"{type(err).__name__}: {text}"


# --- save ----------------------------------------------------------------------------------

def _is_torch_class(cls: Any) -> bool:
    return getattr(cls, "__module__", "").split(".")[0] == "torch"


def _stripped_body(body: dict) -> dict:
    """A GraphModule's pickled state without metadata and without a non-torch tracer class."""
    body = dict(body)
    body["meta"] = {}
    if not _is_torch_class(body.get("_tracer_cls")):
        body["_tracer_cls"] = None
        body["_tracer_extras"] = {}
    return body


class _StrippingPickler(pickle.Pickler):
    """Pickles every GraphModule (nested ones too) without ``meta``, leaving the module intact."""

    def reducer_override(self, obj):
        if isinstance(obj, fx.GraphModule):
            rebuild, (body, *rest) = obj.__reduce__()
            return rebuild, (_stripped_body(body), *rest)
        return NotImplemented


_STRIPPING_PICKLE = types.SimpleNamespace(__name__="fxprune_stripping_pickle",
                                          Pickler=_StrippingPickler)


def _recorded_inputs(module: torch.nn.Module) -> tuple | None:
    """Example inputs a module carries: a pruned module's plan's, else zeros of the shapes its
    placeholders record (``node.meta["fxprune"]``, ``"tensor_meta"`` or ``"val"``)."""
    if not isinstance(module, fx.GraphModule):
        return None
    recorded = getattr(module.meta.get("fxprune"), "example_inputs", None)
    if isinstance(recorded, tuple) and recorded:
        return recorded
    inputs = []
    for node in module.graph.find_nodes(op="placeholder"):
        meta = node.meta.get("fxprune") or {}
        found = [(meta.get("shape"), meta.get("dtype")),
                 *[(getattr(node.meta.get(k), "shape", None), getattr(node.meta.get(k), "dtype", None))
                   for k in ("tensor_meta", "val")]]
        shape, dtype = next(((s, d) for s, d in found if s is not None and isinstance(d, torch.dtype)), (None, None))
        try:
            inputs.append(torch.zeros([int(d) for d in shape], dtype=dtype))
        except (TypeError, ValueError, RuntimeError):
            return None
    return tuple(inputs) or None


@contextlib.contextmanager
def _eval_flags(module: torch.nn.Module):
    """Every submodule in eval mode for the capture, the caller's flags restored after."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        for m, _ in flags:
            m.training = False
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _batch_is_dynamic(program: Any, positions: list[int]) -> bool:
    users = program.graph_signature.user_inputs
    vals = {n.name: n.meta.get("val") for n in program.graph.find_nodes(op="placeholder")}
    return all(isinstance(getattr(vals.get(users[i]), "shape", [1])[0], torch.SymInt) for i in positions)


_CAPTURE_LOCK = threading.Lock()


def _capture(module: torch.nn.Module, inputs: tuple) -> fx.GraphModule:
    """``torch.export`` of the module in eval mode, with a dynamic batch dimension where the
    export allows it (captured at batch 2, so a batch-1 example is not specialised), else static."""
    positions = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.dim() > 0]
    with _eval_flags(module), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if positions and len(positions) == len(inputs):  # inputs map one to one onto placeholders
            wide = tuple(torch.cat([t, t]) if i in positions and t.shape[0] == 1 else t
                         for i, t in enumerate(inputs))
            spec = tuple({0: torch.export.Dim.AUTO} if i in positions else None for i in range(len(inputs)))
            try:
                program = torch.export.export(module, wide, dynamic_shapes=spec)
                if _batch_is_dynamic(program, positions):
                    return program.module(check_guards=False)
            except Exception:  # noqa: BLE001 - the static capture below reports the real error
                pass
        return torch.export.export(module, inputs).module(check_guards=False)


def _save_graph(module: torch.nn.Module, path: Path, example_inputs: Any) -> dict:
    inputs = _as_tuple(example_inputs) if example_inputs is not None else _recorded_inputs(module)
    if inputs is None:
        raise SaveError(path, "no example inputs: the module is captured with torch.export, which runs "
                              "it on inputs of the right shapes",
                        "pass example_inputs=(x,) (the inputs you pruned with; modules made by "
                        "fxprune.transform carry theirs)")
    try:
        with _CAPTURE_LOCK:  # torch.export is not documented thread-safe; writing the file is
            gm = _capture(module, inputs)
    except Exception as err:  # torch.export raises many types; report them uniformly
        raise SaveError(path, f"torch.export could not capture the module ({_describe(err, 400)})",
                        "pass example inputs that forward accepts; for Python control flow on tensor "
                        "values, " + _PICKLE_HINT) from err
    try:
        record = graph_format.encode(gm, type(module).__name__)
        graph_format.decode(record, None)  # what load would refuse is refused now, not later
    except (graph_format.Unsupported, graph_format.Malformed) as err:
        raise SaveError(path, f"the safe format cannot store {err}", _PICKLE_HINT) from None
    return record


def save(module: torch.nn.Module, path: str | os.PathLike, example_inputs: Any = None, *,
         format: str = "graph") -> Path:
    """Save a module so that :func:`load` restores it without fxprune's objects or the model's class.

    ``format="graph"`` (default, safe to load): the module is captured in eval mode with
    ``torch.export`` on ``example_inputs`` (default: the inputs a module made by
    ``fxprune.transform`` carries, else shapes recorded on its placeholders; else
    :class:`SaveError` asking for them), with a dynamic batch dimension where export allows.
    The file is a ``torch.save`` of plain data: the ATen graph as JSON and the tensors under
    their original names, so :func:`load` never runs code named by the file. The loaded module
    is an inference graph: it computes what ``module.eval()`` computes, whatever its train flag.
    Models torch.export cannot capture (control flow on tensor values, custom ops) raise
    :class:`SaveError`.

    ``format="pickle"``: today's pickled module (version 1: for a ``GraphModule``, ``gm.meta``
    and a custom tracer class are left out, so it loads without them; submodules of custom
    classes need their class at load time). Any module, no inputs needed, but a pickle runs code
    when read, so :func:`load` opens it only with ``trusted=True``.

    The file is replaced atomically (:func:`fxprune.atomic.atomic_write`): an interrupted save or
    a full disk (:class:`~fxprune.atomic.DiskFullError`) leaves the previous file unchanged.

    Example:
        >>> import tempfile, os, torch
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 2)))
        >>> x = torch.randn(3, 4)
        >>> path = save(gm, os.path.join(tempfile.mkdtemp(), "m.pt"), (x,))
        >>> torch.equal(load(path)(x), gm(x))
        True
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"save expects a torch.nn.Module, got {type(module).__name__}")
    if format not in ("graph", "pickle"):
        raise ValueError(f"save format must be 'graph' (safe to load) or 'pickle' (trusted only), got {format!r}")
    path = Path(path)
    if format == "pickle":
        record = {"format": SAVE_FORMAT, "version": PICKLE_VERSION, "module": module}
        with atomic_write(path) as f:
            torch.save(record, f, pickle_module=_STRIPPING_PICKLE)
        return path
    record = _save_graph(module, path, example_inputs)
    with atomic_write(path) as f:
        torch.save(record, f)
    return path


# --- load ----------------------------------------------------------------------------------

_SCAN_LIMIT = 16 << 20


def _pickle_globals(data: bytes) -> list[str]:
    """Names a pickle stream would import (GLOBAL, STACK_GLOBAL, INST), read with pickletools,
    which parses and runs nothing; every pickle in sequence (torch's legacy format has several)."""
    found: list[str] = []
    strings: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    found.append(".".join(strings[-2:]))
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:  # noqa: BLE001 - not (or no longer) a pickle: stop reading
            break
    return found


def _code_named_by(path: Path) -> list[str]:
    """What a file that ``torch.load(weights_only=True)`` refused would import (not allowlisted)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")][:1]
                data = archive.open(names[0]).read(_SCAN_LIMIT) if names else b""
        else:
            with open(path, "rb") as f:
                data = f.read(_SCAN_LIMIT)
    except Exception:  # noqa: BLE001 - unreadable: the caller reports the file as corrupt
        return []
    allowed = getattr(torch._weights_only_unpickler, "_get_allowed_globals", dict)()
    return list(dict.fromkeys(n for n in _pickle_globals(data) if n not in allowed))


def _needs_trust(path: Path, names: list[str]) -> LoadError:
    shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    return LoadError(path, f"the file is a pickle that imports {shown} while it is read (a module "
                     "saved with format='pickle' or by fxprune before the graph format, torch.save(module), "
                     "or pickle.dump); reading it would run whatever code the file names, so it is refused "
                     "by default. Only if you made it yourself or trust its source: fxprune.load(path, "
                     "trusted=True); then re-save it with fxprune.save(module, path, example_inputs) to get "
                     "the safe graph format")


def _corrupt(path: Path, err: BaseException, map_location: Any = None) -> LoadError:
    if "deserialize object on" in str(err):  # e.g. CUDA tensors on a machine without a GPU
        return LoadError(path, f"its tensors cannot go to map_location={map_location!r} "
                         f"({_describe(err, 200)}); pass map_location='cpu'")
    return LoadError(path, f"the file is corrupt, truncated or not a torch.save file "
                     f"({path.stat().st_size} bytes; {_describe(err, 300)})")


def _read_safe(path: Path, map_location: Any) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, no code run."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for bad files
        names = _code_named_by(path)
        raise (_needs_trust(path, names) if names else _corrupt(path, err, map_location)) from None


def _read_trusted(path: Path, map_location: Any) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return torch.load(path, map_location=map_location, weights_only=False)
            except RuntimeError as err:
                if "magic number" not in str(err):
                    raise
            with open(path, "rb") as plain:  # written by pickle.dump, not torch.save
                return pickle.load(plain)
    except (ModuleNotFoundError, AttributeError, ImportError) as err:
        raise LoadError(path, f"the file refers to code that cannot be imported here "
                        f"({_describe(err, 300)}); make the model's module importable, or save "
                        "the module with fxprune.save(module, path, example_inputs)") from err
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError, ValueError,
            TypeError, KeyError, IndexError, OSError, UnicodeDecodeError) as err:
        raise _corrupt(path, err, map_location) from err


def _module_of(path: Path, obj: Any, map_location: Any) -> torch.nn.Module:
    if isinstance(obj, dict) and obj.get("format") == SAVE_FORMAT:
        version = obj.get("version")
        if type(version) is not int or version < 1:
            raise LoadError(path, f"the record's 'version' is {version!r}, not a positive integer; "
                            "the file was not written by fxprune.save")
        if version > SAVE_VERSION:
            raise LoadError(path, f"format version {version!r} is newer than this fxprune reads "
                            f"(up to {SAVE_VERSION}); upgrade fxprune")
        if version == PICKLE_VERSION:
            if "module" not in obj:
                raise LoadError(path, "the record has no 'module' entry")
            obj = obj["module"]
        else:
            device = torch.device(map_location) if isinstance(map_location, (str, torch.device)) else None
            try:
                return graph_format.decode(obj, device)
            except (graph_format.Malformed, KeyError, TypeError, ValueError, AttributeError, RuntimeError,
                    RecursionError) as err:
                raise LoadError(path, f"the graph record is malformed: {err}; the file was not written "
                                "by fxprune.save, or was changed after: save the model again") from None
    if not isinstance(obj, torch.nn.Module):
        note = (" (a state_dict: load it into the pruned architecture, e.g. fxprune.rebuild(model, "
                "plan, example_inputs, state_dict=...))" if isinstance(obj, dict) else "")
        raise LoadError(path, f"the file holds an object of type {type(obj).__name__}, "
                        f"not a torch.nn.Module{note}")
    return obj


def load(path: str | os.PathLike, map_location: Any = "cpu", *, trusted: bool = False) -> torch.nn.Module:
    """Load a module written by :func:`save`; with ``trusted=True`` also any pickled module.

    By default the file is read with ``torch.load(weights_only=True)`` and only the graph format
    is accepted: nothing the file names is imported or run, beyond ATen operators and a few
    arithmetic functions in its graph. The result is a ``torch.fx.GraphModule`` in eval mode
    whose ``state_dict`` keys are the original module's. A pickle (``format="pickle"``, files of
    earlier fxprune versions, ``torch.save(module)``, ``pickle.dump``) is refused with a
    :class:`LoadError` naming what it would import, *without* unpickling it: unpickling runs
    any code the file names, so a file from someone else could do anything. ``trusted=True``
    unpickles it (today's behaviour, plain ``pickle`` files included): use it only for files you
    made or trust. (A hostile graph file still cannot run Python code; like any model file it can
    make the model compute nonsense or allocate much memory when called.) Tensors go to
    ``map_location`` (``"cpu"`` by default). A missing, truncated or corrupt file, or one that
    holds something other than a module, raises :class:`LoadError` naming the path.

    Example:
        >>> import tempfile, os, torch
        >>> path = save(torch.nn.Linear(4, 2), os.path.join(tempfile.mkdtemp(), "m.pt"), torch.randn(2, 4))
        >>> sorted(load(path).state_dict())
        ['bias', 'weight']
        >>> _ = save(torch.nn.Linear(4, 2), path, format="pickle")
        >>> type(load(path, trusted=True)).__name__
        'Linear'
    """
    path = Path(path)
    if not path.exists():
        raise LoadError(path, "the file does not exist")
    if not path.is_file():
        raise LoadError(path, "the path is not a regular file")
    obj = _read_trusted(path, map_location) if trusted else _read_safe(path, map_location)
    return _module_of(path, obj, map_location)
