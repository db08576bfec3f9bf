"""Save a (compacted) model so it reloads without its construction code and without pickle.

A compacted model has narrower layers than its class's ``__init__`` would build, so it
cannot be rebuilt by calling the constructor. :func:`save` writes a directory with

* ``model.safetensors``: the ``state_dict`` tensors (plus non-persistent buffers, so the
  reloaded model computes exactly what the saved one did), and
* ``architecture.json``: the module tree, each node naming its class, its plain
  attributes (``in_features``, ``kernel_size``, ...), its parameter and buffer shapes and
  its children.

:func:`load` rebuilds every node with ``cls.__new__`` + ``nn.Module.__init__``, so no
constructor runs, and imports a class only from ``torch.nn``, ``torchdam`` or modules
the caller lists in ``trusted_modules``. Nothing is unpickled.

    >>> import tempfile, torch
    >>> from torch import nn
    >>> from torchdam.serialize import save, load
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    >>> d = save(net, tempfile.mkdtemp(), metadata={"model": "toy"})
    >>> x = torch.randn(5, 4)
    >>> torch.equal(load(d)(x), net(x))
    True
"""
from __future__ import annotations

import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from torchdam.errors import CheckpointError

__all__ = ["ARCH_FILE", "WEIGHTS_FILE", "load", "load_metadata", "save"]

WEIGHTS_FILE = "model.safetensors"
ARCH_FILE = "architecture.json"
FORMAT = "torchdam-arch"
VERSION = 1
#: Class modules :func:`load` imports without being told to trust them.
BUILTIN_TRUSTED = ("torch.nn", "torchdam")

# nn.Module's own bookkeeping; rebuilt by nn.Module.__init__, never stored.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)
_HOOK_DICTS = sorted(k for k, v in nn.Module().__dict__.items() if "hook" in k and isinstance(v, dict))


class _Unstorable(Exception):
    """An attribute value has no JSON encoding; the message says what it is."""


# ---------------------------------------------------------------------------- values
# JSON has no tuples or dtypes, and kernel_size=(3, 3) must come back as a tuple, so
# every JSON object in an attribute value is a one-key tag.

def _encode(value: Any) -> Any:
    if value is None or type(value) in (bool, int, float, str):
        return value
    if type(value) is list:
        return [_encode(v) for v in value]
    if type(value) in (tuple, torch.Size):
        return {"tuple": [_encode(v) for v in value]}
    if type(value) is dict and all(type(k) is str for k in value):
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": _dtype_name(value)}
    if isinstance(value, torch.Tensor):
        raise _Unstorable("a tensor that is not a registered buffer or parameter; "
                          "register it with register_buffer")
    raise _Unstorable(f"a {type(value).__qualname__}, which architecture.json cannot store; "
                      "make it a plain int/float/bool/str/None (or tuple/list/dict of those)")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        (tag, inner), = value.items()
        if tag == "tuple":
            return tuple(_decode(v) for v in inner)
        if tag == "dict":
            return {k: _decode(v) for k, v in inner.items()}
        if tag == "dtype":
            return _dtype(inner)
        raise ValueError(f"unknown value tag {tag!r}")
    return value


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


# ---------------------------------------------------------------------------- save

def _where(path: str) -> str:
    return f"module '{path}'" if path else "the root module"


