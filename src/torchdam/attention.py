"""Transformers as DAM hosts: attention heads, FFN hidden units and Hugging Face ``Conv1D``.

What :func:`torchdam.attach` gates in a transformer by default (``heads=True``):

* **Attention heads.** Every module whose type is in :data:`ATTENTION` (``nn.MultiheadAttention``;
  Hugging Face BERT ``BertAttention``, ViT ``ViTAttention``, GPT-2 ``GPT2Attention``, Llama
  ``LlamaAttention``), and every Hugging Face attention of the standard structure
  (:func:`standard_hf_heads`), gets one gate whose units are its heads. Under grouped-query attention
  (fewer key/value heads than query heads) a unit is one key/value head together with the
  query heads that read it, so a unit can be removed whole. The gate scales each head's
  output, i.e. that head's columns of the output projection's input, so a dead head
  contributes exactly nothing. The module's q/k/v/output projections are never gated as
  layers. ``widths(model)`` reports ``{attention module: (live heads, heads)}``.
* **FFN hidden units.** The first layer of each MLP is an ordinary ``nn.Linear`` (or HF
  ``Conv1D``, which a ``nn.Linear`` selector also selects) and is gated like any layer, on
  its output (before the activation: GELU/ReLU/SiLU of 0 is 0, so dead units stay dead).
  Llama's gated MLP ``down(act(gate(x)) * up(x))``: ``up_proj`` is gated, so ``gate_proj``
  and ``up_proj`` share its units and ``down_proj``'s inputs follow them.
* **Not gated by type** (:data:`NOT_GATED`): layers that write the residual stream (FFN output
  projections, ViT's patch embedding) or share another layer's units (Llama's
  ``gate_proj``), and in any HF family ``gate_proj``/``down_proj`` of a gated MLP and the
  second layer of a two-layer FFN (:data:`HF_GATED_MLP`, :data:`HF_PLAIN_MLPS`). Name them in
  ``layers`` to gate them anyway.

Fused kernels that read weights directly would skip gates: ``nn.MultiheadAttention`` gets a
forward that applies its gate (the module's general path, with the gated output
projection), and an ``nn.TransformerEncoderLayer`` holding a gate gets a no-op forward
pre-hook (:class:`KeepGatesInEval`), which is what its own fast-path check looks for
("forward pre-/hooks are attached to the module"), so in eval it runs its general path
and the gates act; its ``nn.TransformerEncoder`` stops converting to nested tensors.
:func:`torchdam.detach` removes both.

Compaction (:func:`take_head_gates`, :func:`remove_heads`, called by
:func:`torchdam.compact`): a head gate is folded into the output projection's input columns,
then the dead units' q/k/v rows and output-projection columns are removed together with
Torch-Pruning's own Linear pruning function (and :class:`Conv1DPruner`), and the module's
head counts are updated. Head removal is local to the attention module (its input and
output widths do not change), so no dependency graph is needed for it. An
``nn.MultiheadAttention`` cannot hold fewer heads of the same size at the same model width
(``embed_dim == num_heads * head_dim``), so one that lost heads is replaced by
:class:`PrunedMultiheadAttention`, which has the same call signature and outputs.
"""
from __future__ import annotations

import copy
import functools
import inspect
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from torchdam import lora, pyg
from torchdam.attach import (
    GATE_ATTR, GatedForward, GateHook, Site, _gate_values, register_library_linear,
)
from torchdam.errors import UnsupportedLayerError

# ------------------------------------------------------------------ Hugging Face classes
# Never imported here: a model holding an HF module has already imported its file, so the
# classes are looked up in sys.modules (torchdam works without transformers installed).


def _hf(module: str, name: str) -> type | None:
    loaded = sys.modules.get(f"transformers.{module}")
    return getattr(loaded, name, None) if loaded is not None else None


def conv1d_type() -> type | None:
    return _hf("pytorch_utils", "Conv1D")


def _gated_conv1d(layer: nn.Module, gate: nn.Module, x: Tensor) -> Tensor:
    """HF ``Conv1D`` (``y = x @ W + b``, ``W`` of shape ``(nx, nf)``) with its output gated."""
    g = _gate_values(gate, layer.weight.dtype)
    out = torch.addmm(layer.bias * g, x.reshape(-1, x.size(-1)), layer.weight * g)
    return out.view(*x.shape[:-1], layer.nf)


def _fold_conv1d(layer: nn.Module, g: Tensor) -> None:
    layer.weight.mul_(g)  # (nx, nf): output units are columns
    layer.bias.mul_(g)


class Conv1DPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning rule for HF ``Conv1D`` (a Linear with its weight transposed):
    output units are the weight's columns, inputs its rows."""

    TARGET_MODULES = None

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        keep = sorted(set(range(layer.nf)) - set(idxs))
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
        layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        layer.nf = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs) -> nn.Module:
        keep = sorted(set(range(layer.weight.shape[0])) - set(idxs))
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        layer.nx = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.nf

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[0]


def register_hf_layers() -> None:
    """Teach attach/compact HF ``Conv1D`` (units = ``nf``, gated and folded on the weight's
    columns) once transformers has been imported; a no-op otherwise or when done."""
    conv1d = conv1d_type()
    if conv1d is not None:
        register_library_linear(conv1d, "nf", _fold_conv1d, Conv1DPruner(), forward=_gated_conv1d)


def register_library_layers() -> None:
    """Teach attach, compact and budgets the layers of the libraries a model is built with:
    Transformers' ``Conv1D``, PyTorch Geometric (:mod:`torchdam.pyg`), peft's LoRA
    (:mod:`torchdam.lora`), diffusers (:mod:`torchdam.diffusion`); each a no-op unless the
    library's files are loaded."""
    from torchdam import diffusion  # it builds on this module

    register_hf_layers()
    pyg.register_pyg_layers()
    lora.register_lora_layers()
    diffusion.register_diffusers_layers()


# ------------------------------------------------------------------ layer surgery helpers

def _sub(module: nn.Module, path: str) -> nn.Module:
    return module.get_submodule(path) if path else module


