"""Save a (compacted) model so it reloads without its construction code and without pickle.

A compacted model has narrower layers than its class's ``__init__`` would build, so it
cannot be rebuilt by calling the constructor. :func:`save` writes a directory with

* ``model.safetensors``: the ``state_dict`` tensors (plus non-persistent buffers, so the
  reloaded model computes exactly what the saved one did), and
* ``architecture.json``: the module tree, each node naming its class, its plain
  attributes (``in_features``, ``kernel_size``, ...), its parameter and buffer shapes and
  its children, plus a table of the few non-module objects modules refer to (Hugging
  Face config objects, stored once so modules sharing one config still share it).

:func:`load` rebuilds every node with ``cls.__new__`` + ``nn.Module.__init__``, so no
constructor runs, and sets each node's attributes to the saved values, so a narrowed
layer keeps its narrowed attributes (``num_attention_heads``, ``hidden_size``, ...) rather
than what a config would recompute. Only allow-listed names are ever looked up:

* module classes from ``torch.nn``, ``torchdam``, Hugging Face ``transformers`` model code
  (:data:`HF_MODULE_CLASSES`), classes passed to :func:`register_module`, and modules the
  caller lists in ``trusted_modules``;
* config objects of Hugging Face config classes (:data:`HF_OBJECT_CLASSES`), rebuilt with
  ``object.__new__`` and their saved ``__dict__``;
* functions held as attributes (a ``TransformerEncoderLayer``'s ``activation``) by their
  key in :data:`FUNCTIONS` (extend it with :func:`register_function`).

Nothing is unpickled, and ``transformers`` is imported only when a file names its classes.

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

import functools
import importlib
import inspect
import json
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from torchdam.atomic import write_atomic
from torchdam.errors import CheckpointError, ConfigError

__all__ = ["ARCH_FILE", "FUNCTIONS", "METHODS", "RULES", "WEIGHTS_FILE", "Rule", "load", "load_metadata",
           "register_function", "register_module", "save"]

WEIGHTS_FILE = "model.safetensors"
ARCH_FILE = "architecture.json"
FORMAT = "torchdam-arch"
VERSION = 2
#: Versions :func:`load` reads (version 1 files have no function/object/set values).
READABLE_VERSIONS = (1, 2)
#: Class modules :func:`load` imports without being told to trust them.
BUILTIN_TRUSTED = ("torch.nn", "torchdam")
#: Hugging Face modules whose ``nn.Module`` classes :func:`load` imports without being told:
#: model code, ``Conv1D`` and the ``ACT2FN`` activation modules.
HF_MODULE_CLASSES = re.compile(
    r"transformers\.(?:models\.[A-Za-z0-9_]+\.modeling_[A-Za-z0-9_]+|pytorch_utils|activations)")
#: Hugging Face modules whose config classes :func:`load` rebuilds as attribute values.
HF_OBJECT_CLASSES = re.compile(
    r"transformers\.(?:models\.[A-Za-z0-9_]+\.configuration_[A-Za-z0-9_]+"
    r"|configuration_utils|generation\.configuration_utils)")
#: An attribute object must be an instance of one of these (transformers 4 and 5 names).
_HF_OBJECT_BASES = frozenset({
    "transformers.configuration_utils.PreTrainedConfig",
    "transformers.configuration_utils.PretrainedConfig",
    "transformers.generation.configuration_utils.GenerationConfig",
})
_INSTALL_TRANSFORMERS = "pip install transformers"

_ACTIVATIONS = ("celu", "elu", "gelu", "glu", "hardsigmoid", "hardswish", "hardtanh", "leaky_relu",
                "logsigmoid", "mish", "relu", "relu6", "rrelu", "selu", "sigmoid", "silu", "softplus",
                "softsign", "tanh", "tanhshrink")
#: Functions a module may hold as an attribute, by the name the file stores. :func:`load`
#: looks a stored name up here and nowhere else. Extend with :func:`register_function`.
FUNCTIONS: dict[str, Callable] = {
    **{f"torch.nn.functional.{name}": getattr(F, name) for name in _ACTIVATIONS},
    **{f"torch.{name}": getattr(torch, name) for name in ("relu", "sigmoid", "tanh")},
}
#: class qualified name -> methods an instance may hold bound to itself as an attribute
#: (HF activations choose ``self.act = self._gelu_python``); load binds them again by name.
METHODS: dict[str, frozenset[str]] = {
    "transformers.activations.GELUActivation": frozenset({"_gelu_python"}),
    "transformers.activations.GELUTanh": frozenset({"_gelu_tanh_python"}),
}
#: Classes registered with :func:`register_module`, by qualified name.
_REGISTERED: dict[str, type] = {}
#: every dtype by its name without ``torch.`` (aliases such as ``torch.float`` map to their dtype)
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}

# nn.Module's own bookkeeping; rebuilt by nn.Module.__init__, never stored.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)
_HOOK_DICTS = sorted(k for k, v in nn.Module().__dict__.items() if "hook" in k and isinstance(v, dict))
_REBUILD_ADVICE = "or save the state_dict with safetensors and rebuild the model in code"


class _Unstorable(Exception):
    """A value has no JSON encoding; the message says what it is and what to do."""


class _BadAttribute(Exception):
    """``args = (attribute name, why)``: the attribute whose value is _Unstorable."""


def _qualified(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


# ---------------------------------------------------------------------------- registration

def register_module(cls: type) -> type:
    """Let :func:`load` rebuild instances of ``cls``, looked up by its exact qualified name.

    Narrower than ``trusted_modules`` (one class, not a whole module). Registration lives in
    the process, so the loading process must register the class too (e.g. where it is
    defined). Returns ``cls``, so it works as a class decorator.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"register_module expects an nn.Module subclass, got {cls!r}")
    if "<locals>" in cls.__qualname__:
        raise ConfigError(f"register_module: {cls.__qualname__} is defined inside a function; "
                          "define it at module level so both processes name it the same")
    _REGISTERED[_qualified(cls)] = cls
    return cls


