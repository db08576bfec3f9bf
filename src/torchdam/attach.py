"""Instrument any model with DAM gates, reversibly, without editing its class.

Like ``torch.nn.utils.prune``, :func:`attach` adds state and behaviour to existing
submodules: the gate becomes the child ``dam_gate`` of the module whose output it scales,
so the model's own parameter names are unchanged and ``state_dict`` simply gains
``<layer>.dam_gate.beta``. :func:`torchdam.compact` makes it permanent in a new module.

How the gate is applied is chosen per host type (:data:`GATED_FORWARDS`) for speed: a
BatchNorm host scales its affine (``weight*g, bias*g``), so the gate costs only ``n``-sized
ops; a Linear host scales its weight rows when the weight is smaller than the output,
otherwise its output; a Conv host scales its output. These replace the host's ``forward`` on the instance only (its class
is untouched). Any other host type gets a forward hook that scales its output.

Transformers (:mod:`torchdam.attention`): an attention module's gate has one unit per head and
acts on its output projection's input; fused kernels that would skip gates are turned off.
"""
from __future__ import annotations

import fnmatch
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchdam.errors import AttachError, ConfigError
from torchdam.gates import DAMGate

Selector = Union[type, str]

#: Layers whose output units we know how to count (and later compact), with their unit
#: count and unit axis. Extend it to gate another layer type.
UNIT_LAYERS: dict[type, tuple[str | Callable[[nn.Module], int], int]] = {
    nn.Linear: ("out_features", -1),
    nn.Conv1d: ("out_channels", 1),
    nn.Conv2d: ("out_channels", 1),
    nn.Conv3d: ("out_channels", 1),
    nn.BatchNorm1d: ("num_features", 1),
    nn.BatchNorm2d: ("num_features", 1),
    nn.BatchNorm3d: ("num_features", 1),
    # Transposed convs (decoders, U-Nets): weight (in, out/groups, ...), units on dim 1.
    nn.ConvTranspose1d: ("out_channels", 1),
    nn.ConvTranspose2d: ("out_channels", 1),
    nn.ConvTranspose3d: ("out_channels", 1),
    # Per-channel norms, as hosts of the gate of the layer they follow (see FOLLOWING_NORMS).
    nn.GroupNorm: ("num_channels", 1),
    nn.InstanceNorm1d: ("num_features", 1),
    nn.InstanceNorm2d: ("num_features", 1),
    nn.InstanceNorm3d: ("num_features", 1),
    # Token embeddings: units are the embedding features (last axis). Gated only when
    # selected explicitly (by type or exact name), never by the default or a glob.
    nn.Embedding: ("embedding_dim", -1),
}
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
GATE_ATTR = "dam_gate"
#: Layer types an ``nn.Linear`` selector also selects (linear layers of other libraries:
#: Hugging Face's ``Conv1D``, registered by :mod:`torchdam.attention` once transformers is loaded).
LINEAR_LIKE: list[type] = []


class GateHook:
    """Base of the hooks :func:`attach` puts on modules other than a gate's host (an
    attention module's output projection, a block whose fused kernel would skip its gates);
    :func:`detach` calls ``undo(module)`` and removes every one."""

    def undo(self, module: nn.Module) -> None:
        """Restore what installing the hook changed on ``module`` (nothing by default)."""


#: What ``attach(model)`` gates when ``layers`` is not given: every Linear and every
#: (transposed) convolution, except the model's output layer and grouped convolutions.
DEFAULT_LAYERS: tuple[type, ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)

#: Layers a name glob or a type selector other than their own never selects: they are not
#: the weight layers a glob like ``"features.*"`` means (norms host the gate of the layer
#: before them; embeddings are gated only by type or exact name).
_EXPLICIT_ONLY: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.Embedding)

