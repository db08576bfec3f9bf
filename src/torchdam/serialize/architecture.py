"""Reading architecture.json and checking its structure (:class:`_Plan`) before anything
is imported or allocated; load trusts nothing in the file."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchdam.checkpoint import read_regular_file
from torchdam.errors import CheckpointError
from torchdam.serialize import limits
from torchdam.serialize.limits import _INT64, _MAX_DIMS
from torchdam.serialize.text import _join, _one_line, _shorten, _unique_keys, _where
from torchdam.serialize.values import _DTYPES

_NODE_KEYS = frozenset({"class", "module", "attrs", "training", "params", "buffers", "children"})
_PARAM_KEYS = frozenset({"shape", "dtype", "requires_grad"})
_BUFFER_KEYS = frozenset({"shape", "dtype", "persistent"})
_OBJECT_KEYS = frozenset({"class", "module", "attrs"})
_TOP_KEYS = frozenset({"format", "version", "root", "objects", "metadata"})


def _parse_json(text: bytes, file: Path, what: str) -> Any:
    try:
        return json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys)
    except RecursionError:
        raise CheckpointError(f"{file}: {what} is nested too deeply to parse; not a file torchdam.save "
                              "wrote") from None
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError, huge integers, duplicates
        raise CheckpointError(f"{file}: unreadable or corrupted ({_one_line(err)}); save the model again") from None


def _read_arch(directory: Path) -> dict:
    file = directory / limits.ARCH_FILE
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no saved model directory there; pass the directory save() wrote")
    data = read_regular_file(file, "the model's architecture (torchdam.serialize.limits.MAX_ARCH_BYTES)",
                             limits.MAX_ARCH_BYTES,
                             missing=f"{file}: missing; is {directory} a directory written by torchdam.save?")
    arch = _parse_json(data, file, "the architecture")
    if not isinstance(arch, dict) or arch.get("format") != limits.FORMAT:
        raise CheckpointError(f"{file}: not a torchdam architecture file (format is not {limits.FORMAT!r})")
    version = arch.get("version")
    if type(version) is not int or version not in limits.READABLE_VERSIONS:
        raise CheckpointError(f"{file}: format version {version!r} is not supported "
                              f"(this torchdam reads versions {', '.join(map(str, limits.READABLE_VERSIONS))})")
    unknown = sorted(set(arch) - _TOP_KEYS)
    if unknown or "root" not in arch:
        raise CheckpointError(f"{file}: malformed architecture ({'unknown keys ' + str(unknown) if unknown else 'no root'}); "
                              "save the model again")
    return arch


@dataclass(frozen=True)
class _Spec:
    """A tensor the architecture declares at its first path."""

    kind: str  # "parameter" or "buffer"
    shape: tuple[int, ...]
    dtype: torch.dtype
    flag: bool  # requires_grad of a parameter, persistent of a buffer


class _Plan:
    """architecture.json checked for structure before anything is imported or allocated:
    the layout of every entry, names, value tags, nesting and size limits, and references,
    which must name a module or parameter saved before them and never a module that
    contains them (no cycles)."""

    def __init__(self, arch: dict, file: Path) -> None:
        self.file = file
        self.modules: dict[str, dict] = {}  # first path -> node, in build order
        self.tensors: dict[str, _Spec] = {}  # first path -> declared tensor
        self._open: set[str] = set()  # modules whose children are being checked
        objects = arch.get("objects", [])
        if not isinstance(objects, list) or len(objects) > limits.MAX_OBJECTS:
            raise self.error("the objects table", f"is not a list of at most {limits.MAX_OBJECTS} (torchdam.serialize.limits.MAX_OBJECTS) entries")
        self.objects = objects
        for i, node in enumerate(objects):
            self._object(node, i)
        self._node(arch["root"], "", 0)

    def error(self, where: str, why: str) -> CheckpointError:
        return CheckpointError(f"{self.file}: malformed or refused architecture ({_shorten(where)} {_shorten(why)}); "
                               "not a model torchdam.save wrote, or save it again")

    def _object(self, node: Any, i: int) -> None:
        where = f"object {i}"
        if not isinstance(node, dict) or set(node) != _OBJECT_KEYS:
            raise self.error(where, f"needs exactly the keys {sorted(_OBJECT_KEYS)}")
        self._class_names(node, where)
        if not isinstance(node["attrs"], dict):
            raise self.error(where, "has no attrs dict")
        for key, value in node["attrs"].items():
            if not key or len(key) > limits.MAX_NAME_LENGTH:
                raise self.error(where, f"has an attribute with an invalid name {key[:50]!r}")
            self._value(value, 0, f"{where}, attribute {key!r},")

    def _class_names(self, node: dict, where: str) -> None:
        for key in ("class", "module"):
            if not (isinstance(node[key], str) and 0 < len(node[key]) <= limits.MAX_NAME_LENGTH):
                raise self.error(where, f"has an invalid {key} name")

    def _node(self, node: Any, path: str, depth: int) -> None:
        where = _where(path)
        if depth > limits.MAX_DEPTH:
            raise self.error(where, f"is nested more than {limits.MAX_DEPTH} modules deep (torchdam.serialize.limits.MAX_DEPTH)")
        if len(self.modules) >= limits.MAX_MODULES:
            raise self.error(where, f"is beyond {limits.MAX_MODULES} modules (torchdam.serialize.limits.MAX_MODULES)")
        if not isinstance(node, dict) or set(node) != _NODE_KEYS:
            raise self.error(where, f"needs exactly the keys {sorted(_NODE_KEYS)}")
        self._class_names(node, where)
        if type(node["training"]) is not bool:
            raise self.error(where, "has a training flag that is not true/false")
        groups = [node[k] for k in ("attrs", "params", "buffers", "children")]
        if not all(isinstance(g, dict) for g in groups):
            raise self.error(where, "has attrs, params, buffers or children that are not dicts")
        names = [name for g in groups for name in g]
        if len(set(names)) != len(names):
            raise self.error(where, "uses one name for two of its attributes, parameters, buffers and children")
        for key, value in node["attrs"].items():
            if not key or len(key) > limits.MAX_NAME_LENGTH:
                raise self.error(where, f"has an attribute with an invalid name {key[:50]!r}")
            self._value(value, 0, f"{where}, attribute {key!r},")
        for name in names[len(node["attrs"]):]:
            if not name or len(name) > limits.MAX_NAME_LENGTH or "." in name:
                raise self.error(where, f"has a member with an invalid name {name[:50]!r}")
        self.modules[path] = node
        self._open.add(path)
        for name, spec in node["params"].items():
            if spec is None:
                continue
            if isinstance(spec, dict) and set(spec) == {"ref"}:
                self._param_ref(spec["ref"], name, where)
            else:
                self.tensors[_join(path, name)] = self._spec(spec, "parameter", f"{where}, parameter {name!r},")
        for name, spec in node["buffers"].items():
            if spec is not None:
                self.tensors[_join(path, name)] = self._spec(spec, "buffer", f"{where}, buffer {name!r},")
        for name, child in node["children"].items():
            if child is None:
                continue
            if isinstance(child, dict) and set(child) == {"ref"}:
                target = child["ref"]
                if not (isinstance(target, str) and target in self.modules):
                    raise self.error(where, f"child {name!r} refers to {str(target)[:80]!r}, which names no module "
                                            "saved before it")
                if target in self._open:
                    raise self.error(where, f"child {name!r} refers to {target!r}, a module that contains it "
                                            "(a reference cycle)")
            else:
                self._node(child, _join(path, name), depth + 1)
        self._open.discard(path)

    def _param_ref(self, target: Any, name: str, where: str) -> None:
        found = self.tensors.get(target) if isinstance(target, str) else None
        if found is None or found.kind != "parameter":
            what = ("a module" if isinstance(target, str) and target in self.modules
                    else "a buffer" if found is not None else "nothing saved before it")
            raise self.error(where, f"parameter {name!r} refers to {str(target)[:80]!r}, which names {what}, "
                                    "not a parameter")

    def _spec(self, spec: Any, kind: str, where: str) -> _Spec:
        flag = "requires_grad" if kind == "parameter" else "persistent"
        if not isinstance(spec, dict) or set(spec) != {"shape", "dtype", flag}:
            raise self.error(where, f"needs exactly the keys shape, dtype and {flag}")
        shape, dtype = spec["shape"], spec["dtype"]
        if not (isinstance(shape, list) and len(shape) <= _MAX_DIMS
                and all(type(d) is int and 0 <= d < _INT64 for d in shape)):
            raise self.error(where, f"has an invalid shape {str(shape)[:80]}")
        if not (isinstance(dtype, str) and dtype in _DTYPES):
            raise self.error(where, f"has an unknown dtype {str(dtype)[:80]!r}")
        if type(spec[flag]) is not bool:
            raise self.error(where, f"has a {flag} flag that is not true/false")
        return _Spec(kind, tuple(shape), _DTYPES[dtype], spec[flag])

    def _value(self, value: Any, depth: int, where: str) -> None:
        if depth > limits.MAX_VALUE_DEPTH:
            raise self.error(where, f"nests more than {limits.MAX_VALUE_DEPTH} levels (torchdam.serialize.limits.MAX_VALUE_DEPTH)")
        kind = type(value)
        if value is None or kind in (bool, float, str):
            return
        if kind is int:
            if not -_INT64 <= value < _INT64:
                raise self.error(where, "holds an integer beyond 64 bits")
            return
        if kind is list:
            for v in value:
                self._value(v, depth + 1, where)
            return
        if kind is not dict or len(value) != 1:
            raise self.error(where, "holds an object that is not a single-key value tag")
        (tag, inner), = value.items()
        if tag in ("tuple", "set", "frozenset", "dict"):
            ok = isinstance(inner, dict if tag == "dict" else list)
            items = inner.values() if tag == "dict" and ok else inner if ok else ()
        elif tag == "items":
            ok = isinstance(inner, list) and all(isinstance(p, list) and len(p) == 2 for p in inner)
            items = [v for p in inner for v in p] if ok else ()
        elif tag in ("dtype", "device", "function", "method"):
            ok, items = isinstance(inner, str) and len(inner) <= limits.MAX_NAME_LENGTH, ()
        elif tag == "partial":
            ok = (isinstance(inner, dict) and set(inner) == {"function", "args", "kwargs"}
                  and isinstance(inner["function"], str) and isinstance(inner["args"], list)
                  and isinstance(inner["kwargs"], dict) and set(inner["kwargs"]) == {"dict"})
            items = [*inner["args"], inner["kwargs"]] if ok else ()
        elif tag == "object":
            ok, items = type(inner) is int and 0 <= inner < len(self.objects), ()
        else:
            raise self.error(where, f"holds an unknown value tag {str(tag)[:50]!r}")
        if not ok:
            raise self.error(where, f"holds a malformed {tag!r} value")
        for v in items:
            self._value(v, depth + 1, where)

    def state_keys(self, limit: int) -> dict[str, _Spec]:
        """The tensors the weights file must hold, each with its declared spec: the keys of
        ``model.state_dict()`` (a shared module's tensors under each of its paths) plus the
        non-persistent buffers at their first path. At most ``limit`` keys and MAX_MODULES
        module visits, so shared modules cannot multiply into an endless state_dict."""
        keys: dict[str, _Spec] = {}
        visits = 0

        def walk(first: str, prefix: str, depth: int) -> None:
            nonlocal visits
            visits += 1
            if visits > limits.MAX_MODULES or depth > limits.MAX_DEPTH:
                raise self.error(_where(prefix), f"expands, through shared modules, beyond {limits.MAX_MODULES} modules "
                                                 f"or {limits.MAX_DEPTH} levels")
            node = self.modules[first]
            for name, spec in node["params"].items():
                if spec is not None:
                    keys[_join(prefix, name)] = self.tensors[spec["ref"] if "ref" in spec else _join(first, name)]
            for name, spec in node["buffers"].items():
                declared = self.tensors.get(_join(first, name))
                if declared is not None and (declared.flag or prefix == first):
                    keys[_join(prefix, name)] = declared
            if len(keys) > limit:
                raise self.error(_where(prefix), f"declares more tensors than {limits.WEIGHTS_FILE} holds")
            for name, child in node["children"].items():
                if child is not None:
                    walk(child["ref"] if "ref" in child else _join(first, name), _join(prefix, name), depth + 1)

        walk("", "", 0)
        return keys
