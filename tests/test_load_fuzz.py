"""Fuzzing the loaders: ``torchdam.load`` gets hundreds of randomly mutated
architecture.json files and ``torchdam.checkpoint.load_checkpoint`` randomly mutated
checkpoints. Every one must either

* load something equal to a legitimately saved one: the tensors of the weights file
  (same state_dict), no attribute that replaces a method or property of its class, and a
  model that ``save`` accepts and that reloads with the same state_dict and the same
  outputs on a fixed input (a checkpoint: the same state after save_checkpoint and
  load_checkpoint); a file whose architecture is unchanged must give the seed's outputs
  and an unchanged checkpoint payload the seed's state; or
* raise a ``TorchDAMError`` whose one-line message names the file,

within a time bound (each load under LOAD_CPU_LIMIT seconds of CPU time) and a memory
bound (the child process running the cases has an address-space limit MEMORY_HEADROOM
above its size at the start, so any allocation beyond it, in a load or in the forward of
a loaded model, fails and fails the case), and without running code from the file: a
module ``torchdam_sentinel`` on the child's path writes a file when it is imported or its
function or class is called, mutations name it as class, module, function and pickle
global, and that file must never appear.

The cases come from a fixed seed; a forked child runs them and writes one JSON line per
case, so a hang is caught (the parent kills the child and names the case it was on).
"""
from __future__ import annotations

import faulthandler
import gc
import hashlib
import io
import json
import math
import os
import random
import signal
import struct
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from torchdam.checkpoint import (
    LAST,
    MAGIC,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
)
from torchdam.compact import ScatterUnits
from torchdam.errors import TorchDAMError
from torchdam.serialize import ARCH_FILE, WEIGHTS_FILE, load, register_module, save

from blocking import outcome_in_thread

resource = pytest.importorskip("resource")
transformers = pytest.importorskip("transformers")
if not (hasattr(os, "fork") and os.path.exists("/proc/self/status")):
    pytest.skip("the fuzz cases run in a forked child and measure it in /proc", allow_module_level=True)

SEED = 20240611
ARCH_CASES_PER_SEED = 50  # x 5 seed models = 250 architecture files
CKPT_CASES_PER_SEED = 40  # x 2 seed states = 80 checkpoints
LOAD_CPU_LIMIT = 2.0  # seconds of CPU time per load
CASE_WALL_LIMIT = 20.0  # seconds per case before the child counts as hung
MEMORY_HEADROOM = 1024 * 2**20  # bytes of address space the child may add to its start size
SENTINEL = "torchdam_sentinel"


# ---------------------------------------------------------------------------- seed models

@register_module
class ResidualNet(nn.Module):
    """A compacted ResNet-style net: each branch's narrowed conv writes its live channels
    back into the 8-channel residual stream through ScatterUnits (one non-contiguous index:
    index_copy; one contiguous: zero padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch1 = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(),
                                     ScatterUnits(nn.Conv2d(8, 3, 3, padding=1), [1, 4, 6], 8, 1))
        self.branch2 = nn.Sequential(nn.ReLU(), ScatterUnits(nn.Conv2d(8, 4, 1), [2, 3, 4, 5], 8, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        h = h + self.branch1(h)
        h = h + self.branch2(h)
        return self.head(h)


@register_module
class Tagger(nn.Module):
    """Embedding -> bidirectional LSTM -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8, padding_idx=0)
        self.rnn = nn.LSTM(8, 6, batch_first=True, bidirectional=True)
        self.head = nn.Linear(12, 5)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.rnn(self.embed(tokens))[0])


def _warm(model: nn.Module, x: Tensor) -> nn.Module:
    """A few train-mode passes so BatchNorm statistics are not their defaults."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(x + torch.randn_like(x))
    return model.eval()


def _seed_models() -> dict[str, tuple[nn.Module, tuple, dict]]:
    """name -> (model, args, kwargs) of its fixed input."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU(inplace=True), nn.Dropout(0.3),
                        nn.Linear(7, 3, bias=False)).eval()
    image = torch.randn(2, 3, 8, 8)
    cnn = _warm(nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(5, 4, 3, padding="same", padding_mode="reflect"), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 2)), image)
    residual = _warm(ResidualNet(), image)
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=50, max_position_embeddings=32)
    bert = transformers.BertModel(config).eval()
    return {
        "mlp": (mlp, (torch.randn(4, 3, 4),), {}),
        "cnn": (cnn, (image,), {}),
        "scatter": (residual, (image,), {}),
        "lstm": (Tagger().eval(), (torch.randint(0, 20, (2, 7)),), {}),
        "bert": (bert, (), {"input_ids": torch.randint(0, 50, (2, 6))}),
    }


# ---------------------------------------------------------------------------- comparing