def _describe(module: nn.Module, path: str, seen: dict[int, str], nonpersistent: dict) -> dict:
    """One architecture node; ``seen`` maps shared modules/parameters to their first path."""
    cls = type(module)
    for key in _HOOK_DICTS:
        if getattr(module, key, None):
            raise CheckpointError(
                f"cannot save: {_where(path)} ({cls.__name__}) has {key.strip('_')} registered, "
                "which a saved model cannot carry; remove them (torchdam.detach, or compact first)")
    if "<locals>" in cls.__qualname__:
        raise CheckpointError(
            f"cannot save: {_where(path)} is an instance of {cls.__qualname__}, a class defined "
            "inside a function, which load cannot import; define it at module level")
    attrs = {}
    for key, value in module.__dict__.items():
        if key in _MODULE_INTERNALS:
            continue
        try:
            attrs[key] = _encode(value)
        except _Unstorable as err:
            raise CheckpointError(
                f"cannot save: attribute {key!r} of {_where(path)} ({cls.__name__}) is {err}") from None
    params = {}
    for name, p in module._parameters.items():
        full = f"{path}.{name}" if path else name
        if p is None:
            params[name] = None
        elif id(p) in seen:
            params[name] = {"ref": seen[id(p)]}
        else:
            seen[id(p)] = full
            params[name] = {"shape": list(p.shape), "dtype": _dtype_name(p.dtype),
                            "requires_grad": p.requires_grad}
    buffers = {}
    for name, b in module._buffers.items():
        persistent = name not in module._non_persistent_buffers_set
        if b is None:
            buffers[name] = None
            continue
        buffers[name] = {"shape": list(b.shape), "dtype": _dtype_name(b.dtype), "persistent": persistent}
        if not persistent:
            nonpersistent[f"{path}.{name}" if path else name] = b
    children = {}
    for name, child in module._modules.items():
        full = f"{path}.{name}" if path else name
        if child is None:
            children[name] = None
        elif id(child) in seen:
            children[name] = {"ref": seen[id(child)]}
        else:
            seen[id(child)] = full
            children[name] = _describe(child, full, seen, nonpersistent)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "module": cls.__module__,
            "attrs": attrs, "training": module.training, "params": params,
            "buffers": buffers, "children": children}


def _write_atomic(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(model: nn.Module, path: str | Path, metadata: dict | None = None) -> Path:
    """Write ``model`` to directory ``path`` (created if needed) and return that directory.

    ``metadata`` is any JSON-able dict (model name, widths, example input shape, ...),
    read back by :func:`load_metadata`. Raises :class:`CheckpointError`, naming the module
    and attribute, for a model that could not be reloaded: forward/backward hooks,
    attributes such as lambdas or unregistered tensors, classes defined inside functions.

        >>> import tempfile
        >>> from torch import nn
        >>> d = save(nn.Linear(3, 2), tempfile.mkdtemp(), {"widths": {"": 2}})
        >>> sorted(p.name for p in d.iterdir())
        ['architecture.json', 'model.safetensors']
    """
    directory = Path(path)
    nonpersistent: dict[str, torch.Tensor] = {}
    root = _describe(model, "", {id(model): ""}, nonpersistent)
    try:
        arch = json.dumps({"format": FORMAT, "version": VERSION, "root": root,
                           "metadata": dict(metadata or {})}, indent=1)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"cannot save: metadata is not JSON-able ({err}); "
                              "pass plain numbers, strings, lists and dicts") from None
    tensors = {}
    for key, t in [*model.state_dict().items(), *nonpersistent.items()]:
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"cannot save: state_dict entry {key!r} is a {type(t).__name__}, "
                                  "not a tensor; safetensors stores tensors only")
        # clone: safetensors refuses tensors that share storage (tied weights, views)
        tensors[key] = t.detach().cpu().contiguous().clone()
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / WEIGHTS_FILE, safetensors_bytes(tensors))
    _write_atomic(directory / ARCH_FILE, arch.encode())
    return directory


# ---------------------------------------------------------------------------- load

def _read_arch(directory: Path) -> dict:
    file = directory / ARCH_FILE
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no saved model directory there; pass the directory save() wrote")
    try:
        arch = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; is {directory} a directory written by torchdam.save?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: unreadable or corrupted ({err}); save the model again") from None
    if not isinstance(arch, dict) or arch.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a torchdam architecture file (format is not {FORMAT!r})")
    if arch.get("version") != VERSION:
        raise CheckpointError(f"{file}: format version {arch.get('version')!r} is not supported "
                              f"(this torchdam reads version {VERSION})")
    return arch


def load_metadata(path: str | Path) -> dict:
    """The ``metadata`` dict passed to :func:`save`, without loading any weights."""
    directory = Path(path)
    metadata = _read_arch(directory).get("metadata", {})
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{directory / ARCH_FILE}: 'metadata' is not a dict")
    return metadata


def _allowed(module_name: str, trusted: Sequence[str]) -> bool:
    return any(module_name == t or module_name.startswith(t + ".") for t in (*BUILTIN_TRUSTED, *trusted))