def register_function(fn: Callable, name: str | None = None) -> Callable:
    """Allow-list ``fn`` as a module attribute value, stored in files as ``name``.

    ``name`` defaults to ``fn``'s qualified name; a lambda or nested function has none that
    another process would share, so it needs an explicit ``name``. The loading process must
    register the same name. Returns ``fn``.
    """
    if not callable(fn) or isinstance(fn, type):
        raise ConfigError(f"register_function expects a function, got {fn!r}")
    if name is None:
        qualname = getattr(fn, "__qualname__", "<lambda>")
        if "<lambda>" in qualname or "<locals>" in qualname:
            raise ConfigError(f"register_function: {qualname} has no stable name; define it at "
                              "module level or pass name=")
        name = f"{fn.__module__}.{qualname}"
    if FUNCTIONS.get(name, fn) is not fn:
        raise ConfigError(f"register_function: another function is already registered as {name!r}")
    FUNCTIONS[name] = fn
    return fn


# ---------------------------------------------------------------------------- per-type rules

@dataclass(frozen=True)
class Rule:
    """How a module type's state differs from "its ``__dict__``, parameters, buffers and
    children": ``derived`` attributes are not stored (they hold tensors or weak references)
    and ``rebuild`` recreates them once the module's parameters exist."""

    derived: frozenset[str] = frozenset()
    rebuild: Callable[[nn.Module], None] | None = None


def _rebuild_rnn(rnn: nn.RNNBase) -> None:
    # The RNN kernels read the parameter list _flat_weights (and cuDNN a flattened copy);
    # _init_flat_weights rebuilds both from _flat_weights_names, as RNNBase.__init__ and
    # _apply do, so the list holds the loaded parameters themselves.
    unknown = [n for n in rnn._flat_weights_names if n not in rnn._parameters]
    if unknown:
        raise ValueError(f"_flat_weights_names {unknown} are not parameters of the {type(rnn).__name__}")
    rnn._init_flat_weights()


#: module type (matched along the MRO) -> its :class:`Rule`. Extend it for another type
#: whose ``__dict__`` holds derived tensors.
RULES: dict[type, Rule] = {
    nn.RNNBase: Rule(frozenset({"_flat_weights", "_flat_weight_refs"}), _rebuild_rnn),
}
_NO_RULE = Rule()


def _rule(cls: type) -> Rule:
    return next((RULES[c] for c in cls.__mro__ if c in RULES), _NO_RULE)