def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """Bitwise equal (NaN equals NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().contiguous().reshape(-1), b.detach().contiguous().reshape(-1)
    return a.numel() == 0 or torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _same(a, b, depth: int = 0) -> bool:
    """Deep equality of checkpoint states: containers, tensors bitwise, NaN equals NaN."""
    if depth > 200:
        return False
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and _same_tensor(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k], depth + 1) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y, depth + 1) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _flat(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flat(v)]
    return []


def _forward(model: nn.Module, args: tuple, kwargs: dict) -> tuple[str, object]:
    """("ok", outputs) or ("error", exception type name), and a problem if the forward hit
    the memory bound or called a non-callable attribute."""
    try:
        model.eval()
        with torch.no_grad():
            return "ok", _flat(model(*args, **kwargs))
    except MemoryError:
        return "memory", "MemoryError"
    except Exception as err:  # noqa: BLE001 - a mutated model may fail in any way
        message = str(err)
        if isinstance(err, RuntimeError) and "allocate" in message:
            return "memory", message[:200]
        if isinstance(err, TypeError) and "not callable" in message:
            return "not-callable", message[:200]
        return "error", type(err).__name__


def _same_outputs(a: tuple[str, object], b: tuple[str, object]) -> bool:
    if a[0] != "ok" or b[0] != "ok":
        return a == b
    return len(a[1]) == len(b[1]) and all(_same_tensor(x, y) for x, y in zip(a[1], b[1]))


def _nonpersistent(model: nn.Module) -> dict[str, Tensor]:
    return {f"{path}.{name}" if path else name: module._buffers[name]
            for path, module in model.named_modules() for name in module._non_persistent_buffers_set
            if module._buffers.get(name) is not None}


def _shadowing(model: nn.Module) -> list[str]:
    """Instance attributes that replace a method, property or other descriptor of their
    class (what made `'str' object is not callable` appear after load)."""
    internals = set(nn.Module().__dict__)
    found = []
    for path, module in model.named_modules():
        for key in vars(module):
            static = getattr(type(module), key, None) if key not in internals else None
            if static is not None and (callable(static) or hasattr(type(static), "__get__")):
                found.append(f"{path or '<root>'}.{key}")
    return found


# ---------------------------------------------------------------------------- JSON mutations

class _Dup(dict):
    """A dict emitted with one key twice."""

    def __init__(self, items: dict, key: str, value) -> None:
        super().__init__(items)
        self.dup_key, self.dup_value = key, value


def _emit(value, out: list[str]) -> None:
    """json.dumps that can write duplicated keys (and NaN/Infinity, as json.dumps does)."""
    if isinstance(value, dict):
        items = list(value.items())
        if isinstance(value, _Dup):
            items.append((value.dup_key, value.dup_value))
        out.append("{")
        for i, (k, v) in enumerate(items):
            out.append(("" if i == 0 else ", ") + json.dumps(k) + ": ")
            _emit(v, out)
        out.append("}")
    elif isinstance(value, list):
        out.append("[")
        for i, v in enumerate(value):
            if i:
                out.append(", ")
            _emit(v, out)
        out.append("]")
    else:
        out.append(json.dumps(value))


def _positions(doc) -> list[tuple[object, object]]:
    """(container, key) of every value below the top level."""
    found, stack = [], [doc]
    while stack:
        container = stack.pop()
        items = container.items() if isinstance(container, dict) else enumerate(container)
        for key, value in list(items):
            found.append((container, key))
            if isinstance(value, (dict, list)):
                stack.append(value)
    return found


def _module_nodes(doc) -> list[tuple[str, dict]]:
    found, stack = [], [("", doc.get("root") if isinstance(doc, dict) else None)]
    while stack:
        path, node = stack.pop()
        if not (isinstance(node, dict) and isinstance(node.get("children"), dict)):
            continue
        found.append((path, node))
        for name, child in node["children"].items():
            if isinstance(child, dict) and "ref" not in child:
                stack.append((f"{path}.{name}" if path else name, child))
    return found


def _tensor_specs(doc) -> list[tuple[str, str, dict, str]]:
    """(module path, "params"/"buffers", the dict holding the spec, name)."""
    return [(path, group, node[group], name) for path, node in _module_nodes(doc)
            for group in ("params", "buffers") if isinstance(node.get(group), dict)
            for name in node[group]]


ALLOWED_CLASSES = [
    ("torch.nn.modules.linear.Linear", "torch.nn.modules.linear"),
    ("torch.nn.modules.linear.Identity", "torch.nn.modules.linear"),
    ("torch.nn.modules.activation.ReLU", "torch.nn.modules.activation"),
    ("torch.nn.modules.activation.Tanh", "torch.nn.modules.activation"),
    ("torch.nn.modules.activation.MultiheadAttention", "torch.nn.modules.activation"),
    ("torch.nn.modules.conv.Conv2d", "torch.nn.modules.conv"),
    ("torch.nn.modules.conv.ConvTranspose2d", "torch.nn.modules.conv"),
    ("torch.nn.modules.batchnorm.BatchNorm2d", "torch.nn.modules.batchnorm"),
    ("torch.nn.modules.normalization.LayerNorm", "torch.nn.modules.normalization"),
    ("torch.nn.modules.rnn.LSTM", "torch.nn.modules.rnn"),
    ("torch.nn.modules.rnn.GRU", "torch.nn.modules.rnn"),
    ("torch.nn.modules.sparse.Embedding", "torch.nn.modules.sparse"),
    ("torch.nn.modules.container.Sequential", "torch.nn.modules.container"),
    ("torch.nn.modules.container.ModuleList", "torch.nn.modules.container"),
    ("torch.nn.modules.dropout.Dropout", "torch.nn.modules.dropout"),
    ("torch.nn.modules.pooling.AdaptiveAvgPool2d", "torch.nn.modules.pooling"),
    ("torchdam.compact.ScatterUnits", "torchdam.compact"),
    ("torchdam.gates.DAMGate", "torchdam.gates"),
    (f"{__name__}.ResidualNet", __name__),
    (f"{__name__}.Tagger", __name__),
    ("transformers.models.bert.modeling_bert.BertSelfAttention", "transformers.models.bert.modeling_bert"),
    ("transformers.models.bert.modeling_bert.BertLayer", "transformers.models.bert.modeling_bert"),
    ("transformers.activations.GELUActivation", "transformers.activations"),
]
REFUSED_CLASSES = [
    ("os.system", "os"), ("subprocess.Popen", "subprocess"), ("builtins.eval", "builtins"),
    (f"{SENTINEL}.Evil", SENTINEL), (f"{SENTINEL}.boom", SENTINEL),
    (f"torchdam.{SENTINEL}.Evil", f"torchdam.{SENTINEL}"), (f"torch.nn.{SENTINEL}.Evil", f"torch.nn.{SENTINEL}"),
    (f"{SENTINEL}.Evil", "torchdam"), ("torch.nn.modules.module.os.system", "torch.nn.modules.module"),
    ("torch.nn.modules.module.Module.__init__", "torch.nn.modules.module"),
    ("torchdam.serialize.load", "torchdam.serialize"), ("collections.OrderedDict", "collections"),
    ("torch.nn.modules.linear.Linear", "torch.nn.modules.linear.x"),
    ("transformers.trainer.Trainer", "transformers.trainer"),
    ("transformers.models.bert.configuration_bert.BertConfig", "transformers.models.bert.configuration_bert"),
    (f"{__name__}.Unregistered", __name__),
]
CONFIG_CLASSES = [
    ("transformers.models.bert.configuration_bert.BertConfig", "transformers.models.bert.configuration_bert"),
    ("transformers.models.gpt2.configuration_gpt2.GPT2Config", "transformers.models.gpt2.configuration_gpt2"),
    ("transformers.models.bert.modeling_bert.BertModel", "transformers.models.bert.modeling_bert"),
    ("transformers.training_args.TrainingArguments", "transformers.training_args"),
    ("os._wrap_close", "os"), (f"{SENTINEL}.Evil", SENTINEL),
]
METHOD_NAMES = [
    "forward", "load_state_dict", "_call_impl", "__call__", "state_dict", "extra_repr", "reset_parameters",
    "_compiled_call_impl", "_conv_forward", "_check_input_dim", "flatten_parameters", "_init_flat_weights",
    "all_weights", "to_dict", "to_json_string", "num_labels", "use_return_dict", "__class__", "__dict__",
    "training", "_parameters", "_modules", "T_destination", "dump_patches", "_version", "__getattr__",
    "register_buffer", "cuda", "_apply", "named_modules", "children", "eval", "weight",
]
FORGED_VALUES = [
    {"function": "os.system"}, {"function": f"{SENTINEL}.boom"}, {"function": "builtins.eval"},
    {"function": "torch.load"}, {"function": "torch.relu"},
    {"partial": {"function": "os.system", "args": ["true"], "kwargs": {"dict": {}}}},
    {"partial": {"function": "torch.nn.functional.gelu", "args": [], "kwargs": {"dict": {"approximate": "tanh"}}}},
    {"method": "forward"}, {"method": "__init__"}, {"method": "_gelu_python"}, {"object": 99}, {"object": -1},
    {"object": 0}, {"items": [[{"tuple": []}, 1]]}, {"items": [[[1], 2]]}, {"set": [[1]]}, {"dtype": "evil"},
    {"dtype": "float64"}, {"device": "cuda:99999999999"}, {"device": "no-such-device"}, {"nope": 1},
    {"tuple": 5}, {"a": 1, "b": 2}, {}, {"dict": []}, {"frozenset": [1, 2, 2]},
]
SCALARS = [None, True, False, 0, 1, -1, 2.5, "x", "", [], {}, [1, 2], {"tuple": []}, {"dict": {}}]


@dataclass
class _Case:
    id: str
    seed: str
    ops: list[str] = field(default_factory=list)
    text: bytes = b""
    unchanged: bool = False  # the mutated file means exactly what the seed's does


class _Mutator:
    """JSON-aware mutations of one architecture document (in place)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.placeholders: dict[str, str] = {}
        self.raw: bytes | None = None

    def placeholder(self, text: str) -> str:
        key = f"__fuzz_placeholder_{len(self.placeholders)}__"
        self.placeholders[key] = text
        return key

    def node(self, doc) -> tuple[str, dict]:
        """A random module entry, or a throwaway one when earlier mutations left none."""
        nodes = _module_nodes(doc)
        return self.rng.choice(nodes) if nodes else ("", {"children": {}, "attrs": {}})

    def pick(self, doc, want=lambda v: True):
        options = [(c, k) for c, k in _positions(doc) if want(c[k])]
        return self.rng.choice(options) if options else (None, None)

    def delete_key(self, doc) -> str:
        container, key = self.pick(doc, lambda v: isinstance(v, dict) and v)
        if container is None:
            return "delete key: none"
        victim = self.rng.choice(list(container[key]))
        del container[key][victim]
        return f"delete key {victim!r}"

    def change_type(self, doc) -> str:
        container, key = self.pick(doc)
        old = container[key]
        container[key] = self.rng.choice([v for v in SCALARS if type(v) is not type(old)])
        return f"change type of {key!r} from {type(old).__name__}"

    def swap_class(self, doc) -> str:
        objects = [o for o in doc.get("objects", []) if isinstance(o, dict)] \
            if isinstance(doc.get("objects"), list) else []
        if objects and self.rng.random() < 0.25:
            node, pool = self.rng.choice(objects), CONFIG_CLASSES + ALLOWED_CLASSES[:2]
        else:
            node, pool = self.node(doc)[1], ALLOWED_CLASSES + REFUSED_CLASSES
        node["class"], node["module"] = self.rng.choice(pool)
        return f"class -> {node['class']}"

    def deep_nesting(self, doc) -> str:
        if self.rng.random() < 0.2:  # modules nested deeper than MAX_DEPTH
            node = self.node(doc)[1]
            inner = dict(node)
            for _ in range(self.rng.choice([101, 150])):
                inner = {"class": "torch.nn.modules.container.Sequential", "module": "torch.nn.modules.container",
                         "attrs": {}, "training": False, "params": {}, "buffers": {}, "children": {"0": inner}}
            node.clear()
            node.update(inner)
            return "deep module nesting"
        container, key = self.pick(doc)
        depth = self.rng.choice([66, 150, 900, 5000, 200_000])
        opener, closer = self.rng.choice([("[", "]"), ('{"tuple": [', "]}"), ('{"a": ', "}"), ('{"dict": {"k": ', "}}")])
        middle = "1" if opener.startswith(('{"a"', '{"dict"')) else ""
        container[key] = self.placeholder(opener * depth + middle + closer * depth)
        return f"deep nesting {depth}"

    def huge_int(self, doc) -> str:
        container, key = self.pick(doc, lambda v: type(v) is int) if self.rng.random() < 0.8 else self.pick(doc)
        if container is None:
            return "huge int: none"
        if self.rng.random() < 0.15:
            container[key] = self.placeholder("9" * 5000)
            return "5000-digit int"
        container[key] = self.rng.choice([2**31, 2**32 + 7, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63) - 1])
        return f"huge int {container[key]}"

    def negative_int(self, doc) -> str:
        container, key = self.pick(doc, lambda v: type(v) is int)
        if container is None:
            return "negative int: none"
        v = container[key]
        container[key] = self.rng.choice([-1, -v, -v - 1, -(2**31)])
        return f"negative int {container[key]}"

    def nudge_int(self, doc) -> str:
        container, key = self.pick(doc, lambda v: type(v) is int)
        if container is None:
            return "nudge int: none"
        v = container[key]
        container[key] = self.rng.choice([v + 1, v - 1, 0, 2 * v, 10 * v])
        return f"int {v} -> {container[key]}"

    def nan(self, doc) -> str:
        container, key = self.pick(doc, lambda v: type(v) in (int, float))
        if container is None:
            return "nan: none"
        container[key] = self.rng.choice([math.nan, math.inf, -math.inf])
        return f"{container[key]} for {key!r}"

    def long_string(self, doc) -> str:
        container, key = self.pick(doc, lambda v: isinstance(v, str))
        long = self.rng.choice(["A" * 300, "B" * 5000, "C" * 1_000_000, "\ud800\x00" * 10, "a.b", "é" * 2000])
        if container is None or (isinstance(container, dict) and self.rng.random() < 0.3):
            container, key = self.pick(doc, lambda v: isinstance(v, dict) and v)
            if container is None:
                return "long string: none"
            d = container[key]
            victim = self.rng.choice(list(d))
            d[long] = d.pop(victim)
            return f"key {victim!r} renamed to a {len(long)}-char string"
        container[key] = long
        return f"{len(long)}-char string for {key!r}"

    def bad_reference(self, doc) -> str:
        path, node = self.node(doc)
        paths = [p for p, _ in _module_nodes(doc)] or [""]
        later = [p for p in paths if p > path] or ["nowhere"]
        specs = _tensor_specs(doc)
        tensor_paths = [f"{p}.{n}" if p else n for p, _, _, n in specs]
        if self.rng.random() < 0.5 or not specs:
            target = self.rng.choice([path, "", self.rng.choice(paths), self.rng.choice(later), "nowhere",
                                      *(tensor_paths[:1] or ["x"])])
            if isinstance(node.get("children"), dict):
                node["children"][self.rng.choice([*node["children"], "fuzz"])] = {"ref": target}
            return f"child ref -> {target!r}"
        p, group, holder, name = self.rng.choice(specs)
        target = self.rng.choice([p, self.rng.choice(paths), self.rng.choice(tensor_paths), "nowhere",
                                  f"{p}.{name}" if p else name, 7])
        holder[name] = {"ref": target}
        return f"{group} ref -> {target!r}"

    def method_attribute(self, doc) -> str:
        name = self.rng.choice(METHOD_NAMES)
        value = self.rng.choice(["x", 1, None, {"function": "torch.relu"}, {"method": "forward"}, {"tuple": [1]}])
        objects = doc.get("objects") if isinstance(doc.get("objects"), list) else []
        if objects and self.rng.random() < 0.25 and isinstance(objects[0], dict) \
                and isinstance(objects[0].get("attrs"), dict):
            objects[0]["attrs"][name] = value
            return f"object attribute {name!r}"
        node = self.node(doc)[1]
        if isinstance(node.get("attrs"), dict):
            node["attrs"][name] = value
        return f"attribute {name!r} = {value!r}"

    def duplicate_key(self, doc) -> str:
        container, key = self.pick(doc, lambda v: isinstance(v, dict) and v)
        if container is None:
            return "duplicate: none"
        d = container[key]
        victim = self.rng.choice(list(d))
        container[key] = _Dup(d, victim, d[victim] if self.rng.random() < 0.5 else self.rng.choice(SCALARS))
        return f"duplicate key {victim!r}"

    def forged_value(self, doc) -> str:
        node = self.node(doc)[1]
        attrs = node.get("attrs")
        if not isinstance(attrs, dict):
            return "forged: no attrs"
        name = self.rng.choice([*attrs, "fuzz"]) if attrs else "fuzz"
        attrs[name] = self.rng.choice(FORGED_VALUES)
        return f"forged value for {name!r}: {str(attrs[name])[:60]}"

    def tensor_spec(self, doc) -> str:
        specs = [s for s in _tensor_specs(doc) if isinstance(s[2][s[3]], dict) and "shape" in s[2][s[3]]]
        if not specs:
            return "tensor spec: none"
        _, group, holder, name = self.rng.choice(specs)
        spec = holder[name]
        what = self.rng.choice(["shape+", "shape-", "dim", "dtype", "flag", "none", "empty"])
        if what == "shape+" and spec["shape"]:
            spec["shape"][self.rng.randrange(len(spec["shape"]))] += 1
        elif what == "shape-":
            spec["shape"] = spec["shape"][:-1]
        elif what == "dim":
            spec["shape"] = [*spec["shape"], self.rng.choice([1, 2**40])]
        elif what == "dtype":
            spec["dtype"] = self.rng.choice(["float64", "int64", "bfloat16", "bool", "complex64", "bogus"])
        elif what == "flag":
            flag = "requires_grad" if group == "params" else "persistent"
            spec[flag] = self.rng.choice([not spec.get(flag), 1, "yes", None])
        elif what == "none":
            holder[name] = None
        else:
            spec.clear()
        return f"{group} {name!r}: {what}"

    def top_level(self, doc) -> str:
        what = self.rng.choice(["format", "version", "root", "objects", "extra", "version-bool"])
        if what == "format":
            doc["format"] = self.rng.choice(["torchdam-archx", "", None])
        elif what == "version":
            doc["version"] = self.rng.choice([0, 3, 99, "2", 2.0, None])
        elif what == "version-bool":
            doc["version"] = True
        elif what == "extra":
            doc["eval"] = "__import__('os').system('true')"
        else:
            doc.pop(what, None)
        return f"top level: {what}"

    def members(self, doc) -> str:
        node = self.node(doc)[1]
        group = self.rng.choice(["params", "buffers", "children"])
        members = node.get(group)
        if not isinstance(members, dict) or not members:
            return f"members: no {group}"
        names = list(members)
        if len(names) > 1 and self.rng.random() < 0.4:
            a, b = self.rng.sample(names, 2)
            members[a], members[b] = members[b], members[a]
            return f"swap {group} {a!r} and {b!r}"
        victim = self.rng.choice(names)
        new = self.rng.choice([victim + "x", "a.b", "", "forward", "weight", "training", "__class__", victim.upper()])
        members[new] = members.pop(victim)
        return f"rename {group} {victim!r} -> {new!r}"

    def legit_edit(self, doc) -> str:
        node = self.node(doc)[1]
        attrs = node.get("attrs") if isinstance(node.get("attrs"), dict) else {}
        floats = [k for k, v in attrs.items() if type(v) is float]
        if floats and self.rng.random() < 0.6:
            key = self.rng.choice(floats)
            attrs[key] = self.rng.choice([0.0, 0.5, 1e-3, 2.0])
            return f"legit: {key} = {attrs[key]}"
        node["training"] = not node.get("training")
        return "legit: training flag flipped"

    def text_damage(self, text: bytes) -> tuple[bytes, str]:
        what = self.rng.choice(["truncate", "flip", "utf8", "empty", "null", "trailing"])
        if what == "truncate":
            return text[:self.rng.randrange(len(text))], what
        if what == "flip":
            data = bytearray(text)
            for _ in range(self.rng.randint(1, 8)):
                data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
            return bytes(data), what
        if what == "utf8":
            at = self.rng.randrange(len(text))
            return text[:at] + b"\xff\xfe\xc3" + text[at:], what
        if what == "trailing":
            return text + b" {} ", what
        return (b"" if what == "empty" else b"null"), what


