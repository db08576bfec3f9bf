""":func:`load` and :func:`load_metadata`: the checked architecture's classes resolved from
the allow-lists, the weights file's header checked against it, then the model rebuilt
without running any constructor."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from torchdam.errors import CheckpointError
from torchdam.serialize import limits, registry
from torchdam.serialize.architecture import _Plan, _read_arch
from torchdam.serialize.attributes import (
    _attr_problem,
    _int_limit,
    _member_problem,
    _missing_constants,
    _oversized_int,
)
from torchdam.serialize.registry import _REGISTERED, _allowed, _lookup, _object_allowed
from torchdam.serialize.rules import _rule
from torchdam.serialize.text import _join, _one_line, _shorten, _where
from torchdam.serialize.values import _Decoder, _dtype_name
from torchdam.serialize.weights import _read_weights, _tensors


def load_metadata(path: str | Path) -> dict:
    """The ``metadata`` dict passed to :func:`save`, without loading any weights."""
    directory = Path(path)
    metadata = _read_arch(directory).get("metadata", {})
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{directory / limits.ARCH_FILE}: 'metadata' is not a dict")
    return metadata


class _Loader:
    """Resolves the classes of one checked architecture, then rebuilds its objects table
    and module tree."""

    def __init__(self, plan: _Plan, trusted: Sequence[str]) -> None:
        self.plan, self.file, self.trusted = plan, plan.file, trusted
        self.decoder = _Decoder(plan.file)
        self.classes: dict[str, type] = {}
        self.object_classes: list[type] = []
        self.modules: dict[str, nn.Module] = {}  # first path -> module
        self.params: dict[str, nn.Parameter] = {}  # first path -> parameter
        self.elements = 0

    def resolve(self) -> None:
        """Every class the file names, looked up (only from the allow-lists) before any
        weight is read or module built."""
        self.object_classes = [self.object_class(node) for node in self.plan.objects]
        self.classes = {path: self.module_class(node) for path, node in self.plan.modules.items()}

    def module_class(self, node: dict) -> type:
        full, module_name = node["class"], node["module"]
        if full in _REGISTERED:
            if _REGISTERED[full].__module__ != module_name:
                raise CheckpointError(f"{self.file}: class {full!r} is not in module {module_name!r}")
            return _REGISTERED[full]
        if not _allowed(module_name, self.trusted):
            raise CheckpointError(
                f"{self.file}: refusing to import class {full!r}: it is not in torch.nn, torchdam or "
                "Hugging Face transformers model code; if you trust it, call "
                "torchdam.serialize.register_module(cls) before load, or pass "
                f"trusted_modules=[{module_name!r}]")
        return _lookup(node, nn.Module, self.file)

    def object_class(self, node: dict) -> type:
        full, module_name = node["class"], node["module"]
        if not registry.HF_OBJECT_CLASSES.fullmatch(module_name):
            raise CheckpointError(
                f"{self.file}: refusing to rebuild an object of class {full!r}: the only attribute "
                "objects load rebuilds are Hugging Face config classes")
        cls = _lookup(node, object, self.file)
        if not _object_allowed(cls):
            raise CheckpointError(f"{self.file}: {full!r} is not a Hugging Face config class")
        return cls

    def refuse(self, where: str, why: str) -> CheckpointError:
        return CheckpointError(f"{self.file}: refused: {where} {_shorten(why)}")

    def objects(self) -> None:
        """Creates every object first (objects refer to each other), then fills them."""
        self.decoder.objects = [object.__new__(cls) for cls in self.object_classes]
        for i, (obj, node) in enumerate(zip(self.decoder.objects, self.plan.objects)):
            for key in node["attrs"]:
                problem = _attr_problem(type(obj), key, module=False)
                if problem:
                    raise self.refuse(f"attribute {key[:80]!r} of object {i} ({type(obj).__name__})", problem)
            self.decoder.owner = obj
            obj.__dict__.update({k: self.decoder(v) for k, v in node["attrs"].items()})

    def module(self, node: dict, path: str) -> nn.Module:
        cls, where = self.classes[path], _where(path)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        self.modules[path] = module
        self.decoder.owner = module
        limit = _int_limit(self.elements)
        for key, value in node["attrs"].items():
            problem = _attr_problem(cls, key)
            if problem:
                raise self.refuse(f"attribute {key[:80]!r} of {where} ({cls.__name__})", problem)
            value = self.decoder(value)
            big = _oversized_int(value, limit)
            if big is not None:
                raise self.refuse(f"attribute {key!r} of {where} ({cls.__name__})",
                                  f"holds {big}, more than the {self.elements} saved tensor elements justify "
                                  f"(the limit is their number, at least MIN_INT_LIMIT={limits.MIN_INT_LIMIT})")
            module.__dict__[key] = value
        for name in [*node["params"], *node["buffers"], *node["children"]]:
            problem = _member_problem(cls, name)
            if problem:
                raise self.refuse(f"{name[:80]!r} of {where} ({cls.__name__})", problem)
        module.training = node["training"]
        for name, spec in node["params"].items():
            full = _join(path, name)
            if spec is None:
                module._parameters[name] = None
            elif "ref" in spec:
                module._parameters[name] = self.params[spec["ref"]]
            else:
                declared = self.plan.tensors[full]
                p = nn.Parameter(torch.empty(declared.shape, dtype=declared.dtype), requires_grad=declared.flag)
                module._parameters[name] = self.params[full] = p
        for name, spec in node["buffers"].items():
            declared = self.plan.tensors.get(_join(path, name))
            module._buffers[name] = None if declared is None else torch.empty(declared.shape, dtype=declared.dtype)
            if declared is not None and not declared.flag:
                module._non_persistent_buffers_set.add(name)
        for name, child in node["children"].items():
            if child is None:
                module._modules[name] = None
            elif "ref" in child:
                module._modules[name] = self.modules[child["ref"]]
            else:
                module._modules[name] = self.module(child, _join(path, name))
        missing = _missing_constants(module)
        if missing:
            raise self.refuse(f"{where} ({cls.__name__})", f"lacks {missing}, which every {cls.__name__} has")
        rule = _rule(cls)
        try:
            if rule.check is not None:
                rule.check(module, self.elements)
            if rule.rebuild is not None:
                rule.rebuild(module)
        except ValueError as err:
            raise self.refuse(f"{where} ({cls.__name__})", f"is inconsistent: {err}") from None
        return module

    def check_values(self) -> None:
        for path, module in self.modules.items():
            check = _rule(type(module)).check_values
            try:
                if check is not None:
                    check(module)
            except (ValueError, IndexError) as err:
                raise self.refuse(f"{_where(path)} ({type(module).__name__})", f"is inconsistent: {err}") from None


def _nonpersistent_paths(model: nn.Module) -> set[str]:
    return {_join(path, name)
            for path, m in model.named_modules()
            for name in m._non_persistent_buffers_set if m._buffers.get(name) is not None}


#: what a malformed (but allow-listed) architecture makes the rebuilding raise
_BUILD_ERRORS = (KeyError, TypeError, ValueError, AttributeError, ImportError, RuntimeError, IndexError,
                 ArithmeticError, RecursionError)


def load(path: str | Path, trusted_modules: Sequence[str] = ()) -> nn.Module:
    """Rebuild the model :func:`save` wrote to ``path``, with its saved training flags.

    Classes outside ``torch.nn``, ``torchdam``, Hugging Face model code and
    :func:`register_module` are imported only from modules listed in ``trusted_modules``
    (a module name covers its submodules); no module's ``__init__`` runs. Nothing in the
    files is trusted: both must be regular files within :data:`MAX_ARCH_BYTES` /
    :data:`MAX_WEIGHTS_BYTES` (a FIFO or device is refused before it is opened); the
    architecture must keep to the format and to the limits (:data:`MAX_DEPTH`,
    :data:`MAX_MODULES`, ...); no attribute may shadow a method or property of its class or
    of ``nn.Module``; references must name earlier modules or parameters, without cycles;
    every declared tensor must be in the weights file with that shape and dtype, and the
    file must hold nothing else; size attributes of known layers (``in_features``,
    ``num_embeddings``, ``hidden_size``, ``ScatterUnits.total``, ... see :data:`RULES`) must
    agree with their tensors, and no integer attribute may exceed the number of saved tensor
    elements (or :data:`MIN_INT_LIMIT`), so neither ``load`` nor the first forward can
    allocate far beyond what the weights justify. Raises :class:`CheckpointError` naming
    the file and the reason for any of these, and for a missing, truncated, corrupted or
    mismatched file or a class or function it refuses to look up.

        >>> import tempfile, torch
        >>> from torch import nn
        >>> from torchdam.serialize import save
        >>> d = save(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten()), tempfile.mkdtemp())
        >>> load(d)(torch.zeros(1, 1, 4, 4)).shape
        torch.Size([1, 32])
    """
    directory = Path(path)
    arch = _read_arch(directory)
    arch_file, weights_file = directory / limits.ARCH_FILE, directory / limits.WEIGHTS_FILE
    plan = _Plan(arch, arch_file)
    loader = _Loader(plan, tuple(trusted_modules))
    loader.resolve()
    data, entries = _read_weights(weights_file)
    expected = plan.state_keys(len(entries))
    missing, unexpected = sorted(set(expected) - set(entries)), sorted(set(entries) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights_file}: does not match {limits.ARCH_FILE} (missing keys {missing[:5]}, "
                              f"unexpected keys {unexpected[:5]})")
    for key, spec in expected.items():
        entry = entries[key]
        if entry.shape != spec.shape or entry.dtype != spec.dtype:
            raise CheckpointError(f"{weights_file}: does not match {limits.ARCH_FILE} ({key!r} is a {list(entry.shape)} "
                                  f"{_dtype_name(entry.dtype)} tensor there, {list(spec.shape)} "
                                  f"{_dtype_name(spec.dtype)} in {limits.ARCH_FILE})")
    loader.elements = sum(e.numel for e in entries.values())
    try:
        loader.objects()
        model = loader.module(arch["root"], "")
    except CheckpointError:
        raise
    except _BUILD_ERRORS as err:
        raise CheckpointError(f"{arch_file}: malformed architecture ({type(err).__name__}: {_one_line(err)}); "
                              "save the model again") from None
    tensors = _tensors(data, entries)
    extra = _nonpersistent_paths(model)
    try:
        with torch.no_grad():
            model.load_state_dict({k: v for k, v in tensors.items() if k not in extra}, strict=True)
            for key in extra:
                owner, _, name = key.rpartition(".")
                model.get_submodule(owner)._buffers[name].copy_(tensors[key])
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(f"{weights_file}: does not match {limits.ARCH_FILE} ({_one_line(err)})") from None
    finally:
        del tensors
    loader.check_values()
    return model
