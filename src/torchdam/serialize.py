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
Nothing in the files is trusted either: :func:`load` checks their structure before it
uses them (regular files within size limits, the architecture's layout, nesting and
references, attribute names that would shadow methods, tensor shapes and dtypes against
the weights file's header, size attributes against the tensors; see :func:`load`), and
every refusal is a :class:`~torchdam.errors.CheckpointError` naming the file and why.
:func:`save` applies the same checks, so it never writes a model that load would refuse.

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
import itertools
import json
import math
import re
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes
from torch import nn

from torchdam.atomic import write_atomic
from torchdam.checkpoint import read_regular_file
from torchdam.errors import CheckpointError, ConfigError

__all__ = ["ARCH_FILE", "FUNCTIONS", "MAX_ARCH_BYTES", "MAX_DEPTH", "MAX_MODULES", "MAX_NAME_LENGTH",
           "MAX_OBJECTS", "MAX_VALUE_DEPTH", "MAX_WEIGHTS_BYTES", "METHODS", "MIN_INT_LIMIT", "RULES",
           "WEIGHTS_FILE", "Rule", "load", "load_metadata", "register_function", "register_module", "save"]

WEIGHTS_FILE = "model.safetensors"
ARCH_FILE = "architecture.json"
FORMAT = "torchdam-arch"
VERSION = 2
#: Versions :func:`load` reads (version 1 files have no function/object/set values).
READABLE_VERSIONS = (1, 2)

# Limits :func:`load` (and :func:`save`, so it never writes what load refuses) enforces
# before it imports or allocates what a file asks for. Raise one for a file you trust that
# exceeds it; each refusal names the limit it hit.
#: Largest architecture.json read.
MAX_ARCH_BYTES = 32 * 2**20
#: Largest model.safetensors read (it is read into memory whole).
MAX_WEIGHTS_BYTES = 2**40
#: Most module entries, and module visits when shared modules are walked under every path.
MAX_MODULES = 250_000
#: Most entries in the objects table (Hugging Face configs).
MAX_OBJECTS = 10_000
#: Deepest module nesting.
MAX_DEPTH = 100
#: Deepest nesting inside one attribute value.
MAX_VALUE_DEPTH = 64
#: Longest attribute, parameter, buffer, child, class or module name.
MAX_NAME_LENGTH = 1024
#: An integer attribute of a module may be as large as the number of tensor elements the
#: weights file holds, and at least this large (token ids, cached sequence lengths, ...).
MIN_INT_LIMIT = 4096
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
    children", and what must hold for an instance to be one its class could have built:

    * ``derived`` attributes are not stored (they hold tensors or weak references) and
      ``rebuild`` recreates them once the module's parameters exist;
    * ``check(module, elements)`` raises ``ValueError`` when the module's size attributes
      disagree with its parameter and buffer shapes (``elements`` is the number of tensor
      elements the saved file holds, the bound for sizes no shape pins down); load runs
      it before copying any weight in, save before writing;
    * ``check_values(module)`` does the same for what depends on tensor values (indices),
      once the weights are loaded.
    """

    derived: frozenset[str] = frozenset()
    rebuild: Callable[[nn.Module], None] | None = None
    check: Callable[[nn.Module, int], None] | None = None
    check_values: Callable[[nn.Module], None] | None = None


_MISSING = object()


def _attr(module: nn.Module, name: str) -> Any:
    value = module.__dict__.get(name, _MISSING)
    if value is _MISSING:
        raise ValueError(f"attribute {name!r} is missing")
    return value


def _int_attr(module: nn.Module, name: str, low: int = 0, high: int | None = None) -> int:
    value = _attr(module, name)
    if type(value) is not int or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} is {value!r}, expected an integer {bound}")
    return value


def _ints_attr(module: nn.Module, name: str, n: int, low: int) -> tuple[int, ...]:
    value = _attr(module, name)
    if not (isinstance(value, (tuple, list)) and len(value) == n
            and all(type(v) is int and v >= low for v in value)):
        raise ValueError(f"{name} is {value!r}, expected {n} integers >= {low}")
    return tuple(value)


def _bool_attr(module: nn.Module, name: str) -> bool:
    value = _attr(module, name)
    if type(value) is not bool:
        raise ValueError(f"{name} is {value!r}, expected True or False")
    return value


def _tensor(module: nn.Module, name: str, required: bool = True) -> torch.Tensor | None:
    t = module._parameters.get(name, module._buffers.get(name))
    if t is None and required:
        raise ValueError(f"it has no {name!r} tensor")
    return t


def _expect_shape(module: nn.Module, name: str, shape: tuple, required: bool = False) -> None:
    t = _tensor(module, name, required)
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} from its attributes")


def _expect(module: nn.Module, name: str, value: int, source: str) -> None:
    got = _attr(module, name)
    if type(got) is not int or got != value:
        raise ValueError(f"{name} is {got!r} but {source} says {value}")


def _check_linear(m: nn.Module, elements: int) -> None:
    w = _tensor(m, "weight")
    if w.dim() != 2:
        raise ValueError(f"weight has shape {tuple(w.shape)}, expected 2 dimensions")
    _expect(m, "out_features", w.shape[0], f"weight of shape {tuple(w.shape)}")
    _expect(m, "in_features", w.shape[1], f"weight of shape {tuple(w.shape)}")
    _expect_shape(m, "bias", (w.shape[0],))


def _check_conv(m: nn.Module, elements: int) -> None:
    w = _tensor(m, "weight")
    d = w.dim() - 2
    if d < 1:
        raise ValueError(f"weight has shape {tuple(w.shape)}, expected at least 3 dimensions")
    src = f"weight of shape {tuple(w.shape)}"
    if _ints_attr(m, "kernel_size", d, 1) != tuple(w.shape[2:]):
        raise ValueError(f"kernel_size is {m.kernel_size!r} but {src} says {tuple(w.shape[2:])}")
    transposed, groups = _bool_attr(m, "transposed"), _int_attr(m, "groups", 1)
    per_group, full = w.shape[1], w.shape[0]
    _expect(m, "in_channels" if transposed else "out_channels", full, src)
    _expect(m, "out_channels" if transposed else "in_channels", per_group * groups, f"{src} and groups={groups}")
    if m.in_channels % groups or m.out_channels % groups:
        raise ValueError(f"groups={groups} does not divide the channels")
    stride, dilation = _ints_attr(m, "stride", d, 1), _ints_attr(m, "dilation", d, 1)
    padding, mode = _attr(m, "padding"), _attr(m, "padding_mode")
    if mode not in ("zeros", "reflect", "replicate", "circular") or (transposed and mode != "zeros"):
        raise ValueError(f"padding_mode {mode!r} is not one this layer supports")
    if isinstance(padding, str):
        if padding not in ("same", "valid") or transposed or (padding == "same" and set(stride) != {1}):
            raise ValueError(f"padding {padding!r} is not one this layer supports")
        twice = [0, 0] * d
        if padding == "same":
            for i, (dil, k) in enumerate(zip(dilation, m.kernel_size)):
                total = dil * (k - 1)
                twice[2 * (d - 1 - i)], twice[2 * (d - 1 - i) + 1] = total // 2, total - total // 2
    else:
        padding = _ints_attr(m, "padding", d, 0)
        twice = [p for p in reversed(padding) for _ in range(2)]
    # padding (and a transposed conv's stride) grow the output with no weight behind it:
    # bound them by the saved elements, like every size no shape pins down
    for name, values in (("padding", twice), ("stride", stride), ("dilation", dilation)):
        if max(values, default=0) > elements:
            raise ValueError(f"{name} {tuple(values)} exceeds the {elements} saved tensor elements")
    reversed_twice = _attr(m, "_reversed_padding_repeated_twice")
    if not isinstance(reversed_twice, (list, tuple)) or list(reversed_twice) != twice:
        raise ValueError(f"_reversed_padding_repeated_twice is {reversed_twice!r}, expected {twice} "
                         "from padding, kernel_size and dilation")
    output_padding = _ints_attr(m, "output_padding", d, 0)
    if any(op >= max(s, dil) if transposed else op for op, s, dil in zip(output_padding, stride, dilation)):
        raise ValueError(f"output_padding {output_padding} is out of range for stride {stride}")
    _expect_shape(m, "bias", (m.out_channels,))


def _check_batch_norm(m: nn.Module, elements: int) -> None:
    n = _int_attr(m, "num_features")
    for name in ("weight", "bias", "running_mean", "running_var"):
        _expect_shape(m, name, (n,))
    _expect_shape(m, "num_batches_tracked", ())


def _check_group_norm(m: nn.Module, elements: int) -> None:
    groups, channels = _int_attr(m, "num_groups", 1), _int_attr(m, "num_channels")
    if channels % groups:
        raise ValueError(f"num_groups={groups} does not divide num_channels={channels}")
    _expect_shape(m, "weight", (channels,))
    _expect_shape(m, "bias", (channels,))


def _check_normalized_shape(m: nn.Module, elements: int) -> None:
    shape = _attr(m, "normalized_shape")
    if not (isinstance(shape, tuple) and all(type(v) is int and v >= 0 for v in shape)):
        raise ValueError(f"normalized_shape is {shape!r}, expected a tuple of integers")
    _expect_shape(m, "weight", shape)
    _expect_shape(m, "bias", shape)


def _check_embedding(m: nn.Module, elements: int) -> None:
    w = _tensor(m, "weight")
    if w.dim() != 2:
        raise ValueError(f"weight has shape {tuple(w.shape)}, expected 2 dimensions")
    _expect(m, "num_embeddings", w.shape[0], f"weight of shape {tuple(w.shape)}")
    _expect(m, "embedding_dim", w.shape[1], f"weight of shape {tuple(w.shape)}")
    padding_idx = _attr(m, "padding_idx")
    if padding_idx is not None and not (type(padding_idx) is int and 0 <= padding_idx < w.shape[0]):
        raise ValueError(f"padding_idx is {padding_idx!r}, not a row of the {w.shape[0]}-row weight")


_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _check_rnn(m: nn.Module, elements: int) -> None:
    mode = _attr(m, "mode")
    if mode not in _GATES:
        raise ValueError(f"mode is {mode!r}, expected one of {sorted(_GATES)}")
    inputs, hidden = _int_attr(m, "input_size", 1), _int_attr(m, "hidden_size", 1)
    layers, proj = _int_attr(m, "num_layers", 1), _int_attr(m, "proj_size", 0, hidden - 1)
    bias, directions = _bool_attr(m, "bias"), 2 if _bool_attr(m, "bidirectional") else 1
    if proj and mode != "LSTM":
        raise ValueError("proj_size is only supported by LSTM")
    gate, real = _GATES[mode] * hidden, proj or hidden
    expected: dict[str, tuple[int, ...]] = {}
    for layer in range(layers):
        for suffix in ("", "_reverse")[:directions]:
            expected[f"weight_ih_l{layer}{suffix}"] = (gate, inputs if layer == 0 else real * directions)
            expected[f"weight_hh_l{layer}{suffix}"] = (gate, real)
            if bias:
                expected[f"bias_ih_l{layer}{suffix}"] = expected[f"bias_hh_l{layer}{suffix}"] = (gate,)
            if proj:
                expected[f"weight_hr_l{layer}{suffix}"] = (proj, hidden)
    names = _attr(m, "_flat_weights_names")
    if names != list(expected):
        raise ValueError(f"_flat_weights_names are {names!r}, expected {list(expected)} from its attributes")
    if set(m._parameters) != set(expected):
        raise ValueError(f"its parameters are {sorted(m._parameters)}, expected {sorted(expected)}")
    for name, shape in expected.items():
        _expect_shape(m, name, shape, required=True)


def _check_attention(m: nn.Module, elements: int) -> None:
    embed, heads = _int_attr(m, "embed_dim", 1), _int_attr(m, "num_heads", 1)
    kdim, vdim = _int_attr(m, "kdim", 1), _int_attr(m, "vdim", 1)
    if _attr(m, "head_dim") != embed // heads or embed % heads:
        raise ValueError(f"head_dim {m.head_dim!r} and num_heads {heads} do not make embed_dim {embed}")
    same = _bool_attr(m, "_qkv_same_embed_dim")
    if same != (kdim == embed and vdim == embed):
        raise ValueError("_qkv_same_embed_dim disagrees with kdim, vdim and embed_dim")
    if same:
        _expect_shape(m, "in_proj_weight", (3 * embed, embed), required=True)
    else:
        for name, dim in (("q_proj_weight", embed), ("k_proj_weight", kdim), ("v_proj_weight", vdim)):
            _expect_shape(m, name, (embed, dim), required=True)
    _expect_shape(m, "in_proj_bias", (3 * embed,))
    _expect_shape(m, "bias_k", (1, 1, embed))
    _expect_shape(m, "bias_v", (1, 1, embed))
    out = m._modules.get("out_proj")
    if not isinstance(out, nn.Linear) or tuple(out.weight.shape) != (embed, embed):
        raise ValueError(f"out_proj is not a Linear of shape ({embed}, {embed})")


def _check_scatter(m: nn.Module, elements: int) -> None:
    # ScatterUnits.forward allocates a zero tensor `total` wide along `axis`: bound it by
    # the saved elements, as every other width is bound by a saved shape
    index = _tensor(m, "index")
    if index.dim() != 1 or index.dtype != torch.long:
        raise ValueError(f"index is a {tuple(index.shape)} {index.dtype} tensor, expected a 1-D int64 one")
    total = _int_attr(m, "total", index.numel(), max(elements, index.numel()))
    if type(_attr(m, "axis")) is not int:
        raise ValueError(f"axis is {m.axis!r}, expected an integer")
    _int_attr(m, "pad_before", -1, total - index.numel())
    if m._modules.get("module") is None:
        raise ValueError("it wraps no module")


def _check_scatter_values(m: nn.Module) -> None:
    index = m.index.tolist()
    if any(b <= a for a, b in itertools.pairwise(index)) or (index and not 0 <= index[0] <= index[-1] < m.total):
        raise ValueError(f"index is not increasing within [0, {m.total})")
    contiguous = bool(index) and index == list(range(index[0], index[0] + len(index)))
    if m.pad_before != (index[0] if contiguous else -1):
        raise ValueError(f"pad_before is {m.pad_before} but index says {index[0] if contiguous else -1}")


def _rebuild_rnn(rnn: nn.RNNBase) -> None:
    # The RNN kernels read the parameter list _flat_weights (and cuDNN a flattened copy);
    # _init_flat_weights rebuilds both from _flat_weights_names, as RNNBase.__init__ and
    # _apply do, so the list holds the loaded parameters themselves.
    unknown = [n for n in rnn._flat_weights_names if n not in rnn._parameters]
    if unknown:
        raise ValueError(f"_flat_weights_names {unknown} are not parameters of the {type(rnn).__name__}")
    rnn._init_flat_weights()


#: module type, or its qualified name (for classes this module does not import), matched
#: along the MRO -> its :class:`Rule`. Extend it for another type whose ``__dict__`` holds
#: derived tensors or whose attributes size what its forward allocates.
RULES: dict[type | str, Rule] = {
    nn.RNNBase: Rule(frozenset({"_flat_weights", "_flat_weight_refs"}), _rebuild_rnn, _check_rnn),
    nn.Linear: Rule(check=_check_linear),
    nn.modules.conv._ConvNd: Rule(check=_check_conv),
    nn.modules.batchnorm._NormBase: Rule(check=_check_batch_norm),
    nn.GroupNorm: Rule(check=_check_group_norm),
    nn.LayerNorm: Rule(check=_check_normalized_shape),
    "torch.nn.modules.normalization.RMSNorm": Rule(check=_check_normalized_shape),  # torch >= 2.4
    nn.Embedding: Rule(check=_check_embedding),
    nn.EmbeddingBag: Rule(check=_check_embedding),
    nn.MultiheadAttention: Rule(check=_check_attention),
    "torchdam.compact.ScatterUnits": Rule(check=_check_scatter, check_values=_check_scatter_values),
}
_NO_RULE = Rule()


def _rule(cls: type) -> Rule:
    for base in cls.__mro__:
        for key in (base, _qualified(base)):
            if key in RULES:
                return RULES[key]
    return _NO_RULE


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


# ---------------------------------------------------------------------------- names

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
    if type(key) is not str or not key or len(key) > MAX_NAME_LENGTH:
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
    if type(name) is not str or not name or len(name) > MAX_NAME_LENGTH or "." in name:
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
    return max(MIN_INT_LIMIT, elements)


# ---------------------------------------------------------------------------- save

def _where(path: str) -> str:
    shown = path if len(path) <= 200 else path[:200] + "..."
    return f"module '{shown}'" if path else "the root module"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


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
        plan = _Plan(json.loads(arch), Path(ARCH_FILE))
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
                    f"the model's {elements} tensor elements (or MIN_INT_LIMIT={MIN_INT_LIMIT}), which load "
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
    _check_before_save(model, arch, tensors)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / WEIGHTS_FILE, safetensors_bytes(tensors), "the model's weights")
    write_atomic(directory / ARCH_FILE, arch, "the model's architecture")
    return directory


# ---------------------------------------------------------------------------- load
# load trusts nothing in the two files: it checks the architecture's structure, resolves
# every class, then checks the weights file's header against the architecture before it
# allocates a tensor or builds a module, and checks each module against its tensors.

_NODE_KEYS = frozenset({"class", "module", "attrs", "training", "params", "buffers", "children"})
_PARAM_KEYS = frozenset({"shape", "dtype", "requires_grad"})
_BUFFER_KEYS = frozenset({"shape", "dtype", "persistent"})
_OBJECT_KEYS = frozenset({"class", "module", "attrs"})
_TOP_KEYS = frozenset({"format", "version", "root", "objects", "metadata"})
_MAX_DIMS = 64
_INT64 = 2**63
_SAFETENSORS_HEADER_MAX = 100_000_000
try:
    from safetensors.torch import _TYPES as _SAFETENSORS_DTYPES
except ImportError:  # pragma: no cover - older safetensors
    _SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _shorten(text: str, limit: int = 400) -> str:
    """One line of at most ``limit`` characters (values in messages come from the file)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _one_line(err: BaseException) -> str:
    return _shorten(str(err), 300)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json object_pairs_hook: a duplicated key is an error, not "the last one wins"."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {duplicate!r}")
    return out