#: mutation -> weight; the issue's cases (method names, references, huge ints, classes) weigh more
MUTATIONS = {"delete_key": 1, "change_type": 1, "swap_class": 2, "deep_nesting": 1, "huge_int": 2, "negative_int": 1,
             "nudge_int": 1, "nan": 1, "long_string": 1, "bad_reference": 2, "method_attribute": 3,
             "duplicate_key": 1, "forged_value": 1, "tensor_spec": 1, "top_level": 1, "members": 1, "legit_edit": 2,
             "text_damage": 1}


def _canonical(doc) -> str:
    body = {k: v for k, v in doc.items() if k != "metadata"} if isinstance(doc, dict) else doc
    return json.dumps(body, sort_keys=True)


def _arch_cases(seed_docs: dict[str, dict]) -> list[_Case]:
    cases = []
    for seed_index, (name, seed_doc) in enumerate(seed_docs.items()):
        seed_canonical = _canonical(seed_doc)
        for i in range(ARCH_CASES_PER_SEED):
            rng = random.Random(SEED * 1000 + seed_index * 100 + i)
            mutator, doc = _Mutator(rng), json.loads(json.dumps(seed_doc))
            case = _Case(f"arch-{name}-{i}", name)
            n_ops = rng.choices([1, 2, 3], weights=[7, 2, 1])[0]
            damage = None
            for _ in range(n_ops):
                op = rng.choices(list(MUTATIONS), weights=list(MUTATIONS.values()))[0]
                if op == "text_damage":
                    damage = op
                    continue
                case.ops.append(getattr(mutator, op)(doc))
            out: list[str] = []
            _emit(doc, out)
            text = "".join(out)
            for key, replacement in mutator.placeholders.items():
                text = text.replace(json.dumps(key), replacement)
            data = text.encode("utf-8", "surrogatepass")
            if damage:
                data, what = mutator.text_damage(data)
                case.ops.append(f"text damage: {what}")
            case.text = data
            case.unchanged = (not damage and not mutator.placeholders and not _has_dup(doc)
                              and _canonical(doc) == seed_canonical)
            cases.append(case)
    return cases


