"""Make a gated model physically smaller: remove dead units, fold live gates into weights.

DAM gates decide *what* goes; this module decides *how*, in these steps on a copy:

1. **Fold**: each gate's values ``g`` multiply the output units of the module it hooks
   (a Linear/Conv's weight rows and bias, or a BatchNorm's affine), so the copy computes
   exactly what the gated model did without gates. Dead units now output exact zeros.
2. **Remove**: Torch-Pruning's dependency graph (traced from ``example_inputs``) finds
   every layer coupled to a gated layer's output units (its BatchNorm, the consumers'
   input channels, a Flatten's index mapping into the next Linear, ...) and removes the
   dead units from all of them. We use it rather than our own graph surgery because it is
   maintained against PyTorch's op set and already covers flatten/concat/split mappings.
3. **Residual streams**: when a gated layer's output is added to an ungated stream (the
   paper's pre-activation bottleneck ``conv3``), its dead channels cannot leave the stream.
   Torch-Pruning would couple them with every layer on the stream, so instead we shrink
   only the gated layer (its dead channels are not computed) and wrap it in
   :class:`ScatterUnits`, which writes the live channels back into a zero tensor of the
   stream's width. The same happens when the zeros would pass through a BatchNorm before
   any consumer (pre-activation: BN turns them into its bias, so they are not dead there)
   and for a gated layer whose units are the model's output.
4. **Narrow streams** (``narrow_streams=True``): a stream channel that *every* producer of
   the stream leaves dead (post-activation ResNets: each block's gated ``bn2`` and gated
   shortcut) is zero all along the stream (``relu(0 + 0) = 0``), so it is removed from the
   whole stream: producers, their BatchNorms and every consumer's input. Only the channels
   some producers use and others do not are still scattered back. Done only when every
   producer on the stream is gated, every BatchNorm on it hosts one of their gates and the
   ops between are elementwise/reshapes; the result is always checked against the gated
   model, and compaction falls back to full-width streams if it differs.

5. **Heads** (:mod:`torchdam.attention`): an attention module's head gate is folded into its
   output projection; its dead heads' q/k/v rows and output-projection columns are removed
   and its head counts updated (local to the module, no graph needed).

Finally the compacted copy is checked against the gated model on ``example_inputs``.
Per-layer rules live in small tables (:data:`FOLDERS`) that users can extend.
"""
from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch_pruning as tp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from torchdam import attention
from torchdam.attach import GATE_ATTR, detach
from torchdam.errors import CompactionError, ShapeError, UnsupportedLayerError
from torchdam.gates import DAMGate


def _fold_rows(weight_dim: int) -> Callable[[nn.Module, Tensor], None]:
    """Folder for layers whose output units index ``weight`` along ``weight_dim``."""

    def fold(module: nn.Module, g: Tensor) -> None:
        shape = [1] * module.weight.dim()
        shape[weight_dim] = -1
        module.weight.mul_(g.view(shape))
        if module.bias is not None:
            module.bias.mul_(g)

    return fold


def _fold_norm(module: nn.Module, g: Tensor) -> None:
    if not module.affine:
        # BN without affine: give it one, exactly the identity scaled by g.
        module.affine = True
        module.weight = nn.Parameter(torch.ones_like(g))
        module.bias = nn.Parameter(torch.zeros_like(g))
    module.weight.mul_(g)
    module.bias.mul_(g)


#: module type -> function scaling its output units by ``g`` in place. Extend it (or use
#: :func:`register_folder`) to compact a gate hooked on another layer type.
FOLDERS: dict[type, Callable[[nn.Module, Tensor], None]] = {
    nn.Linear: _fold_rows(0),
    nn.Conv1d: _fold_rows(0),
    nn.Conv2d: _fold_rows(0),
    nn.Conv3d: _fold_rows(0),
    nn.BatchNorm1d: _fold_norm,
    nn.BatchNorm2d: _fold_norm,
    nn.BatchNorm3d: _fold_norm,
}


