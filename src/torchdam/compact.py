"""Make a gated model physically smaller: remove dead units, fold live gates into weights.

DAM gates decide *what* goes; this module decides *how*, in these steps on a copy:

0. **Plain weights**: a reparametrized weight (``weight_norm``, ``spectral_norm`` and other
   ``torch.nn.utils.parametrize`` parametrizations, the older pre-hook ``weight_norm``,
   ``torch.nn.utils.prune`` masks) is replaced by a plain parameter holding its current
   value (:func:`plain_weights`): the steps below change a layer's own tensors, which a
   reparametrization would recompute over on the next forward.

1. **Fold**: each gate's values ``g`` multiply the output units of the module it hooks
   (a Linear/Conv's weight rows and bias, or a BatchNorm's affine), so the copy computes
   exactly what the gated model did without gates. Dead units now output exact zeros.
2. **Remove**: Torch-Pruning's dependency graph (traced from ``example_inputs``) finds
   every layer coupled to a gated layer's output units (its BatchNorm, the consumers'
   input channels, a Flatten's index mapping into the next Linear, ...) and removes the
   dead units from all of them. We use it rather than our own graph surgery because it is
   maintained against PyTorch's op set and already covers flatten/concat/split mappings.
   Where layers acting on each channel alone (a depthwise conv, a BatchNorm) turn a dead
   unit's zeros into a constant before its consumer, the constant goes into the consumer's
   bias first (:func:`_compensate`), so they all shrink too.
3. **Residual streams**: when a gated layer's output is added to an ungated stream (the
   paper's pre-activation bottleneck ``conv3``) or reaches a layer that must keep its width
   (tied weights, a grouped conv, a norm over all units), its dead channels cannot leave.
   Torch-Pruning would couple them with every layer on the stream, so instead we shrink
   only the gated layer (its dead channels are not computed) and wrap it in
   :class:`ScatterUnits`, which writes the live channels back into a zero tensor of the
   stream's width. The same happens when the zeros would pass through a BatchNorm before
   a consumer that cannot take the resulting constant in its bias (pre-activation: BN turns
   them into its bias before a padded 3x3 conv), for a gated layer whose units are the
   model's output, and where Torch-Pruning cannot find the coupled layers
   (:class:`GroupSearchError`: a bidirectional GRU consumer, grouped-query attention's
   ``repeat_kv``).
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

Finally the compacted copy is checked against the gated model on ``example_inputs``; if it
differs, attention modules whose head removal is at fault keep their heads (with a warning
naming them), else the gated layers whose removal alone is not exact are scattered back as
in step 3 (:func:`_rescue`). Per-layer rules live in small tables (:data:`FOLDERS`,
:data:`TP_PRUNERS`) that users can extend.
"""
from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence
from unittest import mock

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
import torch_pruning as tp
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from torchdam import attention
from torchdam.attach import (
    GATE_ATTR, LINEAR_LIKE, _ungateable_reason, _unit_rule, detach, gate_paths, named_gates, unwrap,
)
from torchdam.errors import CompactionError, ShapeError, TorchDAMError, UnsupportedLayerError
from torchdam.gates import DAMGate


def _fold_rows(weight_dim: int) -> Callable[[nn.Module, Tensor], None]:
    """Folder for layers whose output units index ``weight`` along ``weight_dim``."""

    def fold(module: nn.Module, g: Tensor) -> None:
        shape = [1] * module.weight.dim()
        shape[weight_dim] = -1
        module.weight.mul_(g.view(shape))
        if getattr(module, "bias", None) is not None:
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
    # Transposed convs keep their output channels on weight dim 1: (in, out/groups, ...).
    nn.ConvTranspose1d: _fold_rows(1),
    nn.ConvTranspose2d: _fold_rows(1),
    nn.ConvTranspose3d: _fold_rows(1),
    nn.Embedding: _fold_rows(1),  # weight (vocab, dim): scale the feature columns
    nn.GroupNorm: _fold_norm,
    nn.InstanceNorm1d: _fold_norm,
    nn.InstanceNorm2d: _fold_norm,
    nn.InstanceNorm3d: _fold_norm,
}


def register_folder(layer_type: type, fold: Callable[[nn.Module, Tensor], None]) -> None:
    """Teach :func:`compact` to fold a gate hooked on ``layer_type`` (also importable as
    ``torchdam.register_folder``): ``fold(module, g)`` scales its output units by ``g`` in place."""
    FOLDERS[layer_type] = fold


class _RecurrentPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning rule for RNN/GRU/LSTM consumers: removes input features from the
    first layer's input weights. Their hidden units are not removed (Torch-Pruning has no
    GRU/RNN rule, and its LSTM output rule does not keep the four gates' blocks aligned)."""

    TARGET_MODULES = nn.RNNBase

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise _Refused(f"the hidden units of a {type(layer).__name__} cannot be removed")

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = [i for i in range(layer.input_size) if i not in set(idxs)]
        for name in layer._flat_weights_names:
            if name.startswith("weight_ih_l0"):
                setattr(layer, name, self._prune_parameter_and_grad(getattr(layer, name), keep, 1))
        layer.input_size = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.hidden_size * (2 if layer.bidirectional else 1)

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.input_size