def _has_dup(doc) -> bool:
    return isinstance(doc, _Dup) or any(isinstance(c[k], _Dup) for c, k in _positions(doc))


# ---------------------------------------------------------------------------- checkpoint mutations

def _checkpoint_seeds() -> dict[str, dict]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    python_state, numpy_state = random.getstate(), np.random.get_state()
    random.seed(1)
    np.random.seed(1)
    rng = get_rng_state()  # of seeded generators, so the seed is the same on every run
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    training = {"format": "torchdam-train", "epoch": 2, "step_in_epoch": 0, "global_step": 17,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng,
                "best": {"acc": 0.5, "loss": None, "epoch": 1}, "records": [{"epoch": 1, "loss": 0.25}]}
    small = {"step": 3, "w": torch.arange(6.0).reshape(2, 3), "ids": torch.tensor([1, 2, 3]),
             "nested": {"t": (1, 2.5, None, "x")}}
    return {"training": training, "small": small}


def _zip_records(payload: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(payload)) as archive:
        return [(info.filename, archive.read(info.filename)) for info in archive.infolist()]


def _zip(records: list[tuple[str, bytes]], compression: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as archive:
        for name, data in records:
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data, compression)
    return out.getvalue()


def _reproducible(blob: bytes) -> bytes:
    """A checkpoint with the same state whose bytes do not change from run to run (torch.save
    writes a random serialization id), so every mutated case is the same on every run."""
    records = [(n, b"0" * len(d) if n.endswith("serialization_id") else d)
               for n, d in _zip_records(blob.split(b"\n", 1)[1])]
    payload = _zip(records)
    return b"%s 1 %s\n" % (MAGIC, hashlib.sha256(payload).hexdigest().encode()) + payload