def _import_class(node: dict, trusted: Sequence[str], file: Path) -> type:
    full, module_name = node["class"], node["module"]
    if not _allowed(module_name, trusted):
        raise CheckpointError(
            f"{file}: refusing to import class {full!r}: its module is not in torch.nn or torchdam; "
            f"if you trust it, pass trusted_modules=[{module_name!r}]")
    if not full.startswith(module_name + "."):
        raise ValueError(f"class {full!r} is not in module {module_name!r}")
    qualname = full[len(module_name) + 1:]
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    # The class must really live where the file says, so an attribute walk through an
    # allowed module (torch.nn.x.os.system, ...) cannot reach anything else.
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)
            and obj.__module__ == module_name and obj.__qualname__ == qualname):
        raise CheckpointError(f"{file}: {full!r} is not an nn.Module class defined in {module_name!r}")
    return obj


def _build(node: dict, path: str, built: dict[str, Any], trusted: Sequence[str], file: Path) -> nn.Module:
    cls = _import_class(node, trusted, file)
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    built[path] = module
    for key, value in node["attrs"].items():
        if key in _MODULE_INTERNALS:
            raise ValueError(f"attribute {key!r} is nn.Module bookkeeping")
        module.__dict__[key] = _decode(value)
    module.training = bool(node["training"])
    for name, spec in node["params"].items():
        full = f"{path}.{name}" if path else name
        if spec is None:
            module._parameters[name] = None
        elif "ref" in spec:
            module._parameters[name] = built[spec["ref"]]
        else:
            p = nn.Parameter(torch.empty(spec["shape"], dtype=_dtype(spec["dtype"])),
                             requires_grad=bool(spec["requires_grad"]))
            module._parameters[name] = built[full] = p
    for name, spec in node["buffers"].items():
        module._buffers[name] = None if spec is None else torch.empty(spec["shape"], dtype=_dtype(spec["dtype"]))
        if spec is not None and not spec["persistent"]:
            module._non_persistent_buffers_set.add(name)
    for name, child in node["children"].items():
        full = f"{path}.{name}" if path else name
        if child is None:
            module._modules[name] = None
        elif "ref" in child:
            module._modules[name] = built[child["ref"]]
        else:
            module._modules[name] = _build(child, full, built, trusted, file)
    return module


def _nonpersistent_paths(model: nn.Module) -> set[str]:
    return {f"{path}.{name}" if path else name
            for path, m in model.named_modules()
            for name in m._non_persistent_buffers_set if m._buffers.get(name) is not None}


def load(path: str | Path, trusted_modules: Sequence[str] = ()) -> nn.Module:
    """Rebuild the model :func:`save` wrote to ``path``, with its saved training flags.

    Classes outside ``torch.nn`` and ``torchdam`` are imported only from modules listed
    in ``trusted_modules`` (a module name covers its submodules); their ``__init__`` never
    runs. Raises :class:`CheckpointError` naming the file for a missing, truncated,
    corrupted or mismatched checkpoint and for a class it refuses to import.

        >>> import tempfile, torch
        >>> from torch import nn
        >>> d = save(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten()), tempfile.mkdtemp())
        >>> load(d)(torch.zeros(1, 1, 4, 4)).shape
        torch.Size([1, 32])
    """
    directory = Path(path)
    arch = _read_arch(directory)
    arch_file, weights_file = directory / ARCH_FILE, directory / WEIGHTS_FILE
    try:
        model = _build(arch["root"], "", {}, tuple(trusted_modules), arch_file)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, ImportError, RuntimeError) as err:
        raise CheckpointError(f"{arch_file}: malformed architecture ({type(err).__name__}: {err}); "
                              "save the model again") from None
    if not weights_file.is_file():
        raise CheckpointError(f"{weights_file}: missing; the directory holds no saved weights")
    try:
        tensors = load_file(weights_file)
    except Exception as err:  # safetensors raises its own error types for bad headers/sizes
        raise CheckpointError(f"{weights_file}: not a readable safetensors file ({err}); "
                              "it may be truncated or not written by torchdam.save") from None
    extra = _nonpersistent_paths(model)
    try:
        model.load_state_dict({k: v for k, v in tensors.items() if k not in extra}, strict=True)
        for key in extra:
            owner, _, name = key.rpartition(".")
            buffer = model.get_submodule(owner)._buffers[name]
            if tensors[key].shape != buffer.shape:
                raise RuntimeError(f"shape mismatch for non-persistent buffer {key!r}")
            buffer.copy_(tensors[key])
    except (RuntimeError, KeyError) as err:
        detail = " ".join(str(err).split())
        raise CheckpointError(f"{weights_file}: does not match {ARCH_FILE} ({detail})") from None
    return model
