"""Attribute values <-> JSON. JSON has no tuples, sets, dtypes or int-keyed dicts, and
kernel_size=(3, 3) must come back as a tuple, so every JSON object in an attribute value is
a one-key tag; functions, methods and objects come only from the allow-lists."""
from __future__ import annotations

import functools
import inspect
import json
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from torchdam.errors import CheckpointError
from torchdam.serialize import registry
from torchdam.serialize.registry import _object_allowed, _qualified

#: every dtype by its name without ``torch.`` (aliases such as ``torch.float`` map to their dtype)
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_REBUILD_ADVICE = "or save the state_dict with safetensors and rebuild the model in code"


class _Unstorable(Exception):
    """A value has no JSON encoding; the message says what it is and what to do."""


class _BadAttribute(Exception):
    """``args = (attribute name, why)``: the attribute whose value is _Unstorable."""


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
        self._functions = {id(f): name for name, f in reversed(list(registry.FUNCTIONS.items()))}
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
        if (name not in registry.METHODS.get(_qualified(type(owner)), ())
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
        fn = registry.FUNCTIONS.get(name) if isinstance(name, str) else None
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
        if not isinstance(name, str) or name not in registry.METHODS.get(_qualified(cls), ()):
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