def _evil_pickle(rng: random.Random) -> bytes:
    """A pickle whose loading would import or call something: the sentinel, os.system, ..."""
    module, name = rng.choice([(SENTINEL, "boom"), (SENTINEL, "Evil"), ("os", "system"), ("builtins", "eval"),
                               ("subprocess", "check_call")])
    call = b"c" + module.encode() + b"\n" + name.encode() + b"\n" + b"(X\x04\x00\x00\x00trueq\x00tR"
    return b"\x80\x02}q\x01X\x01\x00\x00\x00xq\x02" + call + b"s."


def _deep_pickle(depth: int) -> bytes:
    """{"x": [[[...]]]} nested ``depth`` lists deep, built without recursion."""
    return b"\x80\x02}X\x01\x00\x00\x00x" + b"]" * depth + b"a" * (depth - 1) + b"s."


def _mutate_pickle_ints(data: bytes, rng: random.Random) -> bytes:
    """Replace the operand of random BININT1/BININT2/BININT opcodes (sizes, strides, storage
    numels, offsets) with other values, some huge."""
    out = bytearray(data)
    spots = [i for i in range(len(out) - 1) if out[i] in (0x4B, 0x4D, 0x4A)]  # K M J
    for i in rng.sample(spots, min(len(spots), rng.randint(1, 3))):
        width = {0x4B: 1, 0x4D: 2, 0x4A: 4}[out[i]]
        value = rng.choice([0, 1, 2**(8 * width - 1) - 1, rng.randrange(2**(8 * width))])
        if width == 4:
            value = rng.choice([value, 2**31 - 1, -(2**31)])
            out[i + 1:i + 5] = struct.pack("<i", value if value < 2**31 else value - 2**32)
        else:
            out[i + 1:i + 1 + width] = value.to_bytes(width, "little")
    return bytes(out)