def _owner(module: nn.Module, path: str):
    """The object holding the attribute at dotted ``path`` (a submodule, or a config)."""
    owner = module
    for name in path.split(".")[:-1]:
        owner = getattr(owner, name)
    return owner


def _get(module: nn.Module, path: str):
    return getattr(_owner(module, path), path.rpartition(".")[2])


def _linear_at(module: nn.Module, path: str, exact: bool = True) -> nn.Linear | None:
    """The ``nn.Linear`` at ``path`` under ``module`` (``exact``: not a subclass, which may
    compute differently), or None."""
    try:
        found = module.get_submodule(path)
    except AttributeError:
        return None
    linear = type(found) is nn.Linear or not exact and isinstance(found, nn.Linear) or lora.is_lora(found)
    return found if linear else None


def _set(module: nn.Module, path: str, value) -> None:
    setattr(_owner(module, path), path.rpartition(".")[2], value)


def _out_width(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) or lora.is_lora(layer) else layer.nf


def _in_width(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) or lora.is_lora(layer) else layer.weight.shape[0]


def _pruner(layer: nn.Module) -> tp.pruner.function.BasePruningFunc:
    if isinstance(layer, nn.Linear):
        return tp.pruner.function.LinearPruner()
    if lora.is_lora(layer):
        return lora.LoraPruner()
    conv1d = conv1d_type()
    if conv1d is not None and isinstance(layer, conv1d):
        return Conv1DPruner()
    raise UnsupportedLayerError(f"cannot remove heads from a projection of type {type(layer).__name__}")


def _remove_outputs(layer: nn.Module, idxs: list[int]) -> None:
    if idxs:
        _pruner(layer).prune_out_channels(layer, idxs)


def _remove_inputs(layer: nn.Module, idxs: list[int]) -> None:
    if idxs:
        _pruner(layer).prune_in_channels(layer, idxs)


def _scale_inputs(layer: nn.Module, g: Tensor) -> None:
    """Multiply ``layer``'s input channels by ``g`` (fold a gate that acted on its input)."""
    if lora.is_lora(layer):
        lora.scale_inputs(layer, g)
    elif isinstance(layer, nn.Linear):
        layer.weight.mul_(g.to(layer.weight.dtype))
    else:  # Conv1D: inputs are the weight's rows
        layer.weight.mul_(g.to(layer.weight.dtype).unsqueeze(1))


def _channels(units: list[int], width: int, offset: int = 0) -> list[int]:
    return [offset + u * width + i for u in units for i in range(width)]


# ------------------------------------------------------------------ head layouts

@dataclass(frozen=True)
class HeadCut:
    """One side of one projection that loses channels with every removed unit: ``per_unit``
    channels of its ``side`` (``"out"``: q/k/v rows, ``"in"``: the output projection's
    columns) in each of ``parts`` equal blocks (GPT-2's packed ``[q | k | v]``); unit ``u``
    owns channels ``u * per_unit`` to ``(u + 1) * per_unit - 1`` of every block.

    The one description of what a head gate shrinks: :meth:`Heads.remove` removes these
    channels and :class:`torchdam.budget.WidthModel` prices them."""

    layer: nn.Module
    side: str
    per_unit: int
    parts: int = 1
    #: where the units' channels start on the side: a section of a packed layer whose
    #: sections differ in width (Phi-3's ``[q | k | v]`` under grouped-query attention)
    start: int = 0

    @property
    def total(self) -> int:
        """The side's width with every unit live."""
        return _out_width(self.layer) if self.side == "out" else _in_width(self.layer)

    def channels(self, units: list[int]) -> list[int]:
        """The side's channels that belong to ``units``."""
        block = self.total // self.parts
        return [p * block + c for p in range(self.parts) for c in _channels(units, self.per_unit, self.start)]


class Heads:
    """How one attention family lays out its heads. :meth:`layout` gives ``(units, query
    heads per unit, head_dim)``; a unit's channels at the output projection's input are
    ``units_per * head_dim`` consecutive ones (heads are concatenated head-major).

    Removing a unit takes its channels from the projections :meth:`cuts` lists, and the
    parameters :meth:`per_unit_parameters` lists; what the module computes itself, outside
    its child layers (the attention scores and their product with the values), is per unit
    too. The module's input and output widths (the model's hidden size) never change."""

    #: whether the units are an attention module's heads (``attach(heads=False)`` skips them)
    heads = True

    def layout(self, m: nn.Module) -> tuple[int, int, int]:
        raise NotImplementedError

    def out_projection(self, m: nn.Module) -> nn.Module | None:
        """The layer whose input is the concatenated heads (its gate hook goes there);
        None when the module applies its gate itself (``nn.MultiheadAttention``)."""
        raise NotImplementedError

    def projections(self, m: nn.Module) -> list[nn.Module]:
        """The layers attach never gates on their own (their units are heads)."""
        raise NotImplementedError

    def cuts(self, m: nn.Module) -> list[HeadCut]:
        """The projection sides whose channels go with each removed unit."""
        raise NotImplementedError

    def per_unit_parameters(self, m: nn.Module) -> list[Tensor]:
        """Parameters the module holds itself (not in a child layer) that are made of whole
        units and shrink with them (``nn.MultiheadAttention``'s packed in-projection)."""
        return []

    def refusal(self, m: nn.Module) -> str | None:
        """Why this module's heads cannot be removed (None: they can)."""
        return None

    def fold(self, m: nn.Module, g: Tensor) -> None:
        """Scale each unit's channels at the output projection's input by its gate value."""
        _, per, d = self.layout(m)
        _scale_inputs(self.out_projection(m), g.repeat_interleave(per * d))

    def remove(self, m: nn.Module, keep: list[int]) -> nn.Module | None:
        """Remove every unit not in ``keep``; returns a replacement module, or None if
        ``m`` was changed in place."""
        raise NotImplementedError

    def _remove_cuts(self, m: nn.Module, keep: list[int]) -> None:
        """Remove the channels of every unit not in ``keep`` from each of :meth:`cuts`."""
        units, _, _ = self.layout(m)
        dead = [u for u in range(units) if u not in set(keep)]
        gone: dict[tuple[int, str], tuple[nn.Module, set[int]]] = {}
        for cut in self.cuts(m):  # all of a side's channels at once: sections of one layer shift
            gone.setdefault((id(cut.layer), cut.side), (cut.layer, set()))[1].update(cut.channels(dead))
        for (_, side), (layer, channels) in gone.items():
            (_remove_outputs if side == "out" else _remove_inputs)(layer, sorted(channels))


