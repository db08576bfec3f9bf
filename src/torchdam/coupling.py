"""Which layers share a gated layer's units, from Torch-Pruning's dependency graph.

Removing a layer's output units means removing them from every layer coupled with them:
its BatchNorm, its consumers' inputs, through a Flatten's index map, a concat, a residual
add. Torch-Pruning's graph, traced from example inputs, knows these couplings for PyTorch's
op set; this module holds what torchdam adds to it and asks of it, shared by
:func:`torchdam.compact` (which removes the units) and :class:`torchdam.budget.WidthModel`
(which prices removing them): rules for layer types Torch-Pruning lacks
(:data:`TP_PRUNERS`), a bounded group search (:func:`pruning_group`), which consumers can
lose a dead unit exactly (:func:`consumer_inputs`, :func:`bias_deltas`), which gated layers
write one residual stream (:func:`stream_members`) and which layers must keep their width
(:func:`frozen_layers`, :func:`tied_layers`).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

import torch
import torch.utils.checkpoint
import torch_pruning as tp
from torch import Tensor, nn

from torchdam import pyg
from torchdam.attach import LINEAR_LIKE
from torchdam.calling import as_tuple, call, compared_outputs
from torchdam.errors import CompactionError, TorchDAMError, UnsupportedLayerError


class _RecurrentPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning rule for RNN/GRU/LSTM consumers: removes input features from the
    first layer's input weights. Their hidden units are not removed (Torch-Pruning has no
    GRU/RNN rule, and its LSTM output rule does not keep the four gates' blocks aligned)."""

    TARGET_MODULES = nn.RNNBase

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise Refused(f"the hidden units of a {type(layer).__name__} cannot be removed")

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
    """Torch-Pruning's GroupNorm rule keeps ``num_groups``; ours removes channels in whole
    groups only and drops those groups (the others' statistics are unchanged). Removing part
    of a group would change its statistics: refused (compact scatters the units back to full
    width before it)."""

    TARGET_MODULES = nn.GroupNorm

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        per, gone = layer.num_channels // layer.num_groups, set(idxs)
        groups = {i // per for i in gone}
        if len(gone) != per * len(groups):
            raise Refused(f"GroupNorm({layer.num_groups}, {layer.num_channels}) normalises {per} channels "
                          "together and would lose part of a group")
        keep = [i for i in range(layer.num_channels) if i not in gone]
        layer.num_channels, layer.num_groups = len(keep), layer.num_groups - len(groups)
        if layer.affine:
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.num_channels

    get_in_channels = get_out_channels


class Refused(Exception):
    """A Torch-Pruning rule of ours declined to remove these units (message: why)."""


#: module type -> Torch-Pruning pruner that :func:`compact` adds to or replaces in
#: Torch-Pruning's own table when it builds the dependency graph.
TP_PRUNERS: dict[type, tp.pruner.BasePruningFunc] = {
    nn.RNN: _RecurrentPruner(),
    nn.GRU: _RecurrentPruner(),
    nn.LSTM: _RecurrentPruner(),
    nn.GroupNorm: _GroupNormPruner(),
}


@dataclass
class GatedLayer:
    """A gated layer as compaction sees it: its producer (the gated layer) and host (the
    module carrying the gate: the producer or its per-unit norm), the units' axis, and which
    of its ``total`` units stay (``keep``) and go (``dead``)."""

    name: str
    producer: nn.Module
    host_name: str
    host: nn.Module
    axis: int
    total: int
    keep: list[int]
    dead: list[int]


#: Torch-Pruning node types that are ops on tensors, not layers (their "pruning" only
#: updates index bookkeeping): relu/add/pooling, view/flatten, cat/split, slices, ...
_TENSOR_OPS = frozenset({
    tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.RESHAPE, tp.ops.OPTYPE.CONCAT, tp.ops.OPTYPE.SPLIT,
    tp.ops.OPTYPE.UNBIND, tp.ops.OPTYPE.EXPAND, tp.ops.OPTYPE.SLICE,
})


def is_depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed
            and module.groups == module.in_channels == module.out_channels > 1)


def channelwise(module: nn.Module) -> bool:
    """Layers whose output unit j depends on input unit j only (exactly: a dead, all-zero
    unit gives a constant there, the same at every position and for every sample)."""
    if isinstance(module, nn.GroupNorm):
        return module.num_groups == module.num_channels
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.PReLU)) or is_depthwise(module)


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
            elif not channelwise(out.module):
                continue
            seen.add(id(out))
            stack.append(out)
    return seen


def _writers(dg: tp.DependencyGraph, host: nn.Module) -> set[int]:
    """Ids of the layers whose outputs reach ``host``'s input through tensor ops alone (an
    add, a broadcast's unsqueeze): diffusers' ``conv1`` and time embedding before ``norm2``.
    What they write into the host's dead units ends there (the gate acts after the host)."""
    start = dg.module2node[host]
    seen, stack, found = {id(start)}, [start], set()
    while stack:
        node = stack.pop()
        for src in node.inputs:
            if id(src) in seen:
                continue
            seen.add(id(src))
            if src.type in _TENSOR_OPS:
                stack.append(src)
            else:
                found.add(id(src))
    return found


def plain_idxs(idxs) -> list[int]:
    return [int(i) for i in tp._helpers.to_plain_idxs(list(idxs))]