#: norm type -> ``fn(norm, units)``: True when the norm normalises each of the ``units``
#: on its own or in groups of them, so a gate may act after it (dead units stay exactly zero
#: and can be removed from the layer, the norm and every consumer: a GroupNorm's in whole
#: groups, see :func:`unit_group`). A norm over all units together (``LayerNorm``,
#: ``GroupNorm(1)``) is not listed or returns False: the gate then stays on the layer's
#: output, before the norm, and :func:`torchdam.compact` computes only the live units but
#: scatters them back to full width for the norm, whose statistics need every unit.
FOLLOWING_NORMS: dict[type, Callable[[nn.Module, int], bool]] = {
    nn.BatchNorm1d: lambda m, n: m.num_features == n,
    nn.BatchNorm2d: lambda m, n: m.num_features == n,
    nn.BatchNorm3d: lambda m, n: m.num_features == n,
    nn.InstanceNorm1d: lambda m, n: m.num_features == n,
    nn.InstanceNorm2d: lambda m, n: m.num_features == n,
    nn.InstanceNorm3d: lambda m, n: m.num_features == n,
    nn.GroupNorm: lambda m, n: m.num_channels == n and m.num_groups > 1,
}


#: layer type -> ``fn(layer)``: how many consecutive output units form one, sharing one DAM
#: offset so that they switch off together (a graph attention conv's heads, :mod:`torchdam.pyg`)
UNIT_GROUPS: dict[type, Callable[[nn.Module], int]] = {}


def unit_group(host: nn.Module) -> int:
    """How many consecutive units of a gate's host leave together: a GroupNorm's channels per
    group (DAM's units die from index 0 up, so its dead units fill whole groups one after
    another; a group is removed once all of its units are dead), a :data:`UNIT_GROUPS`
    layer's groups, 1 for any other host."""
    if isinstance(host, nn.GroupNorm):
        return host.num_channels // host.num_groups
    fn = next((UNIT_GROUPS[c] for c in type(host).__mro__ if c in UNIT_GROUPS), None)
    return int(fn(host)) if fn is not None else 1


#: block type -> ``fn(block, child)``: the name of the norm that normalises child ``child``'s
#: output in ``block``'s forward when it is not the next registered sibling (diffusers'
#: ResNet block: ``norm2`` after ``conv1``, with the time embedding's Linear registered
#: between them); None: the registration order decides
FOLLOWED_BY: dict[type, Callable[[nn.Module, str], str | None]] = {}


def _grouped_conv_reason(module: nn.modules.conv._ConvNd) -> str | None:
    if module.groups == 1:
        return None
    if module.groups == module.in_channels == module.out_channels:
        return (f"it is a depthwise convolution (groups={module.groups}): each output channel is its "
                "input channel's, so its units die with the layer producing its input; gate that layer "
                "(compact then removes the same channels here)")
    return (f"it is a grouped convolution (groups={module.groups}): DAM kills units from index 0 up, "
            "which would leave its groups unequal; gate the layers around it instead")


#: type -> ``fn(module)``: why this layer cannot carry a gate (``None``: it can). Default
#: attach and globs skip such layers silently; an exact name raises with the reason.
UNGATEABLE: dict[type, Callable[[nn.Module], str | None]] = {
    nn.modules.conv._ConvNd: _grouped_conv_reason,
}


def _ungateable_reason(module: nn.Module) -> str | None:
    for cls in type(module).__mro__:
        if cls in UNGATEABLE:
            return UNGATEABLE[cls](module)
    return None


def register_unit_layer(
    layer_type: type,
    units: str | Callable[[nn.Module], int],
    axis: int = 1,
    *,
    fold: Callable[[nn.Module, Tensor], None] | None = None,
) -> None:
    """Teach :func:`attach` to gate ``layer_type``: ``units`` names its attribute holding
    the unit count and ``axis`` the units' axis in its output (1 for ``N, C, ...`` maps, -1
    for features last). ``fold(module, g)`` scales its output units by ``g`` in place, so
    that :func:`torchdam.compact` can fold the gate into it (else register one later with
    :func:`torchdam.register_folder`). The gate is applied by a forward hook."""
    UNIT_LAYERS[layer_type] = (units, axis)
    if fold is not None:
        from torchdam.compact import register_folder

        register_folder(layer_type, fold)