class _GroupNormPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning's GroupNorm rule keeps ``num_groups``; a per-channel GroupNorm
    (one channel per group, the only kind a gate moves behind) loses a group per channel.
    Removing channels from a GroupNorm over several channels per group would change its
    statistics: refused (compact scatters the units back to full width before it)."""

    TARGET_MODULES = nn.GroupNorm

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        if layer.num_groups != layer.num_channels:
            raise _Refused(f"GroupNorm({layer.num_groups}, {layer.num_channels}) normalises several "
                           "channels together")
        keep = [i for i in range(layer.num_channels) if i not in set(idxs)]
        layer.num_channels = layer.num_groups = len(keep)
        if layer.affine:
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.num_channels

    get_in_channels = get_out_channels


class _Refused(Exception):
    """A Torch-Pruning rule of ours declined to remove these units (message: why)."""


#: module type -> Torch-Pruning pruner that :func:`compact` adds to or replaces in
#: Torch-Pruning's own table when it builds the dependency graph.
TP_PRUNERS: dict[type, tp.pruner.BasePruningFunc] = {
    nn.RNN: _RecurrentPruner(),
    nn.GRU: _RecurrentPruner(),
    nn.LSTM: _RecurrentPruner(),
    nn.GroupNorm: _GroupNormPruner(),
}


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
        # Model code reads its layers' attributes: HF ViT ``projection.weight.dtype``, Whisper
        # ``conv1.stride``. They are the wrapped layer's, except its width, which is the total;
        # its submodules (a DAM gate) stay its own.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "module" not in self.__dict__.get("_modules", {}):
                raise
            inner = self._modules["module"]
            rule = _unit_rule(type(inner))
            if rule is not None and name == rule[0]:
                return self.total
            value = getattr(inner, name)
            if isinstance(value, nn.Module):
                raise
            return value

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
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        inputs = example_inputs.values() if isinstance(example_inputs, Mapping) else as_tuple(example_inputs)
        shapes = [tuple(t.shape) for t in inputs if isinstance(t, Tensor)]
        raise ShapeError(f"example_inputs of shape {shapes} do not fit {type(model).__name__}: "
                         f"{str(exc).splitlines()[0]}") from exc
    finally:
        model.train(was_training)
    return compared_outputs(out)


def _collect(small: nn.Module, min_width: int, tied: dict[int, list[str]], only: str | None = None) -> list[_Gated]:
    """Folds every gate into its host and lists the gated layers with their live/dead units
    (``only``: the dead units of that layer alone are to be removed; the others stay, as zeros)."""
    gated = []
    for name, host_name, gate in gate_paths(small):
        host = small.get_submodule(host_name)
        producer = small.get_submodule(name)
        reason = _ungateable_reason(producer)
        if reason is not None:
            raise UnsupportedLayerError(f"cannot compact gated layer {name!r}: {reason}")
        for module in (producer, host):
            if id(module) in tied:
                others = ", ".join(map(repr, tied[id(module)]))
                raise CompactionError(
                    f"gated layer {name!r} shares its weight with {others} (tied weights): folding its "
                    f"gate would scale {others} too and removing its units would untie them; leave it "
                    f"ungated (attach(model, exclude=({name!r},)))")
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
                "rule; register one with torchdam.register_folder(layer_type, fold)")
        fold(host, g)
        if only is not None and name != only:
            live = list(range(gate.n))
        dead = sorted(set(range(gate.n)) - set(live))
        axis = gate.axis if gate.axis is not None else 1
        gated.append(_Gated(name, producer, host_name, host, axis, gate.n, live, dead))
    return gated


#: Torch-Pruning node types that are ops on tensors, not layers (their "pruning" only
#: updates index bookkeeping): relu/add/pooling, view/flatten, cat/split, slices, ...
_TENSOR_OPS = frozenset({
    tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.RESHAPE, tp.ops.OPTYPE.CONCAT, tp.ops.OPTYPE.SPLIT,
    tp.ops.OPTYPE.UNBIND, tp.ops.OPTYPE.EXPAND, tp.ops.OPTYPE.SLICE,
})


def _is_depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed
            and module.groups == module.in_channels == module.out_channels > 1)


def _channelwise(module: nn.Module) -> bool:
    """Layers whose output unit j depends on input unit j only (exactly: a dead, all-zero
    unit gives a constant there, the same at every position and for every sample)."""
    if isinstance(module, nn.GroupNorm):
        return module.num_groups == module.num_channels
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.PReLU)) or _is_depthwise(module)


def _downstream(dg: tp.DependencyGraph, host: nn.Module) -> set[int]:
    """Ids of the nodes after ``host`` through which its units pass on their own: tensor
    ops with no second operand (a parameter such as a layer scale does not count),
    cat/split/reshapes, and channel-wise layers (depthwise conv, per-channel norms). Stops
    at consumers (Linear, conv) and at ops mixing in another tensor (a residual add)."""
    start = dg.module2node[host]
    seen, stack = {id(start)}, [start]
    while stack:
        node = stack.pop()
        for out in node.outputs:
            if id(out) in seen:
                continue
            if out.type in _TENSOR_OPS:
                others = [i for i in out.inputs if i is not node and i.type != tp.ops.OPTYPE.PARAMETER]
                if out.type == tp.ops.OPTYPE.ELEMENTWISE and others:
                    continue
            elif not _channelwise(out.module):
                continue
            seen.add(id(out))
            stack.append(out)
    return seen


def _plain(idxs) -> list[int]:
    return [int(i) for i in tp._helpers.to_plain_idxs(list(idxs))]


def _consumers(dg: tp.DependencyGraph, group, layer: _Gated, frozen: dict[int, str],
               partners: frozenset[int] = frozenset()) -> dict[nn.Module, list[int]] | None:
    """``{consumer layer: its input units to remove}`` when removing the dead units from
    every coupled layer can be exact (after bias compensation, see :func:`_compensate`);
    None when they must be scattered back to full width instead:

    - they are coupled with other layers' outputs (a residual stream) or pass through a
      layer that mixes units (LayerNorm, GroupNorm over several channels, a grouped conv);
    - a coupled layer must keep its width (``frozen``: tied weights, grouped convs);
    - nothing consumes them (they are the model's output).

    ``partners``: ids of layers whose outputs are multiplied with the producer's (Llama's
    ``gate_proj`` beside a gated ``up_proj``): zeros times anything stay zero, so removing
    the units from them too is exact.
    """
    own = {id(dg.module2node[layer.producer]), id(dg.module2node[layer.host])}
    passing = _downstream(dg, layer.host) | own
    consumers: dict[nn.Module, list[int]] = {}
    for dep, idxs in group:
        node, module = dep.target, dep.target.module
        if node.type in _TENSOR_OPS:
            continue
        if node.type == tp.ops.OPTYPE.OUTPUT or id(module) in frozen:
            return None
        if dg.is_out_channel_pruning_fn(dep.handler):
            if id(node) not in passing and node.type != tp.ops.OPTYPE.PARAMETER and id(module) not in partners:
                return None
        elif dg.is_in_channel_pruning_fn(dep.handler):
            units = _plain(idxs)
            pruner = dg.get_pruner_of_module(module)
            width = pruner.get_in_channels(module) if pruner is not None else None
            if width is not None and max(units, default=-1) >= width:
                return None  # the graph's index map does not fit the layer (a fused qkv's reshape)
            consumers[module] = units
    return consumers or None


def _input_values(model: nn.Module, example_inputs, modules: list[nn.Module]) -> dict[nn.Module, Tensor | None]:
    """The input each of ``modules`` receives on ``example_inputs`` (None: called more than once)."""
    seen: dict[nn.Module, Tensor | None] = {}

    def grab(module: nn.Module, args: tuple) -> None:
        seen[module] = args[0].detach() if module not in seen and args and isinstance(args[0], Tensor) else None

    handles = [m.register_forward_pre_hook(grab) for m in set(modules)]
    try:
        with torch.no_grad():
            call(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _bias_delta(module: nn.Module, x: Tensor | None, idxs: list[int]) -> Tensor | None:
    """What ``module``'s output loses when input units ``idxs`` are removed, given that
    they carry the same value at every position and sample in ``x``: 0 when those units
    are zero; a constant that can go into its bias for a Linear, or a conv without
    padding; None when it is not a constant (or the layer is another kind)."""
    if x is None:
        return None
    if not idxs:
        return torch.zeros(())
    linear_like = isinstance(module, tuple(LINEAR_LIKE))  # HF Conv1D: units on the last axis
    axis = -1 if linear_like else next((a for t, a in _INPUT_AXIS.items() if isinstance(module, t)), None)
    if axis is None or x.dim() < 2:
        return None
    if isinstance(module, nn.modules.conv._ConvNd) and x.dim() == len(module.kernel_size) + 1:
        axis = 0  # an unbatched input
    units = x.movedim(axis, 0)[idxs].flatten(1)  # (len(idxs), everything else)
    c = units[:, :1]
    if not torch.equal(units, c.expand_as(units)):
        return None
    c = c.flatten()
    if not torch.any(c != 0):
        return torch.zeros(())
    if units.shape[1] < 2:
        return None  # one value per unit (batch of 1 into a Linear): constancy not observable
    if isinstance(module, nn.Linear):
        return module.weight[:, idxs] @ c
    if linear_like:  # weight (in, out)
        return module.weight[idxs].T @ c
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups == 1 and (
            module.padding == "valid" or not isinstance(module.padding, str) and not any(module.padding)):
        return module.weight[:, idxs].flatten(2).sum(2) @ c  # every output sees the whole kernel
    return None


#: consumer type -> axis of the units in its input (for :func:`_bias_delta`).
_INPUT_AXIS: dict[type, int] = {nn.Linear: -1, nn.RNNBase: -1, nn.modules.conv._ConvNd: 1}


def _bias_deltas(consumers: dict[nn.Module, list[int]],
                 inputs: dict[nn.Module, Tensor | None]) -> dict[nn.Module, Tensor] | None:
    """What each consumer's bias must gain when its input units ``consumers[m]`` are removed
    (:func:`_bias_delta`), or None when some consumer cannot take it. The one rule deciding
    between removal and scattering back, shared with :class:`torchdam.budget.WidthModel`."""
    deltas = {m: _bias_delta(m, inputs.get(m), idxs) for m, idxs in consumers.items()}
    return None if any(d is None for d in deltas.values()) else deltas


def _compensate(consumers: dict[nn.Module, list[int]], inputs: dict[nn.Module, Tensor | None]) -> bool:
    """Adds to each consumer's bias what removing its dead input units takes away (the
    constant a dead unit becomes after a norm or a depthwise conv's bias, e.g. an inverted
    residual's depthwise conv + BatchNorm between the gate and the projection); False,
    changing nothing, when some consumer cannot take it."""
    deltas = _bias_deltas(consumers, inputs)
    if deltas is None:
        return False
    for m, d in deltas.items():
        if d.dim() == 0:
            continue
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros(d.shape, dtype=m.weight.dtype, device=m.weight.device))
        m.bias.add_(d.to(m.bias.dtype))
    return True


#: Torch-Pruning node types a narrowed stream may pass through besides its producers,
#: their BatchNorms and its consumers (``relu``/``add``/pooling and ``flatten``).
_STREAM_OPS = (tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.RESHAPE)


def _stream_members(dg: tp.DependencyGraph, layer: _Gated, by_module: dict[int, _Gated],
                    frozen: dict[int, str]) -> list[_Gated] | None:
    """The gated layers writing into ``layer``'s residual stream, or None when the stream
    cannot be narrowed: an ungated producer, a BatchNorm that hosts none of their gates
    (pre-activation), an op that remaps channels (concat, split, ...), a producer of
    another width, a layer that must keep its width (``frozen``), or no consumer."""
    try:
        group = pruning_group(dg, layer.producer, layer.dead, layer.name)
    except GroupSearchError:
        return None
    members: dict[int, _Gated] = {}
    consumers = False
    for dep, idxs in group:
        module, kind = dep.target.module, dep.target.type
        if kind in _STREAM_OPS:
            continue
        if kind not in (tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.LINEAR, tp.ops.OPTYPE.BN) or id(module) in frozen:
            return None
        out = dg.is_out_channel_pruning_fn(dep.handler)
        if kind != tp.ops.OPTYPE.BN and not out:
            consumers = True
            continue
        member = by_module.get(id(module))
        if member is None or member.total != layer.total or sorted(_plain(idxs)) != layer.dead:
            return None  # ungated producer, foreign BatchNorm, or not an identity channel map
        members[id(member)] = member
    return list(members.values()) if consumers else None


def _narrow_streams(dg: tp.DependencyGraph, stream: list[_Gated], frozen: dict[int, str],
                    names: dict[int, str]) -> dict[int, list[int]]:
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
        members = _stream_members(dg, layer, by_module, frozen)
        if members is None:
            seen.add(id(layer))
            continue
        seen.update(id(m) for m in members)
        common = sorted(set.intersection(*(set(m.dead) for m in members)))
        if not common:
            continue
        _prune(_group(dg, layer.producer, layer.name, common), layer, names)
        for m in members:
            removed[id(m)] = common
    return removed


def _shrink_outputs(dg: tp.DependencyGraph, module: nn.Module, dead: list[int], name: str) -> None:
    pruner = dg.get_pruner_of_module(module)
    if pruner is None:
        raise UnsupportedLayerError(f"cannot remove units of {name!r} ({type(module).__name__})")
    try:
        pruner.prune_out_channels(module, dead)
    except Exception as exc:
        why = str(exc) if isinstance(exc, _Refused) else f"Torch-Pruning failed ({type(exc).__name__})"
        raise UnsupportedLayerError(f"cannot remove the dead units of layer {name!r}: {why}") from exc


def compact(
    model: nn.Module,
    example_inputs,
    *,
    min_width: int = 1,
    verify: bool = True,
    rtol: float | None = None,
    narrow_streams: bool = True,
) -> nn.Module:
    """A new, gate-free, physically smaller copy of ``model`` with the same outputs.

    The copy is traced on ``example_inputs``: it supports the input shapes and the branches
    that ``example_inputs`` exercised (a gated layer they do not reach is an error; an
    input size that changes a Flatten's width needs its own compaction). Works in train or
    eval mode and under ``torch.no_grad()`` / ``torch.inference_mode()``; the caller's grad
    mode and the model's mode are left as they were. The copy is returned in eval mode,
    with plain weights where ``model`` had reparametrized ones (step 0 above).

    Args:
        model: a model instrumented by :func:`torchdam.attach` (left unchanged), or a
            ``torch.compile`` / ``DataParallel`` / DDP wrapper of one.
        example_inputs: a tensor or tuple of tensors the model accepts, or a dict of keyword
            arguments (``{"input_ids": ids}`` calls ``model(**inputs)``); used to trace the
            dependency graph and to check the result. A model whose forward takes
            ``use_cache`` runs with ``use_cache=False``; of a Hugging Face ``ModelOutput``
            the ``logits`` (else ``last_hidden_state``) are compared.
        min_width: units kept in a layer whose units all died (the kept ones output zero,
            exactly as in the gated model), so the network keeps its shapes; warns.
        verify: compare outputs with the gated model (eval mode) and raise
            :class:`CompactionError` if ``max|diff| > rtol * max(1, max|output|)``.
        rtol: that tolerance; ``None`` follows each output's dtype (:func:`default_rtol`:
            1e-5 for float32/64, ``16 * eps`` for float16/bfloat16).
        narrow_streams: remove residual-stream channels that every producer of the stream
            leaves dead (step 4 above). A narrowed result is always checked; if it differs
            from the gated model, compaction is redone with full-width streams.

    Raises:
        CompactionError (or its :class:`UnsupportedLayerError`): naming the gated layer at
        fault and why. :class:`ShapeError`: ``example_inputs`` do not fit the model.

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
    # Torch-Pruning traces through autograd: grad mode on for the copy only (restored on exit).
    with torch.inference_mode(False), torch.enable_grad():
        example_inputs = tree_map(lambda t: t.clone() if isinstance(t, Tensor) and t.is_inference() else t,
                                  example_inputs)
        reference = run_eval(source, example_inputs)
        small, narrowed = _compacted_copy(source, example_inputs, min_width, narrow_streams)
        if narrowed:
            try:
                check_equivalent(small, reference, example_inputs, rtol)
                return small
            except CompactionError:
                small, _ = _compacted_copy(source, example_inputs, min_width, False)
        if verify:
            try:
                check_equivalent(small, reference, example_inputs, rtol)
            except CompactionError as exc:
                small = _rescue(source, example_inputs, reference, rtol, min_width, exc)
    return small