@dataclass
class SplitHeads(Heads):
    """Separate q/k/v/output projections (``nn.Linear``), heads concatenated head-major:
    BERT, ViT, Llama (and most HF families). Paths are relative to the attention module;
    ``counts`` maps attribute paths to ``fn(query heads, kv heads, head_dim)``, set after
    removal."""

    q: str
    k: str
    v: str
    o: str
    head_dim: str
    counts: dict[str, Callable[[int, int, int], int]] = field(default_factory=dict)
    #: parameters holding one value per query head on their last axis (attention sinks, a
    #: relative position bias table), cut with the heads
    per_head: tuple[str, ...] = ()

    def per_unit_parameters(self, m: nn.Module) -> list[Tensor]:
        return [_get(m, p) for p in self.per_head]

    def layout(self, m: nn.Module) -> tuple[int, int, int]:
        d = int(_get(m, self.head_dim))
        heads = _out_width(_sub(m, self.q)) // d
        kv = _out_width(_sub(m, self.k)) // d
        return kv, heads // kv, d

    def out_projection(self, m: nn.Module) -> nn.Module:
        return _sub(m, self.o)

    def projections(self, m: nn.Module) -> list[nn.Module]:
        return [_sub(m, p) for p in (self.q, self.k, self.v, self.o)]

    def cuts(self, m: nn.Module) -> list[HeadCut]:
        _, per, d = self.layout(m)
        return [HeadCut(_sub(m, self.q), "out", per * d), HeadCut(_sub(m, self.k), "out", d),
                HeadCut(_sub(m, self.v), "out", d), HeadCut(_sub(m, self.o), "in", per * d)]

    def remove(self, m: nn.Module, keep: list[int]) -> None:
        _, per, d = self.layout(m)
        self._remove_cuts(m, keep)
        heads = torch.tensor(_channels(keep, per), dtype=torch.long)
        for path in self.per_head:  # one value per head along the last axis
            old = _get(m, path)
            kept = old.detach()[..., heads.to(old.device)].clone()
            _set(m, path, nn.Parameter(kept, requires_grad=old.requires_grad))
        for path, fn in self.counts.items():
            _set(m, path, fn(len(keep) * per, len(keep), d))
        return None


@dataclass
class _PackedQKV(Heads):
    """q, k and v in one ``nn.Linear`` (``qkv``), heads concatenated at ``o``'s input."""

    qkv: str
    o: str
    head_dim: str

    def out_projection(self, m: nn.Module) -> nn.Module:
        return _sub(m, self.o)

    def projections(self, m: nn.Module) -> list[nn.Module]:
        return [_sub(m, self.qkv), _sub(m, self.o)]


@dataclass
class InterleavedHeads(_PackedQKV):
    """q, k, v packed in one ``nn.Linear`` head by head (``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]``,
    each ``head_dim`` wide), heads concatenated at the output projection: GPT-NeoX (Pythia).
    The forward must split heads from the width (``(*input_shape, -1, 3 * head_dim)``)."""

    def layout(self, m: nn.Module) -> tuple[int, int, int]:
        d = int(_get(m, self.head_dim))
        return _out_width(_sub(m, self.qkv)) // (3 * d), 1, d

    def cuts(self, m: nn.Module) -> list[HeadCut]:
        _, _, d = self.layout(m)
        return [HeadCut(_sub(m, self.qkv), "out", 3 * d), HeadCut(_sub(m, self.o), "in", d)]

    def remove(self, m: nn.Module, keep: list[int]) -> None:
        self._remove_cuts(m, keep)