def register_library_linear(
    layer_type: type,
    units: str | Callable[[nn.Module], int],
    fold: Callable[[nn.Module, Tensor], None],
    pruner: object,
    *,
    forward: Callable[[nn.Module, DAMGate, Tensor], Tensor] | None = None,
    refuses: Callable[[nn.Module], str | None] | None = None,
) -> None:
    """Teach attach, compact and budgets another library's layer that works like a Linear
    (units on the last axis; HF ``Conv1D``, peft's LoRA Linear, PyG's layers): its unit
    count, folding rule, Torch-Pruning rule (``pruner``, for
    :data:`torchdam.coupling.TP_PRUNERS`), optionally a fused gated ``forward``
    (:data:`GATED_FORWARDS`) and why an instance cannot be gated (:data:`UNGATEABLE`). An
    ``nn.Linear`` selector selects it. A no-op when the type is registered already."""
    from torchdam.coupling import TP_PRUNERS

    if layer_type in UNIT_LAYERS:
        return
    register_unit_layer(layer_type, units, -1, fold=fold)
    if pruner is not None:
        TP_PRUNERS[layer_type] = pruner
    if forward is not None:
        GATED_FORWARDS[layer_type] = forward
    if refuses is not None:
        UNGATEABLE[layer_type] = refuses
    if layer_type not in LINEAR_LIKE:
        LINEAR_LIKE.append(layer_type)


def _unit_rule(cls: type) -> tuple[str | Callable[[nn.Module], int], int] | None:
    return next((UNIT_LAYERS[c] for c in cls.__mro__ if c in UNIT_LAYERS), None)


def _units(module: nn.Module) -> tuple[int, int]:
    rule = _unit_rule(type(module))
    if rule is not None:
        count = rule[0](module) if callable(rule[0]) else getattr(module, rule[0])
        return int(count), rule[1]
    raise _cannot_gate(type(module))


def _cannot_gate(cls: type, name: str | None = None) -> AttachError:
    return AttachError(
        f"cannot gate {'layer ' + repr(name) + ', ' if name else ''}a {cls.__name__}: its unit count is unknown; "
        f"gate one of {', '.join(c.__name__ for c in UNIT_LAYERS)} or register it with "
        "torchdam.register_unit_layer(type, units_attribute, axis)"
    )


def _matches(name: str, module: nn.Module, selectors: Iterable[Selector]) -> bool:
    for s in selectors:
        if isinstance(s, type):
            if isinstance(module, s) or (s is nn.Linear and isinstance(module, tuple(LINEAR_LIKE))):
                return True
        elif isinstance(s, str):
            if name == s or fnmatch.fnmatchcase(name, s):
                return True
        else:
            raise ConfigError(f"layer selectors are nn.Module types or name globs, got {s!r}")
    return False