def _parse_json(text: bytes, file: Path, what: str) -> Any:
    try:
        return json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys)
    except RecursionError:
        raise CheckpointError(f"{file}: {what} is nested too deeply to parse; not a file torchdam.save "
                              "wrote") from None
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError, huge integers, duplicates
        raise CheckpointError(f"{file}: unreadable or corrupted ({_one_line(err)}); save the model again") from None


def _read_arch(directory: Path) -> dict:
    file = directory / ARCH_FILE
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no saved model directory there; pass the directory save() wrote")
    data = read_regular_file(file, "the model's architecture", MAX_ARCH_BYTES,
                             missing=f"{file}: missing; is {directory} a directory written by torchdam.save?")
    arch = _parse_json(data, file, "the architecture")
    if not isinstance(arch, dict) or arch.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a torchdam architecture file (format is not {FORMAT!r})")
    version = arch.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise CheckpointError(f"{file}: format version {version!r} is not supported "
                              f"(this torchdam reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    unknown = sorted(set(arch) - _TOP_KEYS)
    if unknown or "root" not in arch:
        raise CheckpointError(f"{file}: malformed architecture ({'unknown keys ' + str(unknown) if unknown else 'no root'}); "
                              "save the model again")
    return arch


def load_metadata(path: str | Path) -> dict:
    """The ``metadata`` dict passed to :func:`save`, without loading any weights."""
    directory = Path(path)
    metadata = _read_arch(directory).get("metadata", {})
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{directory / ARCH_FILE}: 'metadata' is not a dict")
    return metadata


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
        if not isinstance(objects, list) or len(objects) > MAX_OBJECTS:
            raise self.error("the objects table", f"is not a list of at most {MAX_OBJECTS} (MAX_OBJECTS) entries")
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
            if not key or len(key) > MAX_NAME_LENGTH:
                raise self.error(where, f"has an attribute with an invalid name {key[:50]!r}")
            self._value(value, 0, f"{where}, attribute {key!r},")

    def _class_names(self, node: dict, where: str) -> None:
        for key in ("class", "module"):
            if not (isinstance(node[key], str) and 0 < len(node[key]) <= MAX_NAME_LENGTH):
                raise self.error(where, f"has an invalid {key} name")

    def _node(self, node: Any, path: str, depth: int) -> None:
        where = _where(path)
        if depth > MAX_DEPTH:
            raise self.error(where, f"is nested more than {MAX_DEPTH} modules deep (MAX_DEPTH)")
        if len(self.modules) >= MAX_MODULES:
            raise self.error(where, f"is beyond {MAX_MODULES} modules (MAX_MODULES)")
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
            if not key or len(key) > MAX_NAME_LENGTH:
                raise self.error(where, f"has an attribute with an invalid name {key[:50]!r}")
            self._value(value, 0, f"{where}, attribute {key!r},")
        for name in names[len(node["attrs"]):]:
            if not name or len(name) > MAX_NAME_LENGTH or "." in name:
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
        if depth > MAX_VALUE_DEPTH:
            raise self.error(where, f"nests more than {MAX_VALUE_DEPTH} levels (MAX_VALUE_DEPTH)")
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
            ok, items = isinstance(inner, str) and len(inner) <= MAX_NAME_LENGTH, ()
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
            if visits > MAX_MODULES or depth > MAX_DEPTH:
                raise self.error(_where(prefix), f"expands, through shared modules, beyond {MAX_MODULES} modules "
                                                 f"or {MAX_DEPTH} levels")
            node = self.modules[first]
            for name, spec in node["params"].items():
                if spec is not None:
                    keys[_join(prefix, name)] = self.tensors[spec["ref"] if "ref" in spec else _join(first, name)]
            for name, spec in node["buffers"].items():
                declared = self.tensors.get(_join(first, name))
                if declared is not None and (declared.flag or prefix == first):
                    keys[_join(prefix, name)] = declared
            if len(keys) > limit:
                raise self.error(_where(prefix), f"declares more tensors than {WEIGHTS_FILE} holds")
            for name, child in node["children"].items():
                if child is not None:
                    walk(child["ref"] if "ref" in child else _join(first, name), _join(prefix, name), depth + 1)

        walk("", "", 0)
        return keys


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
        if not HF_OBJECT_CLASSES.fullmatch(module_name):
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
                                  f"(the limit is their number, at least MIN_INT_LIMIT={MIN_INT_LIMIT})")
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