@dataclass
class PackedHeads(_PackedQKV):
    """q, k, v packed in one ``nn.Linear`` as ``[q | k | v]``: every query head, then the kv
    heads' keys, then their values (grouped-query attention: fewer kv heads than query
    heads); heads concatenated at the output projection: Phi-3. ``counts`` as in
    :class:`SplitHeads`; a path under ``config.`` is set on a copy of the module's config
    (Phi-3 reads its query width from it, and the config is shared by every layer)."""

    counts: dict[str, Callable[[int, int, int], int]] = field(default_factory=dict)

    def layout(self, m: nn.Module) -> tuple[int, int, int]:
        d = int(_get(m, self.head_dim))
        heads = _in_width(_sub(m, self.o)) // d
        kv = (_out_width(_sub(m, self.qkv)) // d - heads) // 2
        return kv, heads // kv, d

    def cuts(self, m: nn.Module) -> list[HeadCut]:
        kv, per, d = self.layout(m)
        qkv, q = _sub(m, self.qkv), kv * per * d
        return [HeadCut(qkv, "out", per * d), HeadCut(qkv, "out", d, start=q),
                HeadCut(qkv, "out", d, start=q + kv * d), HeadCut(_sub(m, self.o), "in", per * d)]

    def remove(self, m: nn.Module, keep: list[int]) -> None:
        _, per, d = self.layout(m)
        self._remove_cuts(m, keep)
        if any(path.startswith("config.") for path in self.counts):
            m.config = copy.copy(m.config)
        for path, fn in self.counts.items():
            _set(m, path, fn(len(keep) * per, len(keep), d))
        return None


@dataclass
class PairedUnits(Heads):
    """An MLP whose first layer packs two halves that are multiplied together,
    ``down(act(gate) * up)`` with ``gate, up = first(x).chunk(2, -1)`` (Phi-3's
    ``gate_up_proj``): its units are the hidden channels, each one channel of both halves
    and one input of ``down``. Laid out as heads of one channel, so the gate sits at
    ``down``'s input (a gate over the packed layer's ``2n`` outputs would kill its gate rows
    before any up row, so pairs would die in an order no width model prices). Not an
    attention module; gated whatever ``attach(heads=...)`` says."""

    first: str
    down: str
    heads = False  # a unit gate, not a head gate

    def layout(self, m: nn.Module) -> tuple[int, int, int]:
        return _in_width(_sub(m, self.down)), 1, 1

    def out_projection(self, m: nn.Module) -> nn.Module:
        return _sub(m, self.down)

    def projections(self, m: nn.Module) -> list[nn.Module]:
        return [_sub(m, self.first), _sub(m, self.down)]

    def cuts(self, m: nn.Module) -> list[HeadCut]:
        return [HeadCut(_sub(m, self.first), "out", 1, parts=2), HeadCut(_sub(m, self.down), "in", 1)]

    def refusal(self, m: nn.Module) -> str | None:
        if _out_width(_sub(m, self.first)) != 2 * _in_width(_sub(m, self.down)):
            return f"its {self.first!r} is not twice as wide as {self.down!r}'s input"
        return None

    def remove(self, m: nn.Module, keep: list[int]) -> None:
        self._remove_cuts(m, keep)
        return None


class GPT2Heads(Heads):
    """GPT-2: q, k, v packed in one ``Conv1D`` ``c_attn`` (``[q | k | v]``, each
    ``split_size`` wide; cross-attention: ``q_attn`` and ``c_attn = [k | v]``), output ``c_proj``.
    Sets ``num_heads`` and ``split_size``; ``embed_dim`` stays the model width."""

    def layout(self, m: nn.Module) -> tuple[int, int, int]:
        return int(m.num_heads), 1, int(m.head_dim)

    def out_projection(self, m: nn.Module) -> nn.Module:
        return m.c_proj

    def projections(self, m: nn.Module) -> list[nn.Module]:
        return [m.c_attn, m.c_proj] + ([m.q_attn] if hasattr(m, "q_attn") else [])

    def cuts(self, m: nn.Module) -> list[HeadCut]:
        d = int(m.head_dim)
        if getattr(m, "is_cross_attention", False):
            return [HeadCut(m.c_attn, "out", d, 2), HeadCut(m.q_attn, "out", d), HeadCut(m.c_proj, "in", d)]
        return [HeadCut(m.c_attn, "out", d, 3), HeadCut(m.c_proj, "in", d)]

    def remove(self, m: nn.Module, keep: list[int]) -> None:
        _, _, d = self.layout(m)
        self._remove_cuts(m, keep)
        m.num_heads = len(keep)
        m.split_size = len(keep) * d
        return None


class MHAHeads(Heads):
    """``nn.MultiheadAttention``: heads of ``head_dim`` channels in ``in_proj_weight`` (or
    ``q/k/v_proj_weight``) and ``out_proj``'s input."""

    def layout(self, m: nn.Module) -> tuple[int, int, int]:
        return int(m.num_heads), 1, int(m.head_dim)

    def out_projection(self, m: nn.Module) -> None:
        return None

    def projections(self, m: nn.Module) -> list[nn.Module]:
        return [m.out_proj]

    def cuts(self, m: nn.Module) -> list[HeadCut]:
        return [HeadCut(m.out_proj, "in", int(m.head_dim))]

    def per_unit_parameters(self, m: nn.Module) -> list[Tensor]:
        """The in-projection (packed ``in_proj_weight``, or ``q/k/v_proj_weight``) and its bias:
        ``head_dim`` rows per head of each of q, k and v (:class:`PrunedMultiheadAttention`
        keeps the live heads' rows)."""
        return [p for p in (m.in_proj_weight, m.q_proj_weight, m.k_proj_weight, m.v_proj_weight, m.in_proj_bias)
                if p is not None]

    def refusal(self, m: nn.Module) -> str | None:
        if m.bias_k is not None or m.add_zero_attn:
            return "it has add_bias_kv or add_zero_attn"
        return None

    def fold(self, m: nn.Module, g: Tensor) -> None:
        _scale_inputs(m.out_proj, g.repeat_interleave(m.head_dim))

    def remove(self, m: nn.Module, keep: list[int]) -> nn.Module | None:
        if len(keep) == m.num_heads:
            return None
        reason = self.refusal(m)
        if reason is not None:
            raise UnsupportedLayerError(f"cannot remove heads of an nn.MultiheadAttention: {reason}")
        return PrunedMultiheadAttention(m, keep)


MHA_HEADS = MHAHeads()


def _heads(h: int, kv: int, d: int) -> int:
    return h


def _kv_heads(h: int, kv: int, d: int) -> int:
    return kv


def _head_width(h: int, kv: int, d: int) -> int:
    return h * d


#: Hugging Face attention classes with their head layout: (module under ``transformers.``,
#: class name, layout). Exact types only (a subclass may compute differently).
HF_ATTENTION: list[tuple[str, str, Heads]] = [
    ("models.bert.modeling_bert", "BertAttention", SplitHeads(
        "self.query", "self.key", "self.value", "output.dense", "self.attention_head_size",
        {"self.num_attention_heads": _heads, "self.all_head_size": _head_width})),
    ("models.vit.modeling_vit", "ViTAttention", SplitHeads(
        "q_proj", "k_proj", "v_proj", "o_proj", "head_dim", {"num_attention_heads": _heads})),
    ("models.gpt2.modeling_gpt2", "GPT2Attention", GPT2Heads()),
    ("models.phi3.modeling_phi3", "Phi3Attention", PackedHeads(
        "qkv_proj", "o_proj", "head_dim", {"config.num_attention_heads": _heads, "num_key_value_heads": _kv_heads})),
    ("models.phi3.modeling_phi3", "Phi3MLP", PairedUnits("gate_up_proj", "down_proj")),
    ("models.llama.modeling_llama", "LlamaAttention", SplitHeads(
        "q_proj", "k_proj", "v_proj", "o_proj", "head_dim",
        {"num_heads": _heads, "num_key_value_heads": _kv_heads})),
]

#: Attention module type -> head layout; :func:`attention_types` adds the HF classes of
#: :data:`HF_ATTENTION` whose files are loaded. Add a type with :func:`register_attention`.
ATTENTION: dict[type, Heads] = {nn.MultiheadAttention: MHA_HEADS}

#: (module under ``transformers.`` or None for torch, class name or class, children) that
#: a type selector does not gate: residual-stream writers and layers sharing another's units.
NOT_GATED: list[tuple[str | None, str | type, tuple[str, ...]]] = [
    (None, nn.TransformerEncoderLayer, ("linear2",)),
    (None, nn.TransformerDecoderLayer, ("linear2",)),
    ("models.bert.modeling_bert", "BertOutput", ("dense",)),
    ("models.vit.modeling_vit", "ViTMLP", ("fc2",)),
    ("models.vit.modeling_vit", "ViTPatchEmbeddings", ("projection",)),
    ("models.gpt2.modeling_gpt2", "GPT2MLP", ("c_proj",)),
    ("models.llama.modeling_llama", "LlamaMLP", ("gate_proj", "down_proj")),
]


#: (module under ``transformers.``, class name, gated child, children whose outputs are
#: multiplied with it): the gated child's units are theirs too (compact removes them from all).
SHARED_UNITS: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("models.llama.modeling_llama", "LlamaMLP", "up_proj", ("gate_proj",)),
]