def apply_gate(module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
    """The forward hook of a gated host without a fused forward: ``gate(output)``."""
    return getattr(module, GATE_ATTR)(output)


def _gate_values(gate: DAMGate, dtype: torch.dtype) -> Tensor:
    g = gate.mask()
    return g if g.dtype == dtype else g.to(dtype)


def _gated_linear(module: nn.Linear, gate: DAMGate, x: Tensor) -> Tensor:
    g = _gate_values(gate, module.weight.dtype)
    if module.weight.numel() < x.numel() // module.in_features * module.out_features:
        bias = None if module.bias is None else module.bias * g
        return F.linear(x, module.weight * g.unsqueeze(1), bias)
    return F.linear(x, module.weight, module.bias) * g


def _gated_conv(module: nn.modules.conv._ConvNd, gate: DAMGate, x: Tensor) -> Tensor:
    # (C, 1, ...) broadcasts over batched and unbatched outputs alike. Scaling the (usually
    # far smaller) weight instead would be cheaper but rounds differently from the hook.
    g = _gate_values(gate, module.weight.dtype).view([-1] + [1] * len(module.kernel_size))
    return module._conv_forward(x, module.weight, module.bias) * g


def _gated_batch_norm(bn: nn.modules.batchnorm._BatchNorm, gate: DAMGate, x: Tensor) -> Tensor:
    """``_BatchNorm.forward`` with the affine scaled by g: ``g*(w*xhat + b)`` at the cost
    of two ``n``-sized multiplies; running statistics are updated exactly as BN's own."""
    bn._check_input_dim(x)
    g = _gate_values(gate, x.dtype if bn.weight is None else bn.weight.dtype)
    weight = g if bn.weight is None else bn.weight * g
    bias = None if bn.bias is None else bn.bias * g
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return F.batch_norm(
        x, bn.running_mean if track else None, bn.running_var if track else None,
        weight, bias, use_batch_stats, momentum, bn.eps,
    )


#: host type -> ``fn(host, gate, x)`` computing the host's gated output in one go. Exact
#: types only: a subclass may override ``forward``, so it gets the generic forward hook.
GATED_FORWARDS: dict[type, Callable[[nn.Module, DAMGate, Tensor], Tensor]] = {
    nn.Linear: _gated_linear,
    nn.Conv1d: _gated_conv,
    nn.Conv2d: _gated_conv,
    nn.Conv3d: _gated_conv,
    nn.BatchNorm1d: _gated_batch_norm,
    nn.BatchNorm2d: _gated_batch_norm,
    nn.BatchNorm3d: _gated_batch_norm,
}


class GatedForward:
    """The ``forward`` that :func:`attach` sets on a host instance (see
    :data:`GATED_FORWARDS`); :func:`detach` deletes it, restoring the class's forward.
    A plain object holding its host, so ``copy.deepcopy`` rebinds it to the copy."""

    def __init__(self, host: nn.Module, fn: Callable[[nn.Module, DAMGate, Tensor], Tensor]) -> None:
        self.host, self.fn = host, fn

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(self.host, getattr(self.host, GATE_ATTR), x)


def _following_norm(model: nn.Module, name: str, module: nn.Module) -> tuple[str, nn.Module] | None:
    """The BatchNorm registered right after ``module`` in its parent, if it normalises the
    same units. Gating after that norm makes a dead unit's output exactly zero; gated
    before it, BN would turn the zeros into its bias and the unit would not be dead.
    A GroupNorm over several channels per group follows convolutions only: registered after
    a Linear it is most often elsewhere in the forward (diffusers' ResNet block registers its
    time-embedding Linear just before the GroupNorm of the conv's output)."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    rule = FOLLOWED_BY.get(type(parent))
    norm = rule(parent, attr) if rule is not None else None
    if norm is not None:
        nxt = getattr(parent, norm)
        per_unit = next((FOLLOWING_NORMS[c] for c in type(nxt).__mro__ if c in FOLLOWING_NORMS), None)
        if per_unit is not None and per_unit(nxt, _units(module)[0]):
            return (f"{parent_name}.{norm}" if parent_name else norm), nxt
    children = list(parent.named_children())
    for i, (child_name, child) in enumerate(children[:-1]):
        if child_name == attr and child is module:
            nxt_name, nxt = children[i + 1]
            per_unit = next((FOLLOWING_NORMS[c] for c in type(nxt).__mro__ if c in FOLLOWING_NORMS), None)
            n, axis = _units(module)
            if per_unit is not None and per_unit(nxt, n) and (axis == 1 or unit_group(nxt) == 1):
                return (f"{parent_name}.{nxt_name}" if parent_name else nxt_name), nxt
    return None


def _leaf_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers with units, outermost only (a PyG graph conv, not the Linear inside it)."""
    found: list[tuple[str, nn.Module]] = []
    for n, m in model.named_modules():
        inside = found and n.startswith(found[-1][0] + ".")
        if _unit_rule(type(m)) is not None and not isinstance(m, _EXPLICIT_ONLY) and not inside:
            found.append((n, m))
    return found


def _selected_by(name: str, module: nn.Module, selectors: tuple[Selector, ...]) -> str | None:
    """How ``selectors`` pick ``module``: ``"name"`` (an exact qualified name: must be
    gateable), ``"glob"`` or ``"type"`` (pick the gateable layers among those matched), or None."""
    how = None
    for s in selectors:
        if isinstance(s, type):
            linear_like = s is nn.Linear and isinstance(module, tuple(LINEAR_LIKE))
            if ((isinstance(module, s) or linear_like)
                    and (not isinstance(module, _EXPLICIT_ONLY) or issubclass(s, _EXPLICIT_ONLY))):
                how = how or "type"
        elif isinstance(s, str):
            if name == s:
                return "name"
            if any(c in s for c in "*?[") and fnmatch.fnmatchcase(name, s) and not isinstance(module, _EXPLICIT_ONLY):
                how = "glob"
        else:
            raise ConfigError(f"layer selectors are nn.Module types or name globs, got {s!r}")
    return how


@dataclass(frozen=True)
class Site:
    """Where one gate goes: ``name`` is the layer producing the units, ``host`` the module
    whose output the gate scales (the producer, or the per-unit norm right after it), ``units``
    their number and ``axis`` their axis (``None``: dim 1 of ``N, C, ...``, else the last)."""

    name: str
    host: str
    units: int
    axis: int | None
    #: ``"units"`` (a layer's output units) or ``"heads"`` (an attention module's heads: the
    #: gate scales ``x.unflatten(-1, (units, width))`` of its output projection's input on axis -2)
    kind: str = "units"
    #: consecutive units sharing one offset (:data:`UNIT_GROUPS`)
    group: int = 1


#: wrappers whose ``.module`` is the user's model (an EMA / SWA average holds a copy of it)
MODULE_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel, torch.optim.swa_utils.AveragedModel)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside torch.compile / DDP / DataParallel / AveragedModel wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (model.module if isinstance(model, MODULE_WRAPPERS) else None)
        if inner is None:
            return model
        model = inner