def _checkpoint_cases(seed_blobs: dict[str, bytes]) -> list[_Case]:
    cases = []
    for seed_index, (name, blob) in enumerate(seed_blobs.items()):
        newline = blob.index(b"\n")
        payload = blob[newline + 1:]
        for i in range(CKPT_CASES_PER_SEED):
            rng = random.Random(SEED * 2000 + seed_index * 100 + i)
            what = rng.choice(["flip", "truncate", "append", "header", "forged-flip", "forged-truncate",
                               "forged-record", "forged-pickle-ints", "forged-pickle-ints", "deflate", "bomb",
                               "evil", "deep", "zip-entries", "unchanged"])
            case = _Case(f"ckpt-{name}-{i}", name, [what])
            forged = None
            if what == "flip":
                data = bytearray(blob)
                for _ in range(rng.randint(1, 16)):
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                case.text = bytes(data)
            elif what == "truncate":
                case.text = blob[:rng.randrange(len(blob))]
            elif what == "append":
                case.text = blob + rng.randbytes(rng.randint(1, 64))
            elif what == "header":
                header = rng.choice([b"TORCHDAM-CKPT 2 ", b"torchdam-ckpt 1 ", b"TORCHDAM-CKPT 1  ", b"PK"])
                digest = blob[len(b"TORCHDAM-CKPT 1 "):newline]
                case.text = rng.choice([header + digest + b"\n" + payload, blob.replace(b"\n", b" ", 1),
                                        b" " * 200 + blob, MAGIC + b" 1 " + b"0" * 64 + b"\n" + payload])
            elif what == "forged-flip":
                data = bytearray(payload)
                for _ in range(rng.randint(1, 8)):
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                forged = bytes(data)
            elif what == "forged-truncate":
                forged = payload[:rng.randrange(len(payload))]
            elif what == "forged-record":
                records = _zip_records(payload)
                index = rng.randrange(len(records))
                data = bytearray(records[index][1])
                if data:
                    for _ in range(rng.randint(1, 4)):
                        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                records[index] = (records[index][0], bytes(data))
                case.ops.append(records[index][0])
                forged = _zip(records)
            elif what == "forged-pickle-ints":
                records = [(n, _mutate_pickle_ints(d, rng) if n.endswith("data.pkl") else d)
                           for n, d in _zip_records(payload)]
                forged = _zip(records)
            elif what == "deflate":
                forged = _zip(_zip_records(payload), zipfile.ZIP_DEFLATED)
            elif what == "bomb":  # a data record inflated to 16 MiB of zeros, then deflated
                records = _zip_records(payload)
                index = next(i for i, (n, _) in enumerate(records) if "/data/" in n)
                records[index] = (records[index][0], bytes(16 * 2**20))
                forged = _zip(records, zipfile.ZIP_DEFLATED)
            elif what == "evil":
                forged = _zip([(n, _evil_pickle(rng) if n.endswith("data.pkl") else d)
                               for n, d in _zip_records(payload)])
            elif what == "deep":
                forged = _zip([(n, _deep_pickle(rng.choice([70, 5000, 100_000])) if n.endswith("data.pkl") else d)
                               for n, d in _zip_records(payload)])
            elif what == "zip-entries":
                records = _zip_records(payload)
                how = rng.choice(["drop", "duplicate", "rename"])
                index = rng.randrange(len(records))
                if how == "drop":
                    del records[index]
                elif how == "duplicate":
                    records.append((records[index][0], records[index][1][::-1]))
                else:
                    records[index] = (records[index][0] + "x", records[index][1])
                case.ops.append(how)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
                    forged = _zip(records)
            else:
                forged = payload
                case.unchanged = True
            if forged is not None:
                case.text = b"%s %d %s\n" % (MAGIC, 1, hashlib.sha256(forged).hexdigest().encode()) + forged
            cases.append(case)
    return cases


# ---------------------------------------------------------------------------- the child

@dataclass
class _Seed:
    model: nn.Module
    args: tuple
    kwargs: dict
    directory: Path
    tensors: dict[str, Tensor]  # what the weights file holds
    outputs: tuple[str, object]


def _vm_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))


def _judge(case: _Case, seed: _Seed, model: nn.Module, work: Path, record: dict) -> list[str]:
    """What is wrong with a model load accepted (nothing, for one equal to a legitimately
    saved model)."""
    problems = []
    state = model.state_dict()
    tensors = {**state, **_nonpersistent(model)}
    if set(tensors) != set(seed.tensors) or not all(_same_tensor(tensors[k], seed.tensors[k]) for k in tensors):
        problems.append("its tensors (state_dict and non-persistent buffers) differ from the weights file")
    shadowing = _shadowing(model)
    if shadowing:
        problems.append(f"attributes shadow class behaviour: {shadowing[:3]}")
    cpu = time.process_time()
    outputs = _forward(model, seed.args, seed.kwargs)
    record["forward_cpu"] = time.process_time() - cpu
    if outputs[0] in ("memory", "not-callable"):
        problems.append(f"forward: {outputs}")
    if case.unchanged and not _same_outputs(outputs, seed.outputs):
        problems.append("an unchanged architecture gives other outputs")
    record["outcome"] = "loaded-equal" if _same_outputs(outputs, seed.outputs) else "loaded-different"
    again_dir = work / f"{case.seed}-again"
    try:
        again = load(save(model, again_dir))
    except TorchDAMError as err:
        problems.append(f"save/reload of the loaded model refused: {str(err)[:300]}")
    else:
        again_state = again.state_dict()
        if set(again_state) != set(state) or not all(_same_tensor(again_state[k], state[k]) for k in state):
            problems.append("reloading a re-save changes the state_dict")
        if not _same_outputs(_forward(again, seed.args, seed.kwargs), outputs):
            problems.append("reloading a re-save changes the outputs")
    return problems


def _run_arch_case(case: _Case, seed: _Seed, work: Path) -> dict:
    record: dict = {"id": case.id, "ops": case.ops}
    directory = work / case.seed
    (directory / ARCH_FILE).write_bytes(case.text)
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        model = load(directory)
    except TorchDAMError as err:
        message = str(err)
        record["outcome"] = "refused"
        record["message"] = message[:300]
        if str(directory) not in message or "\n" in message:
            record["problem"] = "the error does not name the file in one line"
        return record
    except BaseException as err:  # noqa: BLE001 - any other exception is the finding
        record.update(outcome="FAIL", problem=f"raised {type(err).__name__}: {str(err)[:300]}")
        return record
    finally:
        record["load_cpu"], record["load_wall"] = time.process_time() - cpu, time.perf_counter() - wall
    try:
        problems = _judge(case, seed, model, work, record)
    except Exception as err:  # noqa: BLE001 - a loaded model must be usable
        problems = [f"using the loaded model raised {type(err).__name__}: {str(err)[:200]}"]
    if problems:
        record.update(outcome="FAIL", problem="; ".join(problems))
    return record


