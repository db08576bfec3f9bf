"""What load may look up, and nothing else: the allow-listed class modules, Hugging Face
config classes, functions (:data:`FUNCTIONS`) and methods (:data:`METHODS`), classes and
functions registered by the caller, and the static class lookup that keeps to them."""
from __future__ import annotations

import importlib
import inspect
import re
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchdam.errors import CheckpointError, ConfigError

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


def _qualified(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


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


def _object_allowed(cls: type) -> bool:
    """True for Hugging Face config classes, the only non-module objects a file may hold."""
    return (HF_OBJECT_CLASSES.fullmatch(cls.__module__) is not None and "<locals>" not in cls.__qualname__
            and any(_qualified(base) in _HF_OBJECT_BASES for base in cls.__mro__))


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
        raise CheckpointError(f"{file}: class {str(full)[:100]!r} is not in module {str(module_name)[:100]!r}")
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