# ---------------------------------------------------------------------------- values
# JSON has no tuples, sets, dtypes or int-keyed dicts, and kernel_size=(3, 3) must come back
# as a tuple, so every JSON object in an attribute value is a one-key tag.

def _object_allowed(cls: type) -> bool:
    """True for Hugging Face config classes, the only non-module objects a file may hold."""
    return (HF_OBJECT_CLASSES.fullmatch(cls.__module__) is not None and "<locals>" not in cls.__qualname__
            and any(_qualified(base) in _HF_OBJECT_BASES for base in cls.__mro__))


_FUNCTION_TYPES = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial)


def _unstorable(value: Any) -> _Unstorable:
    if isinstance(value, torch.Tensor):
        return _Unstorable("a tensor that is not a registered buffer or parameter; "
                           "register it with register_buffer")
    if isinstance(value, _FUNCTION_TYPES):
        name = getattr(value, "__qualname__", type(value).__qualname__)
        return _Unstorable(
            f"a function ({name}) that is not allow-listed; make it an nn.Module child (e.g. "
            "nn.GELU()), or register a module-level function with "
            "torchdam.serialize.register_function(fn) in the saving and the loading process, "
            + _REBUILD_ADVICE)
    return _Unstorable(f"a {type(value).__qualname__} object, which architecture.json cannot store; "
                       "make it a plain int/float/bool/str/None (or tuple/list/set/dict of those), "
                       + _REBUILD_ADVICE)


def _sorted(encoded: list) -> list:
    return sorted(encoded, key=lambda v: json.dumps(v, sort_keys=True))


def _encode_dict(enc: _Encoder, value: dict) -> dict:
    if all(type(k) is str for k in value):
        return {"dict": {k: enc(v) for k, v in value.items()}}
    return {"items": [[enc(k), enc(v)] for k, v in value.items()]}


#: exact value type -> JSON encoding.
_ENCODERS: dict[type, Callable[[Any, Any], Any]] = {
    type(None): lambda enc, v: v, bool: lambda enc, v: v, int: lambda enc, v: v,
    float: lambda enc, v: v, str: lambda enc, v: v,
    list: lambda enc, v: [enc(x) for x in v],
    tuple: lambda enc, v: {"tuple": [enc(x) for x in v]},
    torch.Size: lambda enc, v: {"tuple": [enc(x) for x in v]},
    set: lambda enc, v: {"set": _sorted([enc(x) for x in v])},
    frozenset: lambda enc, v: {"frozenset": _sorted([enc(x) for x in v])},
    dict: _encode_dict,
    torch.dtype: lambda enc, v: {"dtype": _dtype_name(v)},
    torch.device: lambda enc, v: {"device": str(v)},
}


class _Encoder:
    """Attribute values -> JSON. Objects (HF configs) go to one table, each stored once, so
    a config shared by many modules is still one object after :func:`load`."""

    def __init__(self) -> None:
        self.objects: list[dict] = []
        self._index: dict[int, int] = {}
        self._functions = {id(f): name for name, f in reversed(list(FUNCTIONS.items()))}
        self._owner: Any = None
        # tried in order for values whose type has no entry in _ENCODERS
        self._special = (self._function, self._partial, self._method, self._object)

    def attrs(self, owner: Any, items: dict[str, Any]) -> dict[str, Any]:
        """Encodes ``owner``'s attributes; raises _BadAttribute naming the first unstorable one."""
        outer, self._owner = self._owner, owner
        try:
            encoded = {}
            for key, value in items.items():
                try:
                    encoded[key] = self(value)
                except _Unstorable as err:
                    raise _BadAttribute(key, str(err)) from None
            return encoded
        finally:
            self._owner = outer

    def __call__(self, value: Any) -> Any:
        encode = _ENCODERS.get(type(value))
        if encode is not None:
            return encode(self, value)
        for special in self._special:
            encoded = special(value)
            if encoded is not None:
                return encoded
        raise _unstorable(value)

    def _function(self, value: Any) -> dict | None:
        name = self._functions.get(id(value))
        return None if name is None else {"function": name}

    def _partial(self, value: Any) -> dict | None:
        """``functools.partial`` of an allow-listed function (HF ``GELUTanh.act``)."""
        if type(value) is not functools.partial or vars(value) or id(value.func) not in self._functions:
            return None
        return {"partial": {"function": self._functions[id(value.func)], "args": [self(a) for a in value.args],
                            "kwargs": self(dict(value.keywords))}}

    def _method(self, value: Any) -> dict | None:
        """A bound method of the module holding it, allow-listed in :data:`METHODS`."""
        owner = self._owner
        if not (isinstance(value, types.MethodType) and value.__self__ is owner):
            return None
        name = value.__func__.__name__
        if (name not in METHODS.get(_qualified(type(owner)), ())
                or inspect.getattr_static(type(owner), name, None) is not value.__func__):
            return None
        return {"method": name}

    def _object(self, value: Any) -> dict | None:
        cls = type(value)
        if not _object_allowed(cls):
            return None
        index = self._index.get(id(value))
        if index is None:
            index = self._index[id(value)] = len(self.objects)
            node: dict = {"class": _qualified(cls), "module": cls.__module__}
            self.objects.append(node)
            try:
                node["attrs"] = self.attrs(value, vars(value))
            except _BadAttribute as err:
                key, why = err.args
                raise _Unstorable(f"a {cls.__qualname__} whose attribute {key!r} is {why}") from None
        return {"object": index}