def plan(
    model: nn.Module,
    layers: Iterable[Selector] = DEFAULT_LAYERS,
    exclude: Iterable[Selector] = (),
    *,
    include_output: bool = False,
    after_norm: bool = True,
    heads: bool = True,
) -> dict[str, Site]:
    """Where :func:`attach` would put gates, without changing ``model``.

    Arguments as in :func:`attach`; returns ``{layer name: Site}`` in registration order.
    Other methods (L0, ChipNet, any per-unit mask) use it to act on the same units as DAM.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        >>> plan(net)["0"].host
        '1'
    """
    from torchdam import attention, lora, pyg

    model = unwrap(model)
    if isinstance(model, torch.jit.ScriptModule):
        raise AttachError("a TorchScript module cannot be gated (its forward is compiled): attach the "
                          "nn.Module, then script the compacted model")
    layers, exclude = tuple(layers), tuple(exclude)
    if not layers:
        raise AttachError("attach needs at least one layer type or name in `layers`")
    head_sites, not_by_type = attention.scan(model, heads)
    named = tuple(s for s in layers if isinstance(s, str))
    for s in layers:  # a type selector naming a type we cannot gate is a mistake, not a filter
        if (isinstance(s, type) and _unit_rule(s) is None and s not in attention.attention_types()
                and any(isinstance(m, s) for m in model.modules())):
            raise _cannot_gate(s)
    leaves = _leaf_layers(model)
    output_name = leaves[-1][0] if leaves else None
    sites: dict[str, Site] = {}
    hosts: dict[str, str] = {}  # host name -> name of the layer whose gate it carries
    single: list[str] = []  # layers of one unit a type or glob matched
    for name, module in model.named_modules():
        if name in head_sites:
            if _matches(name, module, exclude):
                continue
            if isinstance(getattr(module, GATE_ATTR, None), nn.Module):
                raise AttachError(f"attention {name!r} already has a DAM gate; call torchdam.detach(model) first")
            sites[name] = head_sites[name]
            continue
        how = _selected_by(name, module, layers) if name else None
        if how is None or _matches(name, module, exclude):
            continue
        if name in not_by_type and not _matches(name, module, named):
            continue  # an attention projection, a residual-stream writer (torchdam.attention.NOT_GATED)
        if name == output_name and not include_output:
            continue
        gateable = _unit_rule(type(module)) is not None
        reason = _ungateable_reason(module) if gateable else None
        if how != "name" and (not gateable or reason is not None or name in hosts):
            continue  # globs and types pick the gateable layers among those they match
        if not gateable:
            raise _cannot_gate(type(module), name)
        if reason is not None:
            raise AttachError(f"cannot gate layer {name!r}: {reason}")
        if name in hosts:
            raise AttachError(f"layer {name!r} already carries the gate of {hosts[name]!r} (the gate acts "
                              "after the norm that follows a gated layer); select only one of them")
        n, axis = _units(module)
        if n == 1 and how != "name":
            single.append(name)
            continue  # one unit (a scalar score or gate, MoE's shared-expert gate): nothing to remove
        host, host_name = module, name
        if after_norm and not isinstance(module, _EXPLICIT_ONLY):
            found = _following_norm(model, name, module)
            if found is not None:
                host_name, host = found
        if any(isinstance(getattr(m, GATE_ATTR, None), nn.Module) for m in (module, host)):
            raise AttachError(f"layer {name!r} already has a DAM gate; call torchdam.detach(model) first")
        sites[name] = Site(name, host_name, n, axis, group=unit_group(module) if type(module) in UNIT_GROUPS else 1)
        hosts[host_name] = name
    if not sites:
        what = ", ".join(s.__name__ if isinstance(s, type) else repr(s) for s in layers)
        raise AttachError(
            f"attach matched no layer of {type(model).__name__} for layers=({what})"
            + (" after exclusions" if exclude else "")
            + ("; the only match is the output layer (pass include_output=True to gate it)"
               if output_name and output_name not in not_by_type
               and _matches(output_name, model.get_submodule(output_name), layers) else "")
            + (f"; layers of one unit are gated only by name ({', '.join(map(repr, single[:3]))})" if single else "")
            + pyg.unsupported(model) + lora.unsupported(model)
        )
    return sites