@dataclass(frozen=True)
class _Entry:
    """One tensor of a safetensors header, with its data's place in the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    numel: int


def _read_weights(file: Path) -> tuple[bytes, dict[str, _Entry]]:
    """The weights file's bytes and its header, checked entry by entry (dtype, shape, data
    offsets that tile the data exactly), before any tensor is made from it."""
    data = read_regular_file(file, "the model's weights", MAX_WEIGHTS_BYTES,
                             missing=f"{file}: missing; the directory holds no saved weights")

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{file}: not a readable safetensors file ({why}); "
                               "it may be truncated or not written by torchdam.save")

    if len(data) < 8:
        raise bad("shorter than the 8-byte header length")
    size = int.from_bytes(data[:8], "little")
    if size > min(_SAFETENSORS_HEADER_MAX, len(data) - 8):
        raise bad(f"a header of {size} bytes does not fit")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"), object_pairs_hook=_unique_keys)
    except (RecursionError, UnicodeDecodeError, ValueError) as err:
        raise bad(f"header: {_one_line(err)}") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    room, base = len(data) - 8 - size, 8 + size
    entries: dict[str, _Entry] = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise bad("__metadata__ is not a dict of strings")
            continue
        if not (isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"}):
            raise bad(f"entry {name[:80]!r} is malformed")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        dtype = _SAFETENSORS_DTYPES.get(dtype) if isinstance(dtype, str) else None
        if dtype is None or not (isinstance(shape, list) and len(shape) <= _MAX_DIMS
                                 and all(type(d) is int and 0 <= d < _INT64 for d in shape)):
            raise bad(f"entry {name[:80]!r} has an unknown dtype or an invalid shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= room):
            raise bad(f"entry {name[:80]!r} has data offsets outside the file")
        numel = math.prod(shape)
        if offsets[1] - offsets[0] != numel * dtype.itemsize:
            raise bad(f"entry {name[:80]!r} holds {offsets[1] - offsets[0]} bytes, not the "
                      f"{numel * dtype.itemsize} its shape and dtype need")
        entries[name] = _Entry(dtype, tuple(shape), base + offsets[0], numel)
        spans.append(tuple(offsets))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise bad("tensor data overlaps or leaves gaps")
        position = end
    if position != room:
        raise bad("bytes follow the last tensor")
    return data, entries


def _tensors(data: bytes, entries: dict[str, _Entry]) -> dict[str, torch.Tensor]:
    """Read-only views of the checked entries' data (load only copies from them)."""
    if sys.byteorder != "little":  # pragma: no cover - safetensors stores little-endian
        return safetensors_load(data)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given buffer is not writable"
        for name, e in entries.items():
            t = (torch.frombuffer(data, dtype=e.dtype, count=e.numel, offset=e.start) if e.numel
                 else torch.empty(0, dtype=e.dtype))
            out[name] = t.reshape(e.shape)
    return out


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
        >>> d = save(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten()), tempfile.mkdtemp())
        >>> load(d)(torch.zeros(1, 1, 4, 4)).shape
        torch.Size([1, 32])
    """
    directory = Path(path)
    arch = _read_arch(directory)
    arch_file, weights_file = directory / ARCH_FILE, directory / WEIGHTS_FILE
    plan = _Plan(arch, arch_file)
    loader = _Loader(plan, tuple(trusted_modules))
    loader.resolve()
    data, entries = _read_weights(weights_file)
    expected = plan.state_keys(len(entries))
    missing, unexpected = sorted(set(expected) - set(entries)), sorted(set(entries) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights_file}: does not match {ARCH_FILE} (missing keys {missing[:5]}, "
                              f"unexpected keys {unexpected[:5]})")
    for key, spec in expected.items():
        entry = entries[key]
        if entry.shape != spec.shape or entry.dtype != spec.dtype:
            raise CheckpointError(f"{weights_file}: does not match {ARCH_FILE} ({key!r} is a {list(entry.shape)} "
                                  f"{_dtype_name(entry.dtype)} tensor there, {list(spec.shape)} "
                                  f"{_dtype_name(spec.dtype)} in {ARCH_FILE})")
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
        raise CheckpointError(f"{weights_file}: does not match {ARCH_FILE} ({_one_line(err)})") from None
    finally:
        del tensors
    loader.check_values()
    return model