def _rescue(source: nn.Module, example_inputs, reference: list[Tensor], rtol: float | None, min_width: int,
            failure: CompactionError) -> nn.Module:
    """Runs when the compacted copy differs from the gated model: some op the dependency
    graph takes for channel-wise mixes a gated layer's units (a hand-written LayerNorm over
    channels, a mean over channels). Finds the gated layers whose dead units alone cannot
    be removed exactly and compacts again with those computed only where live and
    scattered back to full width (exact: their dead units are zeros at the gate). Raises,
    naming them, if that is still not exact."""
    kept = _keep_failing_heads(source, example_inputs, reference, rtol, min_width)
    if kept is not None:
        return kept
    culprits = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folded, _ = _compacted_copy(source, example_inputs, min_width, False, only="")  # removes nothing
        try:
            check_equivalent(folded, reference, example_inputs, rtol)
        except CompactionError as exc:
            bad = _bad_fold(source, folded, example_inputs, rtol)
            if bad is None:
                raise
            raise bad from exc
        for name, _ in named_gates(source):
            try:
                check_equivalent(_compacted_copy(source, example_inputs, min_width, False, only=name)[0],
                                 reference, example_inputs, rtol)
            except CompactionError:
                culprits.add(name)
    if not culprits:
        raise failure
    small, _ = _compacted_copy(source, example_inputs, min_width, False, scatter=frozenset(culprits))
    try:
        check_equivalent(small, reference, example_inputs, rtol)
    except CompactionError as exc:
        raise CompactionError(
            f"removing the dead units of gated layer(s) {', '.join(map(repr, sorted(culprits)))} changes the "
            f"model's outputs, even when they are scattered back to full width: {exc}") from exc
    return small


