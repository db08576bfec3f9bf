""":func:`save`: a model -> model.safetensors + architecture.json, refusing what load would."""
from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from torchdam.atomic import write_atomic
from torchdam.errors import CheckpointError
from torchdam.serialize import limits
from torchdam.serialize.architecture import _Plan
from torchdam.serialize.attributes import (
    _MODULE_INTERNALS,
    _attr_problem,
    _int_limit,
    _member_problem,
    _missing_constants,
    _oversized_int,
)
from torchdam.serialize.registry import _qualified
from torchdam.serialize.rules import _rule
from torchdam.serialize.text import _join, _shorten, _where
from torchdam.serialize.values import (
    _REBUILD_ADVICE,
    _BadAttribute,
    _dtype_name,
    _Encoder,
)

_HOOK_DICTS = sorted(k for k, v in nn.Module().__dict__.items() if "hook" in k and isinstance(v, dict))


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
    # values a functools.cached_property cached are derived: it computes them again
    skip = _MODULE_INTERNALS | _rule(cls).derived | {
        k for k in module.__dict__ if isinstance(inspect.getattr_static(cls, k, None), functools.cached_property)}
    stored = {k: v for k, v in module.__dict__.items() if k not in skip}
    for key in stored:
        problem = _attr_problem(cls, key)
        if problem:
            raise CheckpointError(f"cannot save: attribute {key!r} of {_where(path)} ({cls.__name__}) {problem}, "
                                  "which load refuses; rename the attribute")
    for name in [*module._parameters, *module._buffers, *module._modules]:
        problem = _member_problem(cls, name)
        if problem:
            raise CheckpointError(f"cannot save: {name!r} of {_where(path)} ({cls.__name__}) {problem}")
    try:
        attrs = enc.attrs(module, stored)
    except _BadAttribute as err:
        key, why = err.args
        raise CheckpointError(
            f"cannot save: attribute {key!r} of {_where(path)} ({cls.__name__}) is {why}") from None
    params = {}
    for name, p in module._parameters.items():
        full = _join(path, name)
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
            nonpersistent[_join(path, name)] = b
    children = {}
    for name, child in module._modules.items():
        full = _join(path, name)
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


def _check_before_save(model: nn.Module, arch: str, tensors: dict[str, torch.Tensor]) -> None:
    """Refuses now what :func:`load` would refuse later: the same structure checks, a
    state_dict that its parameters and buffers account for, consistent sizes, and no
    integer attribute beyond what the saved elements justify."""
    try:
        plan = _Plan(json.loads(arch), Path(limits.ARCH_FILE))
        expected = plan.state_keys(len(tensors))
    except CheckpointError as err:
        raise CheckpointError(f"cannot save: load would refuse this model: {err}") from None
    if set(expected) != set(tensors):
        odd = sorted(set(expected) ^ set(tensors))[:5]
        raise CheckpointError(f"cannot save: the state_dict keys {odd} do not follow from the modules' "
                              "parameters and buffers (a custom state_dict or get_extra_state?), so load "
                              f"could not check them; {_REBUILD_ADVICE}")
    elements = sum(t.numel() for t in tensors.values())
    for path, module in model.named_modules():
        cls = type(module)
        skip = _MODULE_INTERNALS | _rule(cls).derived
        for key, value in module.__dict__.items():
            big = None if key in skip else _oversized_int(value, _int_limit(elements))
            if big is not None:
                raise CheckpointError(
                    f"cannot save: attribute {key!r} of {_where(path)} ({cls.__name__}) holds {big}, more than "
                    f"the model's {elements} tensor elements (or MIN_INT_LIMIT={limits.MIN_INT_LIMIT}), which load "
                    "refuses as a size no saved tensor justifies")
        missing = _missing_constants(module)
        if missing:
            raise CheckpointError(f"cannot save: {_where(path)} ({cls.__name__}) lacks {missing}, which its class "
                                  "declares in __constants__ and load requires")
        rule = _rule(cls)
        try:
            if rule.check is not None:
                rule.check(module, elements)
            if rule.check_values is not None:
                rule.check_values(module)
        except ValueError as err:
            raise CheckpointError(f"cannot save: {_where(path)} ({cls.__name__}) is inconsistent: {_shorten(str(err))}; "
                                  "load refuses sizes its tensors do not match") from None


def save(model: nn.Module, path: str | Path, metadata: dict | None = None) -> Path:
    """Write ``model`` to directory ``path`` (created if needed) and return that directory.

    ``metadata`` is any JSON-able dict (model name, widths, example input shape, ...),
    read back by :func:`load_metadata`. Raises :class:`CheckpointError`, naming the module
    and attribute and saying what to do instead, for a model that could not be reloaded:
    forward/backward hooks, attributes such as lambdas or unregistered tensors, classes
    defined inside functions, and anything :func:`load` refuses (an attribute named like a
    method of its class, size attributes that disagree with the tensors' shapes, ...).

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
        arch = json.dumps({"format": limits.FORMAT, "version": limits.VERSION, "root": root, "objects": enc.objects,
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
    _check_before_save(model, arch, tensors)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / limits.WEIGHTS_FILE, safetensors_bytes(tensors), "the model's weights")
    write_atomic(directory / limits.ARCH_FILE, arch, "the model's architecture")
    return directory