#: Children of Hugging Face modules recognised by their names alone (any family):
#: ``down(act(gate_proj(x)) * up_proj(x))`` (Llama's MLP, copied by most decoder LMs), and the
#: second layer of a two-layer FFN, whose output is the residual stream.
HF_GATED_MLP = ("gate_proj", "up_proj", "down_proj")
HF_PLAIN_MLPS: tuple[tuple[str, str], ...] = (
    ("fc1", "fc2"),                                # BART, Whisper, CLIP, Phi, ViT, ...
    ("lin1", "lin2"),                              # DistilBERT
    ("intermediate.dense", "output.dense"),        # BERT's copies (RoBERTa, XLM-R, ELECTRA)
    ("dense_h_to_4h", "dense_4h_to_h"),            # GPT-NeoX, Falcon, Bloom
)


def _from_transformers(module: nn.Module) -> bool:
    """Whether ``module``'s class is Hugging Face model code (its structural rules apply)."""
    return type(module).__module__.startswith("transformers.models.")


def _linear_children(module: nn.Module, names: tuple[str, ...]) -> bool:
    return _from_transformers(module) and all(_linear_at(module, n, exact=False) is not None for n in names)


#: Hugging Face patch embeddings: (class-name ending, child) whose child writes the residual
#: stream, as ViT's ``projection`` does (:data:`NOT_GATED`): its width is the hidden size.
HF_PATCH_EMBEDDINGS = (("PatchEmbeddings", "projection"), ("VisionEmbeddings", "patch_embedding"))


def _standard_not_gated(module: nn.Module) -> tuple[str, ...]:
    if _from_transformers(module):
        name = type(module).__name__
        found = tuple(c for end, c in HF_PATCH_EMBEDDINGS
                      if name.endswith(end) and isinstance(getattr(module, c, None), nn.Module))
        if found:
            return found
    if _linear_children(module, HF_GATED_MLP):
        return ("gate_proj", "down_proj")
    return next(((second,) for first, second in HF_PLAIN_MLPS if _linear_children(module, (first, second))), ())


def shared_units(model: nn.Module) -> dict[int, frozenset[int]]:
    """``{id(gated layer): ids of the layers whose outputs multiply its own}`` (:data:`SHARED_UNITS`
    and any Hugging Face gated MLP, :data:`HF_GATED_MLP`)."""
    table = {}
    for module, name, child, partners in SHARED_UNITS:
        cls = _hf(module, name)
        if cls is not None:
            table[cls] = (child, partners)
    found: dict[int, frozenset[int]] = {}
    for module in model.modules():
        entry = table.get(type(module))
        if entry is None and _linear_children(module, HF_GATED_MLP):
            entry = ("up_proj", ("gate_proj",))
        if entry is not None:
            found[id(_sub(module, entry[0]))] = frozenset(id(_sub(module, p)) for p in entry[1])
    return found


def register_attention(cls: type, heads: Heads) -> None:
    """Gate the heads of attention modules of type ``cls`` (e.g. another HF family with
    ``SplitHeads("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")``)."""
    ATTENTION[cls] = heads


def attention_types() -> dict[type, Heads]:
    table = dict(ATTENTION)
    for module, name, heads in HF_ATTENTION:
        cls = _hf(module, name)
        if cls is not None:
            table.setdefault(cls, heads)
    return table


#: Child names of separate q/k/v/output projections in Hugging Face attention modules that
#: infer their head counts from the projections' widths (see :func:`standard_hf_heads`).
HF_PROJECTION_NAMES: tuple[tuple[str, str, str, str], ...] = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),    # Llama, Mistral, Qwen, Gemma, Mixtral, OLMo, ...
    ("q_proj", "k_proj", "v_proj", "out_proj"),  # BART, Whisper, CLIP, SigLIP, M2M100, ...
    ("q_proj", "k_proj", "v_proj", "dense"),     # Phi
    ("q_lin", "k_lin", "v_lin", "out_lin"),      # DistilBERT
)
#: BERT's copies (RoBERTa, XLM-R, ELECTRA, ...) and the older ViT's (DPT, MobileViT, ...):
#: q/k/v in a ``self`` / ``attention`` child, the output projection in an ``output`` child.
HF_NESTED_PROJECTIONS: tuple[tuple[str, str, str, str], ...] = (
    ("self.query", "self.key", "self.value", "output.dense"),
    ("attention.query", "attention.key", "attention.value", "output.dense"),
)
#: Head-count attributes a forward may split its projections by, updated on removal.
HF_HEAD_COUNT = ("num_heads", "num_attention_heads")
#: Attributes holding the head size, as the standard forward names them.
HF_HEAD_SIZE = ("head_dim", "attention_head_size")


@functools.cache
def _splits_heads_by_width(cls: type, head_size: str, count: str | None = None) -> bool:
    """Whether ``cls.forward`` reshapes its projections as ``(*input_shape, -1, <head_size>)``
    (e.g. ``self.head_dim``; Hugging Face's standard attention since v4.48): its head counts
    then follow the projections, so removing heads needs no other change. ``count``: or as
    ``(..., self.<count>, <head_size>)`` (OPT's ``num_heads``, the older ViT's
    ``num_attention_heads``), which works once that count is updated."""
    size = head_size if " " in head_size else f"self.{head_size}"
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    end = r"\s*(\)|$)"  # closes the shape: a call's argument list, or a tuple ending the line (DPT)
    return bool(re.search(rf", -1, {re.escape(size)}{end}", source, re.MULTILINE) or count is not None and
                re.search(rf", self\.{count}, {re.escape(size)}{end}", source, re.MULTILINE))