def _keep_failing_heads(source: nn.Module, example_inputs, reference: list[Tensor], rtol: float | None,
                        min_width: int) -> nn.Module | None:
    """When removing dead heads is what changes the outputs (an attention module whose layout
    is not the one its :class:`~torchdam.attention.Heads` assumes: something else in it is
    per head), the compacted copy keeping every head of the modules at fault (their dead
    heads output zero, folded, as in the gated model), with a warning naming them; None when
    keeping heads does not help."""
    names = frozenset(n for n, _ in named_gates(source) if attention.heads_of(source.get_submodule(n)) is not None)
    if not names:
        return None

    def exact(keep: frozenset[str]) -> nn.Module | None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                small, _ = _compacted_copy(source, example_inputs, min_width, False, keep_heads=keep)
                check_equivalent(small, reference, example_inputs, rtol)
        except CompactionError:
            return None
        return small

    if exact(names) is None:
        return None
    culprits = frozenset(n for n in sorted(names) if exact(names - {n}) is None) or names
    small = exact(culprits)
    if small is None:
        culprits = names
        small = exact(names)
    warnings.warn(
        f"compact kept every head of {', '.join(map(repr, sorted(culprits)))}: removing their dead heads "
        "changed the outputs (the module holds something per head that torchdam does not know of); the dead "
        "heads output zero, as in the gated model. torchdam.attention.register_attention describes its heads",
        stacklevel=4)
    return small