def register_folder(layer_type: type, fold: Callable[[nn.Module, Tensor], None]) -> None:
    """Teach :func:`compact` to fold a gate hooked on ``layer_type``."""
    FOLDERS[layer_type] = fold


class ScatterUnits(nn.Module):
    """Runs a narrowed layer and puts its live units back at their places in a zero
    tensor of the original width, so a residual stream keeps its width while the dead
    units are never computed."""

    def __init__(self, module: nn.Module, index: Sequence[int], total: int, axis: int) -> None:
        super().__init__()
        self.module = module
        self.total = int(total)
        self.axis = int(axis)
        index = [int(i) for i in index]
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long))
        # DAM kills the lowest indices first, so its live units are one contiguous block:
        # then a single zero-pad (one kernel) replaces zeros + index_copy.
        contiguous = index == list(range(index[0], index[0] + len(index))) if index else False
        self.pad_before = index[0] if contiguous else -1

    def forward(self, x: Tensor) -> Tensor:
        y = self.module(x)
        axis = self.axis % y.dim()
        if self.pad_before >= 0:
            after = self.total - self.pad_before - y.shape[axis]
            return F.pad(y, [0, 0] * (y.dim() - axis - 1) + [self.pad_before, after])
        shape = list(y.shape)
        shape[axis] = self.total
        return y.new_zeros(shape).index_copy_(axis, self.index, y)

    def __getattr__(self, name: str):
        # Code that reads the wrapped layer's ``weight``/``bias`` for their dtype or device
        # (HF ViT reads ``patch_embeddings.projection.weight.dtype``) finds the inner layer's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("weight", "bias"):
                return getattr(self._modules["module"], name)
            raise

    def extra_repr(self) -> str:
        return f"live={self.index.numel()}, total={self.total}, axis={self.axis}"


@dataclass
class _Gated:
    name: str
    producer: nn.Module
    host_name: str
    host: nn.Module
    axis: int
    total: int
    keep: list[int]
    dead: list[int]


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (
            model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else None
        )
        if inner is None:
            return model
        model = inner


