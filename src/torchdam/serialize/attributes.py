"""Which attribute, parameter, buffer and child names an instance may hold (none that
shadows a method or property of its class or of ``nn.Module``), and which integer values."""
from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

from torchdam.serialize import limits
from torchdam.serialize.rules import _MISSING

# nn.Module's own bookkeeping; rebuilt by nn.Module.__init__, never stored.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)

#: Names defined on nn.Module itself (methods, properties, and class-level slots such as
#: ``_compiled_call_impl`` that ``__call__`` calls): no instance attribute may shadow one.
_MODULE_CLASS_NAMES = frozenset(dir(nn.Module))


def _is_code(value: Any) -> bool:
    """A class attribute that is behaviour rather than data: a function, method, class or
    any descriptor (property, classmethod, cached_property, ...)."""
    kind = type(value)
    return callable(value) or any(hasattr(kind, m) for m in ("__get__", "__set__", "__delete__"))


def _attr_problem(cls: type, key: Any, module: bool = True) -> str | None:
    """Why an instance of ``cls`` may not hold attribute ``key`` in its ``__dict__``
    (None when it may): an instance attribute named like a method or property of its class
    replaces it (``forward = "x"`` turns every call into ``'str' object is not callable``)."""
    if type(key) is not str or not key or len(key) > limits.MAX_NAME_LENGTH:
        return "is not a valid attribute name"
    if key.startswith("__") and key.endswith("__"):
        return "is a special (dunder) name"
    if module and key in _MODULE_INTERNALS:
        return "is nn.Module bookkeeping, rebuilt on load"
    if module and key in _MODULE_CLASS_NAMES:
        return f"would shadow nn.Module.{key}"
    static = inspect.getattr_static(cls, key, _MISSING)
    if static is not _MISSING and _is_code(static):
        return f"would shadow {cls.__qualname__}.{key}, a method or property of its class"
    return None


def _member_problem(cls: type, name: Any) -> str | None:
    """Why a parameter, buffer or child may not be called ``name`` (None when it may); the
    rules of nn.Module.register_parameter/register_buffer/add_module."""
    if type(name) is not str or not name or len(name) > limits.MAX_NAME_LENGTH or "." in name:
        return "is not a valid name (empty, too long or containing '.')"
    if inspect.getattr_static(cls, name, _MISSING) is not _MISSING:
        return f"would be hidden by {cls.__qualname__}.{name}, an attribute of its class"
    return None


def _oversized_int(value: Any, limit: int) -> int | None:
    """The first integer in ``value`` (through containers and partial arguments) whose
    magnitude exceeds ``limit``, or None."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if type(v) is int:
            if not -limit <= v <= limit:
                return v
        elif isinstance(v, (list, tuple, set, frozenset, dict, functools.partial)) and id(v) not in seen:
            seen.add(id(v))
            if isinstance(v, dict):
                stack += [*v.keys(), *v.values()]
            elif isinstance(v, functools.partial):
                stack += [*v.args, *v.keywords.values()]
            else:
                stack += list(v)
    return None


def _missing_constants(module: nn.Module) -> list[str]:
    """Names the module's class declares in ``__constants__`` (torch.nn's list of what
    every instance sets in ``__init__``: ``in_features``, ``inplace``, ``end_dim``, ...) that
    this instance lacks, so its forward would fail on them."""
    constants = getattr(type(module), "__constants__", ())
    if not isinstance(constants, (list, tuple, set, frozenset)):
        return []
    return [c for c in constants if isinstance(c, str) and c not in module.__dict__
            and c not in module._parameters and c not in module._buffers and c not in module._modules]


def _int_limit(elements: int) -> int:
    return max(limits.MIN_INT_LIMIT, elements)