def _frozen(model: nn.Module, tied: dict[int, list[str]]) -> dict[int, str]:
    """``{id(layer): why}`` for layers whose units must all stay: a layer sharing a
    parameter with another (tied weights; removing units from one would untie them) and
    grouped convolutions (uneven groups). Dead units coupled with them are scattered back."""
    frozen = {i: f"it shares its weight with {', '.join(map(repr, others))} (tied weights)"
              for i, others in tied.items()}
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not _is_depthwise(module):
            frozen[id(module)] = f"it is a grouped convolution (groups={module.groups})"
    return frozen


def _tied(model: nn.Module) -> dict[int, list[str]]:
    """``{id(layer): names of the other layers holding one of its parameters}``."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append((name, module))
    tied: dict[int, list[str]] = {}
    for holders in owners.values():
        for name, module in holders:
            if len(holders) > 1:
                tied.setdefault(id(module), []).extend(n for n, m in holders if m is not module)
    return tied


@contextmanager
def _quiet_shape_inference() -> Iterator[None]:
    """Torch-Pruning's shape inference gives up on some ops (a bidirectional RNN) with a bare
    "Maximum recursive depth reached!" warning; what depends on it then fails to a fallback
    or is checked, so it tells the user nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Maximum recursive depth reached")
        yield