class _Decoder:
    """JSON -> attribute values; functions, methods and objects only from the allow-lists."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.objects: list[Any] = []
        self.owner: Any = None

    def __call__(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, dict):
            (tag, inner), = value.items()
            decode = _DECODERS.get(tag)
            if decode is None:
                raise ValueError(f"unknown value tag {tag!r}")
            return decode(self, inner)
        return value

    def function(self, name: str) -> Callable:
        fn = FUNCTIONS.get(name) if isinstance(name, str) else None
        if fn is None:
            raise CheckpointError(
                f"{self.file}: refusing function {name!r}: it is not in torchdam.serialize.FUNCTIONS; "
                "if you trust it, call torchdam.serialize.register_function(fn) before load")
        return fn

    def partial(self, spec: dict) -> functools.partial:
        args, kwargs = self(spec["args"]), self(spec["kwargs"])
        if not (isinstance(args, list) and isinstance(kwargs, dict)):
            raise TypeError("a partial needs a list of args and a dict of kwargs")
        return functools.partial(self.function(spec["function"]), *args, **kwargs)

    def method(self, name: str) -> Callable:
        cls = type(self.owner)
        if not isinstance(name, str) or name not in METHODS.get(_qualified(cls), ()):
            raise CheckpointError(f"{self.file}: refusing method {name!r} of {_qualified(cls)!r}: "
                                  "it is not in torchdam.serialize.METHODS")
        fn = inspect.getattr_static(cls, name, None)
        if not isinstance(fn, types.FunctionType):
            raise TypeError(f"{cls.__qualname__}.{name} is not a method")
        return types.MethodType(fn, self.owner)

    def object(self, index: int) -> Any:
        if type(index) is not int or not 0 <= index < len(self.objects):
            raise ValueError(f"no object {index!r} in the objects table")
        return self.objects[index]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}")
    return _DTYPES[name]


#: value tag -> decoder.
_DECODERS: dict[str, Callable[[_Decoder, Any], Any]] = {
    "tuple": lambda dec, v: tuple(dec(x) for x in v),
    "set": lambda dec, v: {dec(x) for x in v},
    "frozenset": lambda dec, v: frozenset(dec(x) for x in v),
    "dict": lambda dec, v: {k: dec(x) for k, x in v.items()},
    "items": lambda dec, v: {dec(k): dec(x) for k, x in v},
    "dtype": lambda dec, v: _dtype(v),
    "device": lambda dec, v: torch.device(v),
    "function": _Decoder.function,
    "partial": _Decoder.partial,
    "method": _Decoder.method,
    "object": _Decoder.object,
}


# ---------------------------------------------------------------------------- save

def _where(path: str) -> str:
    return f"module '{path}'" if path else "the root module"


def _describe(module: nn.Module, path: str, seen: dict[int, str], nonpersistent: dict, enc: _Encoder) -> dict:
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
    skip = _MODULE_INTERNALS | _rule(cls).derived
    try:
        attrs = enc.attrs(module, {k: v for k, v in module.__dict__.items() if k not in skip})
    except _BadAttribute as err:
        key, why = err.args
        raise CheckpointError(
            f"cannot save: attribute {key!r} of {_where(path)} ({cls.__name__}) is {why}") from None
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
            children[name] = _describe(child, full, seen, nonpersistent, enc)
    return {"class": _qualified(cls), "module": cls.__module__,
            "attrs": attrs, "training": module.training, "params": params,
            "buffers": buffers, "children": children}


def save(model: nn.Module, path: str | Path, metadata: dict | None = None) -> Path:
    """Write ``model`` to directory ``path`` (created if needed) and return that directory.

    ``metadata`` is any JSON-able dict (model name, widths, example input shape, ...),
    read back by :func:`load_metadata`. Raises :class:`CheckpointError`, naming the module
    and attribute and saying what to do instead, for a model that could not be reloaded:
    forward/backward hooks, attributes such as lambdas or unregistered tensors, classes
    defined inside functions.

        >>> import tempfile
        >>> from torch import nn
        >>> d = save(nn.Linear(3, 2), tempfile.mkdtemp(), {"widths": {"": 2}})
        >>> sorted(p.name for p in d.iterdir())
        ['architecture.json', 'model.safetensors']
    """
    directory = Path(path)
    nonpersistent: dict[str, torch.Tensor] = {}
    enc = _Encoder()
    root = _describe(model, "", {id(model): ""}, nonpersistent, enc)
    try:
        arch = json.dumps({"format": FORMAT, "version": VERSION, "root": root, "objects": enc.objects,
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
    write_atomic(directory / WEIGHTS_FILE, safetensors_bytes(tensors), "the model's weights")
    write_atomic(directory / ARCH_FILE, arch, "the model's architecture")
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
    if arch.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{file}: format version {arch.get('version')!r} is not supported "
                              f"(this torchdam reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    return arch


def load_metadata(path: str | Path) -> dict:
    """The ``metadata`` dict passed to :func:`save`, without loading any weights."""
    directory = Path(path)
    metadata = _read_arch(directory).get("metadata", {})
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{directory / ARCH_FILE}: 'metadata' is not a dict")
    return metadata


def _allowed(module_name: str, trusted: Sequence[str]) -> bool:
    return (HF_MODULE_CLASSES.fullmatch(module_name) is not None
            or any(module_name == t or module_name.startswith(t + ".") for t in (*BUILTIN_TRUSTED, *trusted)))


def _import(module_name: str, full: str, file: Path) -> types.ModuleType:
    """Imports an allow-listed module; ``transformers`` only now, when a file names it."""
    if module_name.split(".")[0] == "transformers":
        try:
            importlib.import_module("transformers")
        except ImportError:
            raise CheckpointError(f"{file}: class {full!r} is from Hugging Face transformers, which is "
                                  f"not installed; {_INSTALL_TRANSFORMERS}") from None
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        raise CheckpointError(f"{file}: class {full!r}: cannot import {module_name!r} ({err}); "
                              "install the library version the model was saved with") from None


def _lookup(node: dict, base: type, file: Path) -> type:
    """The class ``node`` names, imported from the module it names, without running
    descriptors or module ``__getattr__`` along the way."""
    full, module_name = node["class"], node["module"]
    if not (isinstance(full, str) and isinstance(module_name, str) and full.startswith(module_name + ".")):
        raise ValueError(f"class {full!r} is not in module {module_name!r}")
    qualname = full[len(module_name) + 1:]
    obj: Any = _import(module_name, full, file)
    for part in qualname.split("."):
        obj = inspect.getattr_static(obj, part, None)
    # The class must really live where the file says, so an attribute walk through an
    # allowed module (torch.nn.x.os.system, ...) cannot reach anything else.
    if not (isinstance(obj, type) and issubclass(obj, base)
            and obj.__module__ == module_name and obj.__qualname__ == qualname):
        raise CheckpointError(f"{file}: {full!r} is not a {base.__name__} class defined in {module_name!r}")
    return obj


@dataclass
class _Loader:
    """Rebuilds the objects table and the module tree of one architecture file."""

    file: Path
    trusted: Sequence[str]
    decoder: _Decoder
    built: dict[str, Any] = field(default_factory=dict)

    def module_class(self, node: dict) -> type:
        full, module_name = node["class"], node["module"]
        if isinstance(full, str) and full in _REGISTERED:
            return _REGISTERED[full]
        if not (isinstance(module_name, str) and _allowed(module_name, self.trusted)):
            raise CheckpointError(
                f"{self.file}: refusing to import class {full!r}: it is not in torch.nn, torchdam or "
                "Hugging Face transformers model code; if you trust it, call "
                "torchdam.serialize.register_module(cls) before load, or pass "
                f"trusted_modules=[{module_name!r}]")
        return _lookup(node, nn.Module, self.file)

    def object_class(self, node: dict) -> type:
        full, module_name = node["class"], node["module"]
        if not (isinstance(module_name, str) and HF_OBJECT_CLASSES.fullmatch(module_name)):
            raise CheckpointError(
                f"{self.file}: refusing to rebuild an object of class {full!r}: the only attribute "
                "objects load rebuilds are Hugging Face config classes")
        cls = _lookup(node, object, self.file)
        if not _object_allowed(cls):
            raise CheckpointError(f"{self.file}: {full!r} is not a Hugging Face config class")
        return cls

    def objects(self, nodes: list) -> None:
        """Creates every object first (objects refer to each other), then fills them."""
        self.decoder.objects = [object.__new__(self.object_class(node)) for node in nodes]
        for obj, node in zip(self.decoder.objects, nodes):
            self.decoder.owner = obj
            obj.__dict__.update({k: self.decoder(v) for k, v in node["attrs"].items()})

    def module(self, node: dict, path: str) -> nn.Module:
        cls = self.module_class(node)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        self.built[path] = module
        self.decoder.owner = module
        for key, value in node["attrs"].items():
            if key in _MODULE_INTERNALS:
                raise ValueError(f"attribute {key!r} is nn.Module bookkeeping")
            module.__dict__[key] = self.decoder(value)
        module.training = bool(node["training"])
        for name, spec in node["params"].items():
            full = f"{path}.{name}" if path else name
            if spec is None:
                module._parameters[name] = None
            elif "ref" in spec:
                module._parameters[name] = self.built[spec["ref"]]
            else:
                p = nn.Parameter(torch.empty(spec["shape"], dtype=_dtype(spec["dtype"])),
                                 requires_grad=bool(spec["requires_grad"]))
                module._parameters[name] = self.built[full] = p
        for name, spec in node["buffers"].items():
            module._buffers[name] = None if spec is None else torch.empty(spec["shape"], dtype=_dtype(spec["dtype"]))
            if spec is not None and not spec["persistent"]:
                module._non_persistent_buffers_set.add(name)
        for name, child in node["children"].items():
            full = f"{path}.{name}" if path else name
            if child is None:
                module._modules[name] = None
            elif "ref" in child:
                module._modules[name] = self.built[child["ref"]]
            else:
                module._modules[name] = self.module(child, full)
        rebuild = _rule(cls).rebuild
        if rebuild is not None:
            rebuild(module)
        return module


def _nonpersistent_paths(model: nn.Module) -> set[str]:
    return {f"{path}.{name}" if path else name
            for path, m in model.named_modules()
            for name in m._non_persistent_buffers_set if m._buffers.get(name) is not None}


def load(path: str | Path, trusted_modules: Sequence[str] = ()) -> nn.Module:
    """Rebuild the model :func:`save` wrote to ``path``, with its saved training flags.

    Classes outside ``torch.nn``, ``torchdam``, Hugging Face model code and
    :func:`register_module` are imported only from modules listed in ``trusted_modules``
    (a module name covers its submodules); no module's ``__init__`` runs. Raises
    :class:`CheckpointError` naming the file for a missing, truncated, corrupted or
    mismatched checkpoint and for a class or function it refuses to look up.

        >>> import tempfile, torch
        >>> from torch import nn
        >>> d = save(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten()), tempfile.mkdtemp())
        >>> load(d)(torch.zeros(1, 1, 4, 4)).shape
        torch.Size([1, 32])
    """
    directory = Path(path)
    arch = _read_arch(directory)
    arch_file, weights_file = directory / ARCH_FILE, directory / WEIGHTS_FILE
    loader = _Loader(arch_file, tuple(trusted_modules), _Decoder(arch_file))
    try:
        loader.objects(arch.get("objects", []))
        model = loader.module(arch["root"], "")
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