def _head_tensors(module: nn.Module, known: list, head_dim: int, heads: int | None = None) -> tuple[str, ...] | None:
    """The parameters of ``module`` holding one value per query head along their last axis
    (gpt-oss's attention sinks ``(heads,)``, Swin's relative position bias table
    ``(positions, heads)``), which shrink with the heads; None when it holds, outside
    ``known`` layers and its DAM gate, another floating tensor that is not per ``head_dim``
    (Qwen3's q/k norms): it may be per head in a way the shape does not show, and would not
    shrink with the heads. Integer buffers (a position index) are not per head. A last axis
    of ``heads`` when ``heads == head_dim`` is taken for per ``head_dim`` (the output check
    catches it if it was not)."""
    ours = [*known, getattr(module, GATE_ATTR, None)]
    owned = {id(t) for c in ours if isinstance(c, nn.Module) for t in [*c.parameters(), *c.buffers()]}
    found = []
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if id(t) in owned or tuple(t.shape) == (head_dim,) or not t.is_floating_point():
            continue
        per_head = t.dim() > 0 and t.shape[-1] == heads != head_dim and isinstance(t, nn.Parameter)
        if not per_head:
            return None
        found.append(name)
    return tuple(found)


def standard_hf_heads(module: nn.Module) -> Heads | None:
    """The head layout of a Hugging Face attention module not listed in :data:`HF_ATTENTION`
    whose heads can be removed without knowing its family: separate ``nn.Linear`` q/k/v/output
    projections (:data:`HF_PROJECTION_NAMES`, or BERT's copies, :data:`HF_NESTED_PROJECTIONS`),
    an integer head size (:data:`HF_HEAD_SIZE`), the standard forward
    (:func:`_splits_heads_by_width`) and, where the heads are computed, no tensor other than
    per-head-size ones (Qwen3's q/k norms; any other may be per head: Swin's position bias,
    attention sinks). Its head-count attributes, where it keeps them, are updated on removal.
    The families built on Llama's, BART's, CLIP's and BERT's attention; also GPT-NeoX's q/k/v
    packed head by head (:class:`InterleavedHeads`). None for anything else."""
    if not _from_transformers(module):
        return None
    qkv, o, size = (_linear_at(module, "query_key_value"), _linear_at(module, "dense"),
                    getattr(module, "head_size", None))
    if qkv is not None and o is not None and isinstance(size, int):  # GPT-NeoX's interleaved q/k/v
        fits = qkv.out_features % (3 * size) == 0 and o.in_features * 3 == qkv.out_features
        if fits and _splits_heads_by_width(type(module), "3 * self.head_size") and _head_tensors(
                module, [qkv, o], size) == ():
            return InterleavedHeads("query_key_value", "dense", "head_size")
        return None
    names = next((n for n in (*HF_PROJECTION_NAMES, *HF_NESTED_PROJECTIONS)
                  if all(_linear_at(module, p) is not None for p in n)), None)
    if names is None:
        return None
    nested = names in HF_NESTED_PROJECTIONS
    prefix = names[0].rpartition(".")[0] + "." if nested else ""
    inner = module.get_submodule(prefix[:-1]) if nested else module
    size = next((a for a in HF_HEAD_SIZE if isinstance(getattr(inner, a, None), int)), None)
    count = next((a for a in HF_HEAD_COUNT if isinstance(getattr(inner, a, None), int)), None)
    if size is None or not _splits_heads_by_width(type(inner), size, count):
        return None
    d = getattr(inner, size)
    q, k, v, o = (_linear_at(module, p) for p in names)
    heads, kv = q.out_features // d, k.out_features // d
    if (q.out_features % d or k.out_features % d or v.out_features != k.out_features or kv == 0
            or heads % kv or o.in_features != q.out_features):
        return None
    per_head = _head_tensors(inner, [q, k, v, o, getattr(module, GATE_ATTR, None)], d, heads)
    if per_head is None:
        return None
    counts = {prefix + a: fn for a, fn in (("num_heads", _heads), ("num_attention_heads", _heads),
                                           ("num_key_value_heads", _kv_heads), ("all_head_size", _head_width))
              if isinstance(getattr(inner, a, None), int)}
    return SplitHeads(*names, prefix + size, counts, tuple(prefix + t for t in per_head))


def heads_of(module: nn.Module) -> Heads | None:
    """The head layout of ``module`` if it is a recognised attention module: a registered
    type (:data:`ATTENTION`, :data:`HF_ATTENTION`) or a standard Hugging Face one (or a
    diffusers FeedForward with a gated activation, laid out as units)."""
    from torchdam import diffusion  # it builds on this module

    layout = attention_types().get(type(module))
    return layout if layout is not None else (standard_hf_heads(module) or diffusion.heads(module))


def _not_gated_types() -> dict[type, tuple[str, ...]]:
    table: dict[type, tuple[str, ...]] = {}
    for module, cls, children in NOT_GATED:
        if not isinstance(cls, type):
            cls = _hf(module, cls)
        if cls is not None:
            table[cls] = table.get(cls, ()) + children
    return table


def scan(model: nn.Module, heads: bool) -> tuple[dict[str, Site], set[str]]:
    """For :func:`torchdam.attach.plan`: the head sites (``{attention module: Site}``, only
    when ``heads``) and the names of layers a type selector must not match (attention
    projections and :data:`NOT_GATED` children)."""
    from torchdam import diffusion

    register_library_layers()
    not_gated = _not_gated_types()
    sites: dict[str, Site] = {}
    skip: set[str] = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        layout = heads_of(module)
        if layout is not None:
            owned = {id(p) for p in layout.projections(module)}
            skip.update(prefix + n for n, c in module.named_modules() if n and id(c) in owned)
            fixed = any(lora.refusal(p) for p in layout.projections(module))  # (DoRA: per-unit state)
            if (heads or not layout.heads) and name and not fixed:
                units, _, _ = layout.layout(module)
                sites[name] = Site(name, name, units, -2, "heads")  # heads, or PairedUnits' units
        for child in (not_gated.get(type(module), ()) or _standard_not_gated(module) or pyg.not_gated(module)
                      or lora.not_gated(module) or diffusion.not_gated(module)):
            skip.add(prefix + child)
    return sites, skip