class _RunThrough:
    """Stands in for ``torch.utils.checkpoint.CheckpointFunction`` while a graph is traced:
    runs the checkpointed function as is, so its ops are in the autograd graph Torch-Pruning
    follows (reentrant checkpointing, torch's default, hides them behind one node)."""

    @staticmethod
    def apply(function: Callable, _preserve_rng_state: bool, *args):
        return function(*args)


def _build_graph(small: nn.Module, example_inputs) -> tp.DependencyGraph:
    """Torch-Pruning's graph of ``small`` traced on ``example_inputs`` (a dict: keyword
    arguments), through model outputs such as Hugging Face's ``ModelOutput`` (the tensors of
    :func:`compared_outputs`), with rules for layer types it lacks (:data:`TP_PRUNERS`, HF
    ``Conv1D``). Activation checkpointing is run through (:class:`_RunThrough`)."""
    inputs = example_inputs if isinstance(example_inputs, Mapping) else as_tuple(example_inputs)
    try:
        with (torch.enable_grad(), _quiet_shape_inference(),
              mock.patch.object(torch.utils.checkpoint, "CheckpointFunction", _RunThrough)):
            return tp.DependencyGraph().build_dependency(
                small, example_inputs=inputs, forward_fn=call, output_transform=compared_outputs, verbose=False,
                customized_pruners={**TP_PRUNERS, **attention.customized_pruners()})
    except TorchDAMError:
        raise
    except Exception as exc:
        raise CompactionError(
            f"Torch-Pruning could not trace {type(small).__name__} on example_inputs "
            f"({type(exc).__name__}); its dependency graph finds which layers share a gated layer's units"
        ) from exc


class GroupSearchError(CompactionError):
    """Torch-Pruning could not say which layers are coupled with a layer's units: its search
    failed inside (a bidirectional GRU consumer), or did not settle, meeting the same layers
    with new index sets (grouped-query attention's ``repeat_kv``, VainF/Torch-Pruning#527,
    where it never ends). Compact then computes that layer's live units only and scatters
    them back to full width (exact), as for a residual stream."""


class _Runaway(Exception):
    pass


#: A coupled group holds each graph node a few times at most (once per index set reaching
#: it); a search past this many entries per node is one that does not end.
GROUP_ENTRIES_PER_NODE = 8


def pruning_group(dg: tp.DependencyGraph, module: nn.Module, idxs: list[int], name: str):
    """``dg.get_pruning_group`` for output units ``idxs`` of ``module`` (called ``name``),
    bounded: raises :class:`GroupSearchError` instead of searching for ever or failing inside."""
    limit = GROUP_ENTRIES_PER_NODE * len(dg.module2node) + 64

    class Bounded(tp.dependency.group.Group):
        def add_dep(self, dep, idxs) -> None:
            if len(self._group) >= limit:
                raise _Runaway
            super().add_dep(dep, idxs)

    try:
        with mock.patch.object(tp.dependency.graph, "Group", Bounded), _quiet_shape_inference():
            return dg.get_pruning_group(module, dg.get_pruner_of_module(module).prune_out_channels, idxs)
    except _Runaway:
        why = f"its search passed {limit} entries without settling"
        cause = None
    except Exception as exc:
        why, cause = f"it failed ({type(exc).__name__})", exc
    raise GroupSearchError(f"Torch-Pruning could not find the layers coupled with {name!r}: {why}") from cause