def _run_checkpoint_case(case: _Case, seed_state: dict, work: Path) -> dict:
    record: dict = {"id": case.id, "ops": case.ops}
    path = work / f"{case.id}.pt"
    path.write_bytes(case.text)
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        state = load_checkpoint(path)
    except TorchDAMError as err:
        message = str(err)
        record.update(outcome="refused", message=message[:300])
        if str(path) not in message or "\n" in message:
            record["problem"] = "the error does not name the file in one line"
        return record
    except BaseException as err:  # noqa: BLE001
        record.update(outcome="FAIL", problem=f"raised {type(err).__name__}: {str(err)[:300]}")
        return record
    finally:
        record["load_cpu"], record["load_wall"] = time.process_time() - cpu, time.perf_counter() - wall
        path.unlink()
    if case.unchanged:
        record["outcome"] = "loaded-equal" if _same(state, seed_state) else "FAIL"
        if record["outcome"] == "FAIL":
            record["problem"] = "an unchanged payload loads another state"
        return record
    record["outcome"] = "loaded-equal" if _same(state, seed_state) else "loaded-different"
    try:
        again = load_checkpoint(save_checkpoint(state, work / f"{case.id}-again"))
    except TorchDAMError as err:
        record.update(outcome="FAIL", problem=f"re-saving the loaded state failed: {err}")
        return record
    if not _same(again, state):
        record.update(outcome="FAIL", problem="re-saving the loaded state changes it")
    return record


def _child(cases: list[_Case], seeds: dict[str, _Seed], ckpt_seeds: dict[str, dict], work: Path,
           sentinel_dir: Path, results: Path) -> None:
    torch.set_num_threads(1)  # an OpenMP pool inherited through fork must not be entered
    for seed in seeds.values():  # outputs with this thread count, bit for bit
        seed.outputs = _forward(seed.model, seed.args, seed.kwargs)
    sys.path.insert(0, str(sentinel_dir))
    warnings.simplefilter("ignore")
    gc.collect()
    gc.freeze()  # the seeds and imports stay; collections then only scan what cases create
    start = _vm_bytes()
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    limit = start + MEMORY_HEADROOM if hard == resource.RLIM_INFINITY else min(hard, start + MEMORY_HEADROOM)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    began = time.perf_counter()
    with open(results, "a") as out, open(results.with_suffix(".trace"), "w") as trace:
        for case in cases:
            out.write(json.dumps({"start": case.id}) + "\n")
            out.flush()
            # a case that hangs leaves its stack for the parent to show
            faulthandler.dump_traceback_later(CASE_WALL_LIMIT * 0.75, file=trace)
            if case.id.startswith("arch"):
                record = _run_arch_case(case, seeds[case.seed], work)
            else:
                record = _run_checkpoint_case(case, ckpt_seeds[case.seed], work)
            faulthandler.cancel_dump_traceback_later()
            record["vm_growth_mb"] = round((_vm_bytes() - start) / 2**20, 1)
            record["t"] = round(time.perf_counter() - began, 3)
            out.write(json.dumps(record) + "\n")
            out.flush()
        out.write(json.dumps({"done": True, "sentinel_imported": SENTINEL in sys.modules}) + "\n")


def _sentinel_module(directory: Path, marker: Path) -> Path:
    """A module whose import, function and class each write ``marker``."""
    directory.mkdir()
    (directory / f"{SENTINEL}.py").write_text(
        "import pathlib\n"
        f"MARKER = pathlib.Path({str(marker)!r})\n"
        "MARKER.write_text('imported')\n"
        "def boom(*args, **kwargs):\n"
        "    MARKER.write_text('called')\n"
        "class Evil:\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        MARKER.write_text('constructed')\n")
    return directory


# ---------------------------------------------------------------------------- the test

def test_mutated_files_load_equal_or_raise_a_torchdam_error(tmp_path):
    started = time.perf_counter()
    marker = tmp_path / "sentinel-ran"
    sentinel_dir = _sentinel_module(tmp_path / "sentinel", marker)
    work = tmp_path / "work"
    seeds: dict[str, _Seed] = {}
    seed_docs = {}
    for name, (model, args, kwargs) in _seed_models().items():
        directory = save(model, work / name)
        seed_docs[name] = json.loads((directory / ARCH_FILE).read_text())
        seeds[name] = _Seed(model, args, kwargs, directory, load_file(directory / WEIGHTS_FILE),
                            _forward(model, args, kwargs))
        assert seeds[name].outputs[0] == "ok"
    ckpt_seeds = _checkpoint_seeds()
    ckpt_blobs = {name: _reproducible(save_checkpoint(state, work / f"seed-{name}").read_bytes())
                  for name, state in ckpt_seeds.items()}
    cases = _arch_cases(seed_docs) + _checkpoint_cases(ckpt_blobs)
    assert sum(c.id.startswith("arch") for c in cases) >= 200
    results = tmp_path / "results.jsonl"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: run every case, then leave without pytest's teardown
        code = 0
        try:
            _child(cases, seeds, ckpt_seeds, work, sentinel_dir, results)
        except BaseException:  # noqa: BLE001
            import traceback
            with open(results, "a") as out:
                out.write(json.dumps({"crash": traceback.format_exc()[-2000:]}) + "\n")
            code = 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + CASE_WALL_LIMIT + 60 + 0.2 * len(cases)
    status = None
    while status is None:
        done, status_code = os.waitpid(pid, os.WNOHANG)
        if done:
            status = status_code
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = -1
        else:
            last = _last_start(results)
            if last is not None and time.monotonic() - last[1] > CASE_WALL_LIMIT:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = -1
            time.sleep(0.05)
    lines = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    crash = [line["crash"] for line in lines if "crash" in line]
    assert not crash, crash[0]
    records = [line for line in lines if "outcome" in line]
    finished = {r["id"] for r in records}
    hung = [line["start"] for line in lines if "start" in line and line["start"] not in finished]
    trace = results.with_suffix(".trace")
    assert status == 0 and not hung, (f"the child hung or died on case {hung[:1]} (status {status}):\n"
                                      + (trace.read_text()[-3000:] if trace.exists() else ""))
    assert lines[-1].get("done") and not lines[-1]["sentinel_imported"], "the sentinel module was imported"
    assert not marker.exists(), f"code from a file ran: {marker.read_text()}"
    assert len(records) == len(cases)
    failures = [r for r in records if r["outcome"] == "FAIL" or r.get("problem")]
    assert not failures, "\n".join(f"{r['id']} {r['ops']}: {r.get('problem')}" for r in failures[:10])
    slow = [(r["id"], round(r["load_cpu"], 2)) for r in records if r["load_cpu"] > LOAD_CPU_LIMIT]
    assert not slow, f"loads over {LOAD_CPU_LIMIT} s of CPU: {slow}"
    outcomes: dict[str, dict[str, int]] = {}
    for r in records:
        kind = r["id"].split("-")[0]
        outcomes.setdefault(kind, {}).setdefault(r["outcome"], 0)
        outcomes[kind][r["outcome"]] += 1
    # the fuzzer reaches both sides: refusals and files that still load
    for kind in ("arch", "ckpt"):
        assert outcomes[kind].get("refused", 0) > 20 and outcomes[kind].get("refused", 0) < sum(outcomes[kind].values())
    print(f"\nload fuzz: {len(records)} cases in {time.perf_counter() - started:.1f} s, outcomes {outcomes}, "
          f"slowest load {max(r['load_cpu'] for r in records):.3f} s CPU, "
          f"largest address-space growth {max(r['vm_growth_mb'] for r in records)} MiB")