def as_tuple(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def call(model: nn.Module, example_inputs):
    """``model(**example_inputs)`` for a dict of keyword arguments (Hugging Face style),
    else ``model(*example_inputs)``; a model whose forward takes ``use_cache`` runs without
    a key/value cache unless the inputs say otherwise."""
    kwargs = dict(example_inputs) if isinstance(example_inputs, Mapping) else {}
    args = () if isinstance(example_inputs, Mapping) else as_tuple(example_inputs)
    if "use_cache" not in kwargs:
        try:
            takes_cache = "use_cache" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            takes_cache = False
        if takes_cache:
            kwargs["use_cache"] = False
    return model(*args, **kwargs)


def compared_outputs(out) -> list[Tensor]:
    """The output tensors :func:`compact` compares: for a Hugging Face ``ModelOutput`` (or
    any mapping) its ``logits``, else its ``last_hidden_state`` (and ``pooler_output``),
    else every tensor but caches and per-head attention maps; otherwise every tensor."""
    if isinstance(out, Mapping):
        for keys in (("logits",), ("last_hidden_state", "pooler_output")):
            found = [out[k] for k in keys if isinstance(out.get(k), Tensor)]
            if found:
                return found
        out = [v for k, v in out.items() if "past_key_values" not in k and "attentions" not in k and k != "cache"]
    return [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]


def run_eval(model: nn.Module, example_inputs) -> list[Tensor]:
    """Outputs of ``model`` in eval mode, as a flat list; restores its training flag."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = call(model, example_inputs)
    except (RuntimeError, ValueError, IndexError) as exc:
        inputs = example_inputs.values() if isinstance(example_inputs, Mapping) else as_tuple(example_inputs)
        shapes = [tuple(t.shape) for t in inputs if isinstance(t, Tensor)]
        raise ShapeError(f"example_inputs of shape {shapes} do not fit {type(model).__name__}: "
                         f"{str(exc).splitlines()[0]}") from exc
    finally:
        model.train(was_training)
    return compared_outputs(out)


def _collect(small: nn.Module, min_width: int) -> list[_Gated]:
    gated = []
    for host_name, host in small.named_modules():
        gate = getattr(host, GATE_ATTR, None)
        if not isinstance(gate, DAMGate):
            continue
        name = getattr(gate, "producer_name", host_name)
        g = gate.mask().detach()
        live = torch.nonzero(g > 0).flatten().tolist()
        if len(live) < min_width:
            warnings.warn(
                f"layer {name!r}: {len(live)} of {gate.n} units are live; keeping the top "
                f"{min_width} (min_width) so the network stays connected", stacklevel=3)
            live = sorted(set(live) | set(range(gate.n - min_width, gate.n)))
        fold = next((FOLDERS[c] for c in type(host).__mro__ if c in FOLDERS), None)
        if fold is None:
            raise UnsupportedLayerError(
                f"cannot compact gated layer {host_name!r} of type {type(host).__name__}: no folding "
                "rule; register one with torchdam.compact.register_folder")
        fold(host, g)
        dead = sorted(set(range(gate.n)) - set(live))
        axis = gate.axis if gate.axis is not None else 1
        gated.append(_Gated(name, small.get_submodule(name), host_name, host, axis, gate.n, live, dead))
    return gated


def _needs_scatter(dg: tp.DependencyGraph, group, layer: _Gated, partners: frozenset[int] = frozenset()) -> bool:
    """True when removing the dead units from every coupled layer would not be exact:

    - they are coupled with other producers' outputs (a residual stream);
    - they reach a normalisation after the gate (pre-activation blocks: the next block's
      BN turns the zeros into its bias, so consumers do see them);
    - nothing consumes them (they are the model's output).

    ``partners``: ids of layers whose outputs are multiplied with the producer's (Llama's
    ``gate_proj`` beside a gated ``up_proj``): zeros times anything stay zero, so removing
    the units from them too is exact.
    """
    coupled = consumers = False
    for dep, _ in group:
        module = dep.target.module
        if dg.is_out_channel_pruning_fn(dep.handler) and module is not layer.producer and id(module) not in partners:
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                coupled = True
            elif isinstance(module, nn.modules.batchnorm._NormBase) and module is not layer.host:
                coupled = True
            elif module is not layer.host and _has_own_parameters(dep.target):
                coupled = True  # a LayerNorm, attention, embedding or other writer on the stream
        if dg.is_in_channel_pruning_fn(dep.handler):
            consumers = True
    return coupled or not consumers


def _has_own_parameters(node) -> bool:
    """A graph node for a module with parameters of its own (not an op), or a bare parameter."""
    if node.type == tp.ops.OPTYPE.PARAMETER:
        return True
    module = node.module
    return isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False))


#: Torch-Pruning node types a narrowed stream may pass through besides its producers,
#: their BatchNorms and its consumers (``relu``/``add``/pooling and ``flatten``).
_STREAM_OPS = (tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.RESHAPE)


def _stream_members(dg: tp.DependencyGraph, layer: _Gated, by_module: dict[int, _Gated]) -> list[_Gated] | None:
    """The gated layers writing into ``layer``'s residual stream, or None when the stream
    cannot be narrowed: an ungated producer, a BatchNorm that hosts none of their gates
    (pre-activation), an op that remaps channels (concat, split, ...), a producer of
    another width, or no consumer."""
    group = dg.get_pruning_group(layer.producer, dg.get_pruner_of_module(layer.producer).prune_out_channels,
                                 layer.dead)
    members: dict[int, _Gated] = {}
    consumers = False
    for dep, idxs in group:
        module, kind = dep.target.module, dep.target.type
        if kind in _STREAM_OPS:
            continue
        if kind not in (tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.LINEAR, tp.ops.OPTYPE.BN):
            return None
        out = dg.is_out_channel_pruning_fn(dep.handler)
        if kind != tp.ops.OPTYPE.BN and not out:
            consumers = True
            continue
        member = by_module.get(id(module))
        if member is None or member.total != layer.total or sorted(idxs) != layer.dead:
            return None  # ungated producer, foreign BatchNorm, or not an identity channel map
        members[id(member)] = member
    return list(members.values()) if consumers else None


def _narrow_streams(dg: tp.DependencyGraph, stream: list[_Gated]) -> dict[int, list[int]]:
    """Removes the channels every producer of a residual stream leaves dead from the whole
    stream; returns ``{id(layer): removed stream channels}`` for the layers it narrowed."""
    by_module = {}
    for layer in stream:
        by_module[id(layer.producer)] = layer
        by_module[id(layer.host)] = layer
    removed: dict[int, list[int]] = {}
    seen: set[int] = set()
    for layer in stream:
        if id(layer) in seen:
            continue
        members = _stream_members(dg, layer, by_module)
        if members is None:
            seen.add(id(layer))
            continue
        seen.update(id(m) for m in members)
        common = sorted(set.intersection(*(set(m.dead) for m in members)))
        if not common:
            continue
        dg.get_pruning_group(layer.producer, dg.get_pruner_of_module(layer.producer).prune_out_channels,
                             common).prune(record_history=False)
        for m in members:
            removed[id(m)] = common
    return removed


def _shrink_outputs(dg: tp.DependencyGraph, module: nn.Module, dead: list[int], name: str) -> None:
    pruner = dg.get_pruner_of_module(module)
    if pruner is None:
        raise UnsupportedLayerError(f"cannot remove units of {name!r} ({type(module).__name__})")
    pruner.prune_out_channels(module, dead)


def compact(
    model: nn.Module,
    example_inputs,
    *,
    min_width: int = 1,
    verify: bool = True,
    rtol: float = 1e-5,
    narrow_streams: bool = True,
) -> nn.Module:
    """A new, gate-free, physically smaller copy of ``model`` with the same outputs.

    Args:
        model: a model instrumented by :func:`torchdam.attach` (left unchanged).
        example_inputs: a tensor or tuple of tensors the model accepts, or a dict of keyword
            arguments (``{"input_ids": ids}`` calls ``model(**inputs)``); used to trace the
            dependency graph and to check the result. A model whose forward takes
            ``use_cache`` runs with ``use_cache=False``; of a Hugging Face ``ModelOutput``
            the ``logits`` (else ``last_hidden_state``) are compared.
        min_width: units kept in a layer whose units all died (the kept ones output zero,
            exactly as in the gated model), so the network keeps its shapes; warns.
        verify: compare outputs with the gated model (eval mode) and raise
            :class:`CompactionError` if ``max|diff| > rtol * max(1, max|output|)``.
        narrow_streams: remove residual-stream channels that every producer of the stream
            leaves dead (step 4 above). A narrowed result is always checked; if it differs
            from the gated model, compaction is redone with full-width streams.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = torchdam.attach(net)
        >>> small = compact(net, torch.randn(3, 4))
    """
    if min_width < 1:
        raise CompactionError(f"min_width must be >= 1, got {min_width}")
    source = unwrap(model)
    attention.register_hf_layers()
    if not any(isinstance(m, DAMGate) for m in source.modules()):
        raise CompactionError("compact: the model has no DAM gates; call torchdam.attach(model) first")
    reference = run_eval(source, example_inputs)
    small, narrowed = _compacted_copy(source, example_inputs, min_width, narrow_streams)
    if narrowed:
        try:
            check_equivalent(small, reference, example_inputs, rtol)
            return small
        except CompactionError:
            small, _ = _compacted_copy(source, example_inputs, min_width, False)
    if verify:
        check_equivalent(small, reference, example_inputs, rtol)
    return small


def _compacted_copy(source: nn.Module, example_inputs, min_width: int, narrow_streams: bool) -> tuple[nn.Module, bool]:
    """The compacted copy of ``source`` (unchecked), and whether a stream was narrowed."""
    small = copy.deepcopy(source).eval()
    with torch.no_grad():
        heads = attention.take_head_gates(small, min_width)
        gated = _collect(small, min_width)
    attention.keep_nested_tensors_off(small)
    detach(small)
    for p in small.parameters():
        p.requires_grad_(True)
    dg = _dependency_graph(small, example_inputs) if any(layer.dead for layer in gated) else None
    shared = attention.shared_units(small)
    stream = []
    for layer in gated:
        if not layer.dead:
            continue
        pruner = dg.get_pruner_of_module(layer.producer)
        if pruner is None:
            raise UnsupportedLayerError(
                f"cannot remove units of {layer.name!r}: Torch-Pruning has no rule for "
                f"{type(layer.producer).__name__}")
        group = dg.get_pruning_group(layer.producer, pruner.prune_out_channels, layer.dead)
        if _needs_scatter(dg, group, layer, shared.get(id(layer.producer), frozenset())):
            stream.append(layer)
        else:
            group.prune(record_history=False)
    removed = _narrow_streams(dg, stream) if narrow_streams else {}
    for layer in stream:
        keep, dead, total = layer.keep, layer.dead, layer.total
        if id(layer) in removed:  # renumber within the narrowed stream
            gone = set(removed[id(layer)])
            position = {c: i for i, c in enumerate(c for c in range(layer.total) if c not in gone)}
            keep = [position[c] for c in keep]
            dead = [position[c] for c in dead if c not in gone]
            total = layer.total - len(gone)
        if not dead:  # the stream's widest producer: nothing to scatter
            continue
        _shrink_outputs(dg, layer.producer, dead, layer.name)
        if layer.host is not layer.producer:
            _shrink_outputs(dg, layer.host, dead, layer.host_name)
        small.set_submodule(layer.host_name, ScatterUnits(layer.host, keep, total, layer.axis))
    attention.remove_heads(small, heads)
    for p in small.parameters():
        p.requires_grad_(False)
    small.eval()
    return small, bool(removed)


def _dependency_graph(small: nn.Module, example_inputs) -> tp.DependencyGraph:
    """Torch-Pruning's graph of ``small`` traced on ``example_inputs`` (a dict: keyword
    arguments), through model outputs such as Hugging Face's ``ModelOutput`` (the tensors of
    :func:`compared_outputs`), with rules for layer types it lacks (HF ``Conv1D``)."""
    inputs = example_inputs if isinstance(example_inputs, Mapping) else as_tuple(example_inputs)
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(
            small, example_inputs=inputs, forward_fn=call, output_transform=compared_outputs,
            customized_pruners=attention.customized_pruners(), verbose=False)


def check_equivalent(small: nn.Module, reference: list[Tensor], example_inputs, rtol: float = 1e-5) -> float:
    """Max abs difference between ``small``'s outputs and ``reference``; raises past tolerance."""
    try:
        got = run_eval(small, example_inputs)
    except ShapeError as exc:
        raise CompactionError(f"the compacted model no longer runs: {exc}") from exc
    worst = 0.0
    for ref, out in zip(reference, got, strict=True):
        if ref.shape != out.shape:
            raise CompactionError(f"compaction changed an output shape {tuple(ref.shape)} -> {tuple(out.shape)}")
        scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
        diff = float((ref - out).abs().max()) if ref.numel() else 0.0
        if diff > rtol * scale:
            raise CompactionError(
                f"compacted outputs differ from the gated model by {diff:.3g} (tolerance "
                f"{rtol * scale:.3g}); a gated layer's dead units do not reach zero before "
                "their consumers (e.g. a BatchNorm after the gate that attach did not see)")
        worst = max(worst, diff)
    return worst