def attach(
    model: nn.Module,
    layers: Iterable[Selector] = DEFAULT_LAYERS,
    exclude: Iterable[Selector] = (),
    *,
    include_output: bool = False,
    after_norm: bool = True,
    gate: str = "relu_tanh",
    k: float = 5.0,
    beta_init: float | None = None,
    alpha: float = 1.0,
    make_gate: Callable[[Site], nn.Module] | None = None,
    fused: bool = True,
    heads: bool = True,
) -> dict[str, nn.Module]:
    """Put a DAM gate on the output of every matching submodule of ``model`` (in place).

    What the defaults gate:

    - every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d``
      (:data:`DEFAULT_LAYERS`; Hugging Face ``Conv1D`` too, which an ``nn.Linear`` selector
      also selects; PyG's ``Linear`` and graph convolutions, :mod:`torchdam.pyg`), on its
      output units, except the model's output layer (the last one registered),
      depthwise/grouped convolutions and layers of one unit (a scalar score or gate:
      nothing to remove; an exact name still gates one);
    - in transformers, the heads of every attention module of a type in
      :data:`torchdam.attention.ATTENTION` (``nn.MultiheadAttention``, HF BERT/ViT/GPT-2/
      Llama attention) or of Hugging Face's standard structure
      (:func:`torchdam.attention.standard_hf_heads`: Mistral, Qwen, Gemma, Phi, BART, CLIP,
      ...): one gate per module whose units are its heads (under grouped-query
      attention a unit is a key/value head with its query heads). Its q/k/v/output
      projections are never gated as layers;
    - so in a transformer block: the heads and the FFN hidden units (the MLP's first layer:
      ``linear1``, ``intermediate.dense``, ``fc1``, ``c_fc``; Llama's ``up_proj``, whose
      units ``gate_proj`` shares). Not gated by a type selector
      (:data:`torchdam.attention.NOT_GATED`): layers writing the residual stream (FFN output
      projections ``linear2``/``output.dense``/``fc2``/``c_proj``/``down_proj``, ViT's patch
      embedding) and Llama's ``gate_proj``; name them in ``layers`` to gate them anyway.
      Layers outside recognised blocks (BERT's pooler, a hand-written block's MLP) follow
      the first rule.

    Args:
        layers: module types and/or qualified names or globs (``"features.*"``) to gate.
            Types and globs select the gateable layers among those they match (a glob
            skips activations, pooling, norms and embeddings; both skip depthwise and
            grouped convolutions, see :data:`UNGATEABLE`); an exact name must be gateable.
            Default :data:`DEFAULT_LAYERS`: every Linear and (transposed) convolution.
            ``nn.Embedding`` (units: the embedding features) is gated when named by type
            or exact name. Other types: :func:`torchdam.register_unit_layer`.
        exclude: the same kinds of selectors, to skip.
        include_output: also gate the model's final output layer (the last Linear/Conv
            registered), which is skipped by default since its width is the task's.
        after_norm: when a gated layer is directly followed by a norm over each of the same
            units on its own or in groups (the next registered sibling: BatchNorm,
            InstanceNorm, GroupNorm with more than one group; :data:`FOLLOWING_NORMS`), the
            gate acts on that norm's output (a GroupNorm's units leave in whole groups).
            Before a norm over all units together (LayerNorm, GroupNorm(1)) it stays on the
            layer's output.
        gate, k, beta_init, alpha: passed to :class:`DAMGate`.
        make_gate: build another kind of gate per :class:`Site` instead (any module with a
            ``mask() -> (n,)`` and ``forward(x)``, e.g. :class:`torchdam.masks.FixedMask`):
            how other methods place their gates where DAM's go.
        fused: apply each gate inside the host's forward where a fast rule exists
            (:data:`GATED_FORWARDS`, one ``(n,)`` mask); ``False`` always uses a forward hook
            ``gate(host output)``, for gates whose values differ per sample.
        heads: gate attention heads as described above (``False``: attention modules get no
            gate; their projections are still not gated as layers).

    Fused kernels that would skip gates are turned off where a gate sits: a gated
    ``nn.MultiheadAttention`` runs its general path with the gate applied, and an
    ``nn.TransformerEncoderLayer`` holding a gate gets a no-op forward pre-hook, which its
    fast-path check treats as "hooks attached: take the general path", so gates act in eval
    too (its ``nn.TransformerEncoder`` stops using nested tensors). :func:`detach` undoes both.

    Returns:
        ``{qualified name of the gated layer: gate}`` in registration order.

    A depthwise convolution is never gated itself: its channels are those of the layer
    feeding it, so gating that layer (an inverted residual's 1x1 expansion) lets
    :func:`torchdam.compact` remove the same channels from the depthwise conv and its norm.
    Raises :class:`AttachError` (changing nothing) when a selected layer already has a gate.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> list(attach(net))
        ['0']
    """
    from torchdam import attention

    model = unwrap(model)  # gate names are the user's module's own, not the wrapper's
    sites = plan(model, layers, exclude, include_output=include_output, after_norm=after_norm, heads=heads)
    if make_gate is None:
        def make_gate(site: Site) -> nn.Module:
            return DAMGate(site.units, axis=site.axis, gate=gate, k=k, beta_init=beta_init, alpha=alpha,
                           group=site.group)
    built = {name: make_gate(site) for name, site in sites.items()}  # a bad option changes nothing
    ref = next(model.parameters(), None)
    gates: dict[str, nn.Module] = {}
    for site in sites.values():
        g = built[site.name]
        if ref is not None:
            g.to(ref.device)
        host = model.get_submodule(site.host)
        setattr(host, GATE_ATTR, g)
        g.producer_name, g.host_name = site.name, site.host
        if site.kind == "heads":
            attention.install(host, fused)
            gates[site.name] = g
            continue
        fn = GATED_FORWARDS.get(type(host)) if fused else None
        if fn is not None and "forward" not in host.__dict__:
            host.forward = GatedForward(host, fn)
        else:
            host.register_forward_hook(apply_gate)
        gates[site.name] = g
    attention.keep_gates_in_eval(model)
    return gates


