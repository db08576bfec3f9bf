"""Per-type rules: a module type's derived state, and the checks that its size attributes
agree with its tensors, so neither load nor the first forward allocates beyond the weights."""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchdam.serialize.registry import _qualified


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


#: PyTorch Geometric's MessagePassing hook tables (empty unless a user registers hooks)
_PYG_HOOKS = frozenset(f"_{step}_forward{pre}_hooks" for step in (
    "propagate", "message", "aggregate", "message_and_aggregate", "edge_update") for pre in ("", "_pre"))


def _check_message_passing(m: nn.Module, elements: int) -> None:
    hooked = sorted(k for k in _PYG_HOOKS if m.__dict__.get(k))
    if hooked:
        raise ValueError(f"it has message-passing hooks ({', '.join(hooked)}): functions, which are not saved")


def _rebuild_message_passing(m: nn.Module) -> None:
    # PyTorch Geometric's MessagePassing keeps an Inspector (its methods' signatures, an
    # object) and compiles its ``propagate`` from it in ``__init__``; as its own
    # ``__setstate__`` does after unpickling, it is built again here, from the class.
    from collections import OrderedDict

    from torch_geometric.inspector import Inspector

    for key in _PYG_HOOKS:
        setattr(m, key, OrderedDict())

    m.inspector = Inspector(type(m))
    m.inspector.inspect_signature(m.message)
    m.inspector.inspect_signature(m.aggregate, exclude=[0, "aggr"])
    m.inspector.inspect_signature(m.message_and_aggregate, [0])
    m.inspector.inspect_signature(m.update, exclude=[0])
    m.inspector.inspect_signature(m.edge_update)
    m._set_jittable_templates()


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
    "torch_geometric.nn.conv.message_passing.MessagePassing": Rule(
        frozenset({"inspector"}) | _PYG_HOOKS, _rebuild_message_passing, _check_message_passing),
}
_NO_RULE = Rule()


def _rule(cls: type) -> Rule:
    for base in cls.__mro__:
        for key in (base, _qualified(base)):
            if key in RULES:
                return RULES[key]
    return _NO_RULE