def _group(dg: tp.DependencyGraph, module: nn.Module, name: str, idxs: list[int]):
    """Torch-Pruning's group of layers coupled with output units ``idxs`` of ``module``."""
    pruner = dg.get_pruner_of_module(module)
    if pruner is None:
        raise UnsupportedLayerError(
            f"cannot remove units of {name!r}: Torch-Pruning has no rule for {type(module).__name__}")
    if module not in dg.module2node:
        raise CompactionError(
            f"layer {name!r} was not reached by example_inputs; compact traces the model on them, "
            "so they must run every gated layer (pass inputs that take every branch, or detach "
            "the gates of layers they do not use)")
    return pruning_group(dg, module, idxs, name)


def _prune(group, layer: _Gated, names: dict[int, str]) -> None:
    """``group.prune()``, with any failure named after the gated layer and the coupled one."""
    for dep, idxs in group:
        try:
            dep(list(idxs))
        except Exception as exc:
            where = names.get(id(dep.target.module), type(dep.target.module).__name__)
            why = str(exc) if isinstance(exc, _Refused) else f"Torch-Pruning failed ({type(exc).__name__})"
            raise UnsupportedLayerError(
                f"cannot remove the dead units of layer {layer.name!r} from the coupled layer "
                f"{where!r}: {why}") from exc


def _bad_fold(source: nn.Module, folded: nn.Module, example_inputs, rtol: float | None) -> CompactionError | None:
    """The error naming the first gated layer (in execution order) whose folded host does
    not output what the gated host did (a wrong rule in :data:`FOLDERS`), or None."""
    outputs: dict[str, list[Tensor]] = {"gated": [], "folded": []}
    hosts = {host: name for name, host, _ in gate_paths(source)}
    handles = []
    for key, model in (("gated", source), ("folded", folded)):
        for host_name in hosts:
            module = model.get_submodule(host_name)
            handles.append(module.register_forward_hook(
                lambda m, i, o, key=key, host_name=host_name: outputs[key].append((host_name, o))))
    try:
        run_eval(source, example_inputs)
        run_eval(folded, example_inputs)
    finally:
        for h in handles:
            h.remove()
    for (host_name, ref), (_, out) in zip(outputs["gated"], outputs["folded"]):
        if isinstance(ref, Tensor) and isinstance(out, Tensor) and ref.shape == out.shape:
            tol = default_rtol(ref.dtype) if rtol is None else rtol
            if float((ref.double() - out.double()).abs().max()) > tol * max(1.0, float(ref.abs().max())):
                host = folded.get_submodule(host_name)
                return CompactionError(
                    f"folding the gate of layer {hosts[host_name]!r} into {host_name!r} ({type(host).__name__}) "
                    "does not reproduce the gated output; check the rule registered for "
                    f"{type(host).__name__} with torchdam.register_folder")
    return None


def plain_weights(model: nn.Module) -> list[str]:
    """Replace every reparametrized tensor of ``model`` by a plain parameter holding its
    current value (in place, in eval mode: spectral norm takes no power-iteration step);
    returns the names of the modules changed. Covers ``torch.nn.utils.parametrize``
    (``parametrizations.weight_norm``/``spectral_norm``/``orthogonal``...) and the forward
    pre-hook forms (``torch.nn.utils.weight_norm``, ``torch.nn.utils.prune``)."""
    from torch.nn.utils import parametrizations, parametrize, prune
    from torch.nn.utils.weight_norm import WeightNorm

    was_training = model.training
    model.eval()
    changed = []
    try:
        with torch.no_grad():
            for name, module in list(model.named_modules()):
                hooks = list(module._forward_pre_hooks.values())
                if not (parametrize.is_parametrized(module)
                        or any(isinstance(h, (WeightNorm, prune.BasePruningMethod)) for h in hooks)):
                    continue
                if parametrize.is_parametrized(module):
                    # not parametrize.remove_parametrizations: it deletes the property from the
                    # parametrized class, which a deepcopy shares with the user's model
                    values = {t: getattr(module, t) for t in module.parametrizations}
                    kinds = {t: isinstance(p.original if hasattr(p, "original") else p.original0, nn.Parameter)
                             for t, p in module.parametrizations.items()}
                    del module.parametrizations
                    module.__class__ = type(module).__bases__[0]
                    for key, hook in list(module._load_state_dict_pre_hooks.items()):
                        if getattr(getattr(hook, "hook", None), "__module__", None) == parametrizations.__name__:
                            del module._load_state_dict_pre_hooks[key]  # weight_norm's old-checkpoint reader
                    for t, value in values.items():
                        if kinds[t]:
                            module.register_parameter(t, nn.Parameter(value.detach().clone()))
                        else:
                            module.register_buffer(t, value.detach().clone())
                for hook in hooks:
                    if isinstance(hook, WeightNorm):
                        torch.nn.utils.remove_weight_norm(module, hook.name)
                    elif isinstance(hook, prune.BasePruningMethod):
                        prune.remove(module, hook._tensor_name)
                changed.append(name)
    finally:
        model.train(was_training)
    return changed