def gate_paths(model: nn.Module, kind: type = DAMGate) -> Iterator[tuple[str, str, nn.Module]]:
    """``(gated layer name, host name, gate)`` for every gate of type ``kind`` in ``model``
    (``nn.Module``: any :func:`attach` ``make_gate``), names relative to ``model`` (inside
    its DDP/compile/EMA wrapper) wherever :func:`attach` was called: on it, or on a part of
    it (a gated backbone inside a larger model), whose recorded names are re-based onto the
    path where the gate is found."""
    for name, module in unwrap(model).named_modules():
        if not isinstance(module, kind) or (kind is not DAMGate and name.rpartition(".")[2] != GATE_ATTR):
            continue
        host = name.rpartition(".")[0]
        producer = getattr(module, "producer_name", host)
        recorded = getattr(module, "host_name", host)
        if host != recorded and (recorded == "" or host.endswith("." + recorded)):
            prefix = host[: len(host) - len(recorded)] if recorded else host + "."
            producer = prefix + producer if producer else prefix[:-1]
        elif host != recorded and producer == recorded:  # moved: the gate sits on its own layer
            producer = host
        yield producer, host, module


def named_gates(model: nn.Module) -> Iterator[tuple[str, DAMGate]]:
    """``(gated layer name, gate)`` for every gate in ``model`` (names as in :func:`gate_paths`)."""
    for producer, _, gate in gate_paths(model):
        yield producer, gate


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The betas: train them in their own parameter group (own lr, no weight decay)."""
    return [g.beta for _, g in named_gates(model)]


def _check_lambda(lam: object) -> None:
    """ConfigError unless ``lam`` is a usable penalty weight (see :func:`penalty`)."""
    if type(lam) is float or type(lam) is int:  # the common case first: no other work per step
        value = lam
    elif isinstance(lam, Tensor):
        if lam.dim() != 0 or lam.dtype == torch.bool or lam.is_complex():
            raise ConfigError(f"lambda must be a 0-dim real tensor, got a {lam.dtype} tensor of shape "
                              f"{tuple(lam.shape)}")
        if lam.device.type != "cpu":
            return  # reading it would wait for the device every step
        value = lam.item()
    elif isinstance(lam, numbers.Real) and not isinstance(lam, (bool, np.bool_)):
        value = float(lam)
    else:
        raise ConfigError(f"lambda must be a number >= 0, got {lam!r}")
    if not math.isfinite(value):
        raise ConfigError(f"lambda must be a finite number, got {value}")
    if value < 0:
        raise ConfigError(f"lambda must be >= 0, got {value}")


def penalty(model: nn.Module, lam: float | Tensor) -> Tensor:
    """``lam * mean_i clamp(beta_i, min=-5)`` over the model's gates (docs/METHOD.md section 2).

    The clamp stops betas sinking without bound once a layer is already fully off.

    ``lam`` is a finite number >= 0: a Python or numpy real, or a 0-dim real tensor; anything
    else is a :class:`ConfigError`. It runs every step, so the check never waits for a
    device: a tensor ``lam`` on the CPU is checked in full, one on an accelerator only for
    its shape and dtype (its value is not read; keep it finite and >= 0 yourself).
    """
    _check_lambda(lam)
    betas = gate_parameters(model)
    if not betas:
        raise AttachError("penalty: the model has no DAM gates; call torchdam.attach(model) first")
    return lam * torch.stack([b.clamp(min=-5.0) for b in betas]).mean()


def widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{gated layer: (active units, total units)}``; active = gate > 0."""
    return {name: (int(g.active()), g.n) for name, g in named_gates(model)}


def detach(model: nn.Module) -> nn.Module:
    """Remove every gate and its hook or gated forward (in place), leaving the model as it was."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key, hook in list(hooks.items()):
                if isinstance(hook, GateHook):
                    hook.undo(module)
                    del hooks[key]
        if isinstance(getattr(module, GATE_ATTR, None), nn.Module):
            delattr(module, GATE_ATTR)
            if isinstance(module.__dict__.get("forward"), GatedForward):
                del module.forward
            for key, hook in list(module._forward_hooks.items()):
                if hook is apply_gate:
                    del module._forward_hooks[key]
    return model


def warn_dead_layers(model: nn.Module) -> list[str]:
    """Warn (once per call) about layers whose units have all died; returns their names."""
    dead = [name for name, (active, _) in widths(model).items() if active == 0]
    if dead:
        warnings.warn(
            f"every unit of {', '.join(dead)} is off (beta below -k(n-1)/n); compact() keeps "
            "min_width units there so the network stays connected. Lower lambda to avoid it.",
            stacklevel=2,
        )
    return dead