def _last_start(results: Path) -> tuple[str, float] | None:
    """The case the child started last, if it has not finished it, and when it started
    (approximated by the results file's modification time)."""
    if not results.exists():
        return None
    lines = results.read_text().splitlines()
    if not lines or '"start"' not in lines[-1]:
        return None
    return json.loads(lines[-1])["start"], results.stat().st_mtime - time.time() + time.monotonic()


class Unregistered(nn.Module):
    """A module class that is neither registered nor trusted."""


# ---------------------------------------------------------------------------- checkpoint loader, by hand

def _load_checkpoint_in_thread(path: Path, timeout: float = 10.0) -> BaseException | None:
    return outcome_in_thread(lambda: load_checkpoint(path), "load_checkpoint", timeout)


@pytest.mark.parametrize("kind", ["fifo", "fifo-symlink", "dev-zero", "directory"])
def test_checkpoint_special_files_are_refused_without_blocking(tmp_path, kind):
    path = tmp_path / LAST
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "fifo-symlink":
        os.mkfifo(tmp_path / "pipe")
        os.symlink(tmp_path / "pipe", path)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", path)
    else:
        path.mkdir()
    err = _load_checkpoint_in_thread(path)
    assert isinstance(err, TorchDAMError) and str(path) in str(err), err
    assert "not a regular file" in str(err)


def test_checkpoint_size_limit(tmp_path, monkeypatch):
    from torchdam import checkpoint

    path = save_checkpoint({"w": torch.ones(100)}, tmp_path)
    monkeypatch.setattr(checkpoint, "MAX_CHECKPOINT_BYTES", 100)
    with pytest.raises(TorchDAMError, match=rf"{path}: \d+ bytes, more than the 100 bytes allowed"):
        load_checkpoint(path)


def _forge(path: Path, payload: bytes) -> Path:
    path.write_bytes(b"%s 1 %s\n" % (MAGIC, hashlib.sha256(payload).hexdigest().encode()) + payload)
    return path


def test_checkpoint_compressed_record_is_refused_before_it_is_inflated(tmp_path):
    """A 16 KiB file whose deflated record torch.load would inflate to 16 MiB."""
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(4 * 2**20)}, buffer)
    path = _forge(tmp_path / LAST, _zip(_zip_records(buffer.getvalue()), zipfile.ZIP_DEFLATED))
    assert path.stat().st_size < 2**16
    with pytest.raises(TorchDAMError, match=rf"{path}: refused: record .* is compressed"):
        load_checkpoint(path)


def test_checkpoint_nested_too_deep_is_refused(tmp_path):
    nested: list = []
    for _ in range(70):
        nested = [nested]
    path = save_checkpoint({"x": nested}, tmp_path)
    with pytest.raises(TorchDAMError, match="nested more than 64 deep"):
        load_checkpoint(path)
    path = _forge(tmp_path / "deep.pt", _zip([(n, _deep_pickle(100_000) if n.endswith("data.pkl") else d)
                                              for n, d in _zip_records(path.read_bytes().split(b"\n", 1)[1])]))
    with pytest.raises(TorchDAMError, match="nested more than 64 deep"):
        load_checkpoint(path)


def test_checkpoint_tensor_claiming_more_than_its_storage_is_refused(tmp_path):
    path = save_checkpoint({"t": torch.zeros(1).expand(10**6)}, tmp_path)  # 4 bytes stored, 4 MB once copied
    with pytest.raises(TorchDAMError, match=r"claims 4000000 bytes over a storage of 4 bytes"):
        load_checkpoint(path)


def test_checkpoint_evil_pickle_with_valid_checksum_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    sys.path.insert(0, str(_sentinel_module(tmp_path / "sentinel", marker)))
    try:
        buffer = io.BytesIO()
        torch.save({"w": torch.ones(2)}, buffer)
        for seed in range(5):
            evil = _evil_pickle(random.Random(seed))
            path = _forge(tmp_path / f"evil-{seed}.pt",
                          _zip([(n, evil if n.endswith("data.pkl") else d) for n, d in _zip_records(buffer.getvalue())]))
            with pytest.raises(TorchDAMError, match="refused"):
                load_checkpoint(path)
    finally:
        sys.path.remove(str(tmp_path / "sentinel"))
    assert not marker.exists() and SENTINEL not in sys.modules


def test_checkpoint_reference_cycle_is_refused(tmp_path):
    loop: list = []
    loop.append(loop)
    shared = [torch.ones(2)]
    assert load_checkpoint(save_checkpoint({"a": shared, "b": shared}, tmp_path))["a"][0].shape == (2,)
    with pytest.raises(TorchDAMError, match="reference cycle"):
        load_checkpoint(save_checkpoint({"x": loop}, tmp_path))