def consumer_inputs(dg: tp.DependencyGraph, group, layer: GatedLayer, frozen: dict[int, str],
               partners: frozenset[int] = frozenset()) -> dict[nn.Module, list[int]] | None:
    """``{consumer layer: its input units to remove}`` when removing the dead units from
    every coupled layer can be exact (after bias compensation, see
    :func:`torchdam.compact._compensate`);
    None when they must be scattered back to full width instead:

    - they are coupled with other layers' outputs (a residual stream) or pass through a
      layer that mixes units (LayerNorm, GroupNorm over several channels, a grouped conv);
      the other writers into a host norm's input are not others (the units die after it);
    - a coupled layer must keep its width (``frozen``: tied weights, grouped convs);
    - nothing consumes them (they are the model's output).

    ``partners``: ids of layers whose outputs are multiplied with the producer's (Llama's
    ``gate_proj`` beside a gated ``up_proj``): zeros times anything stay zero, so removing
    the units from them too is exact.
    """
    own = {id(dg.module2node[layer.producer]), id(dg.module2node[layer.host])}
    passing = _downstream(dg, layer.host) | own
    if layer.host is not layer.producer:  # a norm after an add: every writer into it loses the units
        passing |= _writers(dg, layer.host)
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
            units = plain_idxs(idxs)
            pruner = dg.get_pruner_of_module(module)
            width = pruner.get_in_channels(module) if pruner is not None else None
            if width is not None and max(units, default=-1) >= width:
                return None  # the graph's index map does not fit the layer (a fused qkv's reshape)
            consumers[module] = units
    return consumers or None


def input_values(model: nn.Module, example_inputs, modules: list[nn.Module]) -> dict[nn.Module, Tensor | None]:
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
    linear_like = isinstance(module, tuple(LINEAR_LIKE))  # HF Conv1D, PyG: units on the last axis
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
    if isinstance(module, pyg.layer_types()):  # a graph conv's aggregation weighs nodes unequally
        return None if pyg.is_graph_conv(module) else module.weight[:, idxs] @ c
    if isinstance(module, nn.Linear):
        return module.weight[:, idxs] @ c
    if linear_like:  # HF Conv1D: weight (in, out) (PyG's layers are above)
        return module.weight[idxs].T @ c
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups == 1 and (
            module.padding == "valid" or not isinstance(module.padding, str) and not any(module.padding)):
        return module.weight[:, idxs].flatten(2).sum(2) @ c  # every output sees the whole kernel
    return None


#: consumer type -> axis of the units in its input (for :func:`_bias_delta`).
_INPUT_AXIS: dict[type, int] = {nn.Linear: -1, nn.RNNBase: -1, nn.modules.conv._ConvNd: 1}


def bias_deltas(consumers: dict[nn.Module, list[int]],
                 inputs: dict[nn.Module, Tensor | None]) -> dict[nn.Module, Tensor] | None:
    """What each consumer's bias must gain when its input units ``consumers[m]`` are removed
    (:func:`_bias_delta`), or None when some consumer cannot take it. The one rule deciding
    between removal and scattering back, shared with :class:`torchdam.budget.WidthModel`."""
    deltas = {m: _bias_delta(m, inputs.get(m), idxs) for m, idxs in consumers.items()}
    return None if any(d is None for d in deltas.values()) else deltas


#: Torch-Pruning node types a narrowed stream may pass through besides its producers,
#: their BatchNorms and its consumers (``relu``/``add``/pooling and ``flatten``).
_STREAM_OPS = (tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.RESHAPE)


def stream_members(dg: tp.DependencyGraph, layer: GatedLayer, by_module: dict[int, GatedLayer],
                    frozen: dict[int, str]) -> list[GatedLayer] | None:
    """The gated layers writing into ``layer``'s residual stream, or None when the stream
    cannot be narrowed: an ungated producer, a BatchNorm that hosts none of their gates
    (pre-activation), an op that remaps channels (concat, split, ...), a producer of
    another width, a layer that must keep its width (``frozen``), or no consumer."""
    try:
        group = pruning_group(dg, layer.producer, layer.dead, layer.name)
    except GroupSearchError:
        return None
    members: dict[int, GatedLayer] = {}
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
        if member is None or member.total != layer.total or sorted(plain_idxs(idxs)) != layer.dead:
            return None  # ungated producer, foreign BatchNorm, or not an identity channel map
        members[id(member)] = member
    return list(members.values()) if consumers else None


def frozen_layers(model: nn.Module, tied: dict[int, list[str]]) -> dict[int, str]:
    """``{id(layer): why}`` for layers whose units must all stay: a layer sharing a
    parameter with another (tied weights; removing units from one would untie them) and
    grouped convolutions (uneven groups). Dead units coupled with them are scattered back."""
    frozen = {i: f"it shares its weight with {', '.join(map(repr, others))} (tied weights)"
              for i, others in tied.items()}
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not is_depthwise(module):
            frozen[id(module)] = f"it is a grouped convolution (groups={module.groups})"
    return frozen


def tied_layers(model: nn.Module) -> dict[int, list[str]]:
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


def build_graph(small: nn.Module, example_inputs) -> tp.DependencyGraph:
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
                customized_pruners=dict(TP_PRUNERS))
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


def coupled_group(dg: tp.DependencyGraph, module: nn.Module, name: str, idxs: list[int]):
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