def _compacted_copy(source: nn.Module, example_inputs, min_width: int, narrow_streams: bool,
                    only: str | None = None, scatter: frozenset[str] = frozenset(),
                    keep_heads: frozenset[str] = frozenset()) -> tuple[nn.Module, bool]:
    """The compacted copy of ``source`` (unchecked), and whether a stream was narrowed
    (``only``: remove the dead units of that gated layer alone; ``scatter``: gated layers
    to scatter back to full width whatever their consumers; ``keep_heads``: attention
    modules whose head gates are folded but whose dead heads stay)."""
    try:
        small = copy.deepcopy(source).eval()
    except Exception as exc:
        raise CompactionError(f"compact works on a copy, and copy.deepcopy({type(source).__name__}) failed "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    plain_weights(small)
    tied = _tied(small)
    with torch.no_grad():
        heads = [h for h in attention.take_head_gates(small, min_width) if h.name not in keep_heads]
        gated = _collect(small, min_width, tied, only)
    attention.keep_nested_tensors_off(small)
    detach(small)
    for p in small.parameters():
        p.requires_grad_(True)
    names = {id(m): n for n, m in small.named_modules()}
    frozen = _frozen(small, tied)
    if not gated:  # only attention heads: local surgery, no graph needed
        attention.remove_heads(small, heads)
        return _finished(small), False
    dg = _build_graph(small, example_inputs)
    shared = attention.shared_units(small)
    # 1. Which layers lose their dead units everywhere, and which are scattered back.
    removable: list[tuple[_Gated, dict[nn.Module, list[int]]]] = []
    stream = []
    for layer in gated:
        for module, name in ((layer.producer, layer.name), (layer.host, layer.host_name)):
            if module not in dg.module2node and dg.get_pruner_of_module(module) is not None:
                _group(dg, module, name, [])  # raises: not reached
        if not layer.dead:
            continue
        try:
            consumers = _consumers(dg, _group(dg, layer.producer, layer.name, layer.dead), layer, frozen,
                                   shared.get(id(layer.producer), frozenset()))
        except GroupSearchError:
            consumers = None  # its coupled layers are unknown: computed narrow, scattered back
        if consumers is None or layer.name in scatter:
            stream.append(layer)
        else:
            removable.append((layer, consumers))
    # 2. A dead unit that a norm or bias turns into a constant before its consumers goes
    #    into their bias (all measured before any layer changes).
    inputs = _input_values(small, example_inputs, [m for _, c in removable for m in c])
    with torch.no_grad():
        compensated = [layer for layer, consumers in removable if _compensate(consumers, inputs)]
    stream += [layer for layer, _ in removable if layer not in compensated]
    for layer in compensated:
        _prune(_group(dg, layer.producer, layer.name, layer.dead), layer, names)
    removed = _narrow_streams(dg, stream, frozen, names) if narrow_streams else {}
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
    return _finished(small), bool(removed)


def _finished(small: nn.Module) -> nn.Module:
    """The compacted copy as handed out: eval mode, no parameter requiring grad."""
    for p in small.parameters():
        p.requires_grad_(False)
    return small.eval()


def default_rtol(dtype: torch.dtype) -> float:
    """Tolerance of :func:`compact`'s check for outputs of ``dtype``: folding a gate into
    the weights rounds differently from scaling the output, by a few ulps per layer."""
    if not dtype.is_floating_point:
        return 0.0
    return max(1e-5, 16 * torch.finfo(dtype).eps)


def check_equivalent(small: nn.Module, reference: list[Tensor], example_inputs, rtol: float | None = None) -> float:
    """Max abs difference between ``small``'s outputs and ``reference``; raises past tolerance
    (``rtol * max(1, max|output|)``; ``rtol=None``: :func:`default_rtol` of each output)."""
    try:
        got = run_eval(small, example_inputs)
    except ShapeError as exc:
        raise CompactionError(f"the compacted model no longer runs: {exc}") from exc
    worst = 0.0
    for ref, out in zip(reference, got, strict=True):
        if ref.shape != out.shape:
            raise CompactionError(f"compaction changed an output shape {tuple(ref.shape)} -> {tuple(out.shape)}")
        tol = default_rtol(ref.dtype) if rtol is None else rtol
        scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
        diff = float((ref.double() - out.double()).abs().max()) if ref.numel() else 0.0
        if diff > tol * scale:
            low_precision = ref.dtype.is_floating_point and torch.finfo(ref.dtype).eps > 1e-6
            raise CompactionError(
                f"compacted outputs differ from the gated model by {diff:.3g} (tolerance {tol * scale:.3g}); "
                + (f"in {ref.dtype} the folded weights round differently from the gated forward: pass a "
                   "larger rtol, or compact the float32 model and convert the result"
                   if low_precision else
                   "a gated layer's dead units do not reach its consumers as zeros, or an op between mixes "
                   "them with live units (e.g. a norm or a mean over channels after the gate that attach "
                   "did not see); exclude that layer from attach"))
        worst = max(worst, diff)
    return worst