# ------------------------------------------------------------------ applying head gates

class HeadGateHook(GateHook):
    """Forward pre-hook on an attention module's output projection: scales each unit's
    channels of its input (the concatenated heads) by the owner's gate."""

    def __init__(self, owner: nn.Module, units: int, width: int) -> None:
        self.owner, self.units, self.width = owner, units, width

    def __call__(self, _proj: nn.Module, args: tuple) -> tuple:
        x = args[0]
        gate = getattr(self.owner, GATE_ATTR)
        return (gate(x.unflatten(-1, (self.units, self.width))).flatten(-2), *args[1:])


def _canonical_masks(query: Tensor, key_padding_mask: Tensor | None,
                     attn_mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Both masks as ``nn.MultiheadAttention.forward`` normalises them (bool -> float in the
    query's dtype), so the gated and pruned forwards accept what it accepts."""
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask", target_type=query.dtype)
    attn_mask = F._canonical_mask(
        mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=query.dtype,
        check_other=False)
    return key_padding_mask, attn_mask


def _gated_mha(mha: nn.MultiheadAttention, gate: nn.Module, fused: bool, query: Tensor, key: Tensor,
               value: Tensor, key_padding_mask: Tensor | None = None, need_weights: bool = True,
               attn_mask: Tensor | None = None, average_attn_weights: bool = True,
               is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
    """``nn.MultiheadAttention.forward``'s general path with the heads gated. Its fused
    fast path reads ``out_proj.weight`` directly (it would skip the gate), so it is not used.
    ``fused``: the gate scales ``out_proj``'s weight columns; else the heads' outputs
    (computed with an identity output projection), for gates whose values vary per sample."""
    is_batched = query.dim() == 3
    key_padding_mask, attn_mask = _canonical_masks(query, key_padding_mask, attn_mask)
    if mha.batch_first and is_batched:
        query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    units, width = mha.num_heads, mha.head_dim
    weight, bias = mha.out_proj.weight, mha.out_proj.bias
    if fused:
        out_weight, out_bias = weight * _gate_values(gate, weight.dtype).repeat_interleave(width), bias
    else:
        out_weight, out_bias = torch.eye(mha.embed_dim, dtype=weight.dtype, device=weight.device), None
    out, weights = F.multi_head_attention_forward(
        query, key, value, mha.embed_dim, mha.num_heads, mha.in_proj_weight, mha.in_proj_bias,
        mha.bias_k, mha.bias_v, mha.add_zero_attn, mha.dropout, out_weight, out_bias,
        training=mha.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
        attn_mask=attn_mask, use_separate_proj_weight=not mha._qkv_same_embed_dim,
        q_proj_weight=mha.q_proj_weight, k_proj_weight=mha.k_proj_weight, v_proj_weight=mha.v_proj_weight,
        average_attn_weights=average_attn_weights, is_causal=is_causal)
    if not fused:
        out = F.linear(gate(out.unflatten(-1, (units, width))).flatten(-2), weight, bias)
    if mha.batch_first and is_batched:
        out = out.transpose(1, 0)
    return out, weights


class GatedAttentionForward(GatedForward):
    """The ``forward`` attach sets on a gated ``nn.MultiheadAttention`` (see :func:`_gated_mha`)."""

    def __init__(self, host: nn.Module, fused: bool) -> None:
        super().__init__(host, _gated_mha)
        self.fused = fused

    def __call__(self, *args, **kwargs):  # type: ignore[override]
        return self.fn(self.host, getattr(self.host, GATE_ATTR), self.fused, *args, **kwargs)


class KeepGatesInEval(GateHook):
    """No-op forward pre-hook on an ``nn.TransformerEncoderLayer`` holding a gate: the
    layer's fused eval kernel (which reads every weight directly and would skip the gates)
    runs only when no hook is attached, so the general path, gates included, runs."""

    def __call__(self, _module: nn.Module, _args: tuple) -> None:
        return None


class NoNestedTensor(GateHook):
    """No-op forward pre-hook marking an ``nn.TransformerEncoder`` whose nested-tensor fast
    path attach turned off (``use_nested_tensor = False``: its layers now run their general
    path, which does not take nested tensors); :func:`torchdam.detach` restores the flag."""

    def __init__(self, was: bool) -> None:
        self.was = was

    def __call__(self, _module: nn.Module, _args: tuple) -> None:
        return None

    def undo(self, module: nn.Module) -> None:
        module.use_nested_tensor = self.was


def install(host: nn.Module, fused: bool) -> None:
    """Make ``host``'s gate (already its ``dam_gate``) act on its heads."""
    layout = heads_of(host)
    if isinstance(host, nn.MultiheadAttention):
        host.forward = GatedAttentionForward(host, fused)
        return
    units, per, d = layout.layout(host)
    layout.out_projection(host).register_forward_pre_hook(HeadGateHook(host, units, per * d))


def _has_hook(module: nn.Module, kind: type) -> bool:
    return any(isinstance(h, kind) for h in module._forward_pre_hooks.values())


def keep_gates_in_eval(model: nn.Module) -> None:
    """Turn off the fused fast paths that would skip gates (see the module docstring)."""
    for module in model.modules():
        if not isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
            continue
        if not any(isinstance(getattr(m, GATE_ATTR, None), nn.Module) for m in module.modules()):
            continue
        if isinstance(module, nn.TransformerEncoderLayer) and not _has_hook(module, KeepGatesInEval):
            module.register_forward_pre_hook(KeepGatesInEval())
        elif isinstance(module, nn.TransformerEncoder) and not _has_hook(module, NoNestedTensor):
            module.register_forward_pre_hook(NoNestedTensor(getattr(module, "use_nested_tensor", False)))
            module.use_nested_tensor = False


# ------------------------------------------------------------------ compaction

@dataclass
class _HeadGated:
    name: str
    keep: list[int]
    total: int


def take_head_gates(small: nn.Module, min_width: int) -> list[_HeadGated]:
    """Fold every head gate of ``small`` into its output projection and take the gate off
    (gate, gated forward and hook); returns which units each attention module keeps."""
    taken = []
    for name, module in small.named_modules():
        gate = getattr(module, GATE_ATTR, None)
        layout = heads_of(module) if isinstance(gate, nn.Module) else None
        if layout is None:
            continue
        g = gate.mask().detach()
        live = torch.nonzero(g > 0).flatten().tolist()
        if len(live) < min_width:
            label = getattr(gate, "producer_name", name)
            warnings.warn(
                f"attention {label!r}: {len(live)} of {gate.n} head units are live; keeping the top "
                f"{min_width} (min_width) so the network stays connected", stacklevel=4)
            live = sorted(set(live) | set(range(gate.n - min_width, gate.n)))
        layout.fold(module, g)
        delattr(module, GATE_ATTR)
        if isinstance(module.__dict__.get("forward"), GatedForward):
            del module.forward
        taken.append(_HeadGated(name, live, int(gate.n)))
    return taken


def keep_nested_tensors_off(small: nn.Module) -> None:
    """Drop the :class:`NoNestedTensor` markers without restoring the flag: a compacted copy
    must compute what the gated model did (its encoders ran without nested tensors)."""
    for module in small.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, NoNestedTensor):
                del module._forward_pre_hooks[key]


def remove_heads(small: nn.Module, taken: list[_HeadGated]) -> None:
    """Remove the dead units of every attention module in ``taken`` (in place in ``small``)."""
    for item in taken:
        if len(item.keep) == item.total:
            continue
        module = small.get_submodule(item.name)
        replacement = heads_of(module).remove(module, item.keep)
        if replacement is not None:
            small.set_submodule(item.name, replacement)


# ------------------------------------------------------------------ pruned MHA

class PrunedMultiheadAttention(nn.Module):
    """An ``nn.MultiheadAttention`` with some heads removed: same call signature, same
    outputs (the removed heads contributed nothing), fewer heads.

    ``nn.MultiheadAttention`` ties ``embed_dim = num_heads * head_dim``, so it cannot hold
    fewer heads of the same size at the same model width; here q/k/v/out are separate
    Linear layers over ``num_heads * head_dim`` channels. ``kept_heads`` are the original
    indices (a 3-D ``attn_mask`` of ``total_heads`` heads per sample is sliced to them).
    With ``need_weights=True`` the returned weights cover the kept heads only.
    ``in_proj_bias`` is None, which makes an ``nn.TransformerEncoderLayer`` holding it run
    its general path (its fused kernel needs a packed in-projection)."""

    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, mha: nn.MultiheadAttention, keep: list[int]) -> None:
        super().__init__()
        d = mha.head_dim
        idx = torch.as_tensor(_channels(list(keep), d), dtype=torch.long, device=mha.out_proj.weight.device)
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().chunk(3)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = mha.in_proj_bias.detach().chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        projections = []
        for w, b in zip(weights, biases):
            layer = nn.Linear(w.shape[1], idx.numel(), bias=b is not None, device=w.device, dtype=w.dtype)
            layer.weight.data.copy_(w[idx])
            if b is not None:
                layer.bias.data.copy_(b[idx])
            projections.append(layer)
        self.q_proj, self.k_proj, self.v_proj = projections
        out = mha.out_proj
        self.out_proj = nn.Linear(idx.numel(), out.out_features, bias=out.bias is not None,
                                  device=out.weight.device, dtype=out.weight.dtype)
        self.out_proj.weight.data.copy_(out.weight.detach()[:, idx])
        if out.bias is not None:
            self.out_proj.bias.data.copy_(out.bias.detach())
        self.embed_dim, self.kdim, self.vdim = int(mha.embed_dim), int(mha.kdim), int(mha.vdim)
        self.num_heads, self.head_dim = len(keep), int(d)
        self.total_heads = int(mha.num_heads)
        self.kept_heads = [int(k) for k in keep]
        self.batch_first = bool(mha.batch_first)
        self.dropout = float(mha.dropout)
        self.add_zero_attn = False
        self.bias_k = self.bias_v = None

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        is_batched = query.dim() == 3
        key_padding_mask, attn_mask = _canonical_masks(query, key_padding_mask, attn_mask)
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, tgt, src = query.shape[0], query.shape[1], key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(batch, tgt, h, d).transpose(1, 2)
        k = self.k_proj(key).view(batch, src, h, d).transpose(1, 2)
        v = self.v_proj(value).view(batch, src, h, d).transpose(1, 2)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        causal = is_causal and key_padding_mask is None and not need_weights
        mask = None
        if attn_mask is not None and not causal:
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.view(batch, self.total_heads, tgt, src)[:, self.kept_heads]
            mask = attn_mask
        if key_padding_mask is not None:
            padding = key_padding_mask.view(batch, 1, 1, src)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = torch.matmul(q * (1.0 / d) ** 0.5, k.transpose(-2, -1))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if dropout > 0.0:
                weights = F.dropout(weights, p=dropout)
            out = torch.matmul(weights, v)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, tgt, h * d))
        if not is_batched:
            out = out.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads} of {self.total_heads}, "
                f"head_dim={self.head_dim}, batch_first={self.batch_first}")


class PrunedMHAHeads(SplitHeads):
    """:class:`PrunedMultiheadAttention` (a compacted model gated again): separate
    projections; ``kept_heads`` keeps naming the original heads."""

    def __init__(self) -> None:
        super().__init__("q_proj", "k_proj", "v_proj", "out_proj", "head_dim", {"num_heads": _heads})

    def remove(self, m: nn.Module, keep: list[int]) -> None:
        super().remove(m, keep)
        m.kept_heads = [m.kept_heads[u] for u in sorted(keep)]
        return None


ATTENTION[PrunedMultiheadAttention] = PrunedMHAHeads()
