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
   (:class:`torchdam.coupling.GroupSearchError`: a bidirectional GRU consumer, grouped-query attention's
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
in step 3, or keep all their units if even that differs (:func:`_rescue`). Per-layer rules
live in small tables (:data:`FOLDERS`, :data:`torchdam.coupling.TP_PRUNERS`) that users can
extend; the graph questions (which layers share a layer's units) are
:mod:`torchdam.coupling`'s.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from torchdam import attention, coupling
from torchdam.attach import (
    _ungateable_reason,
    _unit_rule,
    detach,
    gate_paths,
    named_gates,
    unit_group,
    unwrap,
)
from torchdam.calling import run_eval
from torchdam.errors import CompactionError, ShapeError, UnsupportedLayerError
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

    def forward(self, *args, **kwargs) -> Tensor:
        y = self.module(*args, **kwargs)  # a graph conv takes (x, edge_index, edge_weight=...)
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


def _collect(small: nn.Module, min_width: int, tied: dict[int, list[str]], only: frozenset[str] | None = None,
             keep: frozenset[str] = frozenset()) -> list[coupling.GatedLayer]:
    """Folds every gate into its host and lists the gated layers with their live/dead units
    (``only``: the dead units of those layers alone are to be removed; the others stay, as zeros;
    ``keep``: layers whose dead units stay, as zeros)."""
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
        if (only is not None and name not in only) or name in keep:
            live = list(range(gate.n))
        per = unit_group(host)
        if per > 1:  # a group normalised together leaves whole: its dead units stay, as zeros
            groups = {u // per for u in live}
            live = [u for u in range(gate.n) if u // per in groups]
        dead = sorted(set(range(gate.n)) - set(live))
        axis = gate.axis if gate.axis is not None else 1
        gated.append(coupling.GatedLayer(name, producer, host_name, host, axis, gate.n, live, dead))
    return gated


def _compensate(consumers: dict[nn.Module, list[int]], inputs: dict[nn.Module, Tensor | None]) -> bool:
    """Adds to each consumer's bias what removing its dead input units takes away (the
    constant a dead unit becomes after a norm or a depthwise conv's bias, e.g. an inverted
    residual's depthwise conv + BatchNorm between the gate and the projection); False,
    changing nothing, when some consumer cannot take it."""
    deltas = coupling.bias_deltas(consumers, inputs)
    if deltas is None:
        return False
    for m, d in deltas.items():
        if d.dim() == 0:
            continue
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros(d.shape, dtype=m.weight.dtype, device=m.weight.device))
        m.bias.add_(d.to(m.bias.dtype))
    return True


def _narrow_streams(dg: tp.DependencyGraph, stream: list[coupling.GatedLayer], frozen: dict[int, str],
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
        members = coupling.stream_members(dg, layer, by_module, frozen)
        if members is None:
            seen.add(id(layer))
            continue
        seen.update(id(m) for m in members)
        common = sorted(set.intersection(*(set(m.dead) for m in members)))
        if not common:
            continue
        _prune(coupling.coupled_group(dg, layer.producer, layer.name, common), layer, names)
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
        why = str(exc) if isinstance(exc, coupling.Refused) else f"Torch-Pruning failed ({type(exc).__name__})"
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
    attention.register_library_layers()
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
    scattered back to full width (exact: their dead units are zeros at the gate). If that is
    still not exact (model code reading such a layer's width, e.g. to split its output),
    they keep their dead units (folded: zeros, as gated), with a warning naming them; raises,
    naming them, if even that is not exact."""
    kept = _keep_failing_heads(source, example_inputs, reference, rtol, min_width)
    if kept is not None:
        return kept

    def exact(names: list[str]) -> bool:
        try:
            check_equivalent(_compacted_copy(source, example_inputs, min_width, False, only=frozenset(names))[0],
                             reference, example_inputs, rtol)
        except CompactionError:
            return False
        return True

    def at_fault(names: list[str]) -> set[str]:
        """The layers among ``names`` whose removal is not exact, by halving (a few culprits
        among many gates cost a few compactions each, not one per gate); a set that fails
        while each half passes is at fault as a whole."""
        if exact(names):
            return set()
        if len(names) == 1:
            return set(names)
        half = len(names) // 2
        return at_fault(names[:half]) | at_fault(names[half:]) or set(names)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folded, _ = _compacted_copy(source, example_inputs, min_width, False, only=frozenset())  # removes nothing
        try:
            check_equivalent(folded, reference, example_inputs, rtol)
        except CompactionError as exc:
            bad = _bad_fold(source, folded, example_inputs, rtol)
            if bad is None:
                raise
            raise bad from exc
        names = [name for name, _ in named_gates(source)]
        half = len(names) // 2  # the whole set is known to fail: start from its halves
        culprits = (at_fault(names[:half]) | at_fault(names[half:]) or set(names)) if len(names) > 1 else set(names)
    if not culprits:
        raise failure
    names = ", ".join(map(repr, sorted(culprits)))
    small, _ = _compacted_copy(source, example_inputs, min_width, False, scatter=frozenset(culprits))
    try:
        check_equivalent(small, reference, example_inputs, rtol)
        return small
    except CompactionError as exc:
        scattered = exc
    small, _ = _compacted_copy(source, example_inputs, min_width, False, keep=frozenset(culprits))
    try:
        check_equivalent(small, reference, example_inputs, rtol)
    except CompactionError as exc:
        raise CompactionError(
            f"removing the dead units of gated layer(s) {names} changes the model's outputs, even when "
            f"they are scattered back to full width: {scattered}") from exc
    warnings.warn(
        f"compact kept every unit of {names}: removing their dead units changed the outputs, and so did "
        f"computing only their live units ({str(scattered).splitlines()[0]}); the dead units output zero, "
        "as in the gated model", stacklevel=3)
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


def _prune(group, layer: coupling.GatedLayer, names: dict[int, str]) -> None:
    """``group.prune()``, with any failure named after the gated layer and the coupled one."""
    for dep, idxs in group:
        try:
            dep(list(idxs))
        except Exception as exc:
            where = names.get(id(dep.target.module), type(dep.target.module).__name__)
            why = str(exc) if isinstance(exc, coupling.Refused) else f"Torch-Pruning failed ({type(exc).__name__})"
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
                    only: frozenset[str] | None = None, scatter: frozenset[str] = frozenset(),
                    keep_heads: frozenset[str] = frozenset(),
                    keep: frozenset[str] = frozenset()) -> tuple[nn.Module, bool]:
    """The compacted copy of ``source`` (unchecked), and whether a stream was narrowed
    (``only``: remove the dead units of those gated layers alone; ``scatter``: gated layers
    to scatter back to full width whatever their consumers; ``keep_heads``: attention
    modules whose head gates are folded but whose dead heads stay; ``keep``: gated layers
    whose gates are folded but whose dead units stay)."""
    try:
        small = copy.deepcopy(source).eval()
    except Exception as exc:
        raise CompactionError(f"compact works on a copy, and copy.deepcopy({type(source).__name__}) failed "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    plain_weights(small)
    tied = coupling.tied_layers(small)
    with torch.no_grad():
        heads = [h for h in attention.take_head_gates(small, min_width) if h.name not in keep_heads]
        gated = _collect(small, min_width, tied, only, keep)
    attention.keep_nested_tensors_off(small)
    detach(small)
    for p in small.parameters():
        p.requires_grad_(True)
    names = {id(m): n for n, m in small.named_modules()}
    frozen = coupling.frozen_layers(small, tied)
    if not gated:  # only attention heads: local surgery, no graph needed
        attention.remove_heads(small, heads)
        return _finished(small), False
    dg = coupling.build_graph(small, example_inputs)
    shared = attention.shared_units(small)
    # 1. Which layers lose their dead units everywhere, and which are scattered back.
    removable: list[tuple[coupling.GatedLayer, dict[nn.Module, list[int]]]] = []
    stream = []
    for layer in gated:
        if layer.dead and any(m not in dg.module2node and dg.get_pruner_of_module(m) is not None
                              for m in (layer.producer, layer.host)):
            warnings.warn(
                f"layer {layer.name!r} was not reached by example_inputs: compact keeps all its units (its "
                "gate folded, dead units output zero). The compacted model runs the branches example_inputs "
                "took; pass inputs that take every branch to compact it too", stacklevel=4)
            layer.keep, layer.dead = list(range(layer.total)), []
        if not layer.dead:
            continue
        try:
            group = coupling.coupled_group(dg, layer.producer, layer.name, layer.dead)
            consumers = coupling.consumer_inputs(dg, group, layer, frozen, shared.get(id(layer.producer), frozenset()))
        except coupling.GroupSearchError:
            consumers = None  # its coupled layers are unknown: computed narrow, scattered back
        if consumers is None or layer.name in scatter:
            stream.append(layer)
        else:
            removable.append((layer, consumers))
    # 2. A dead unit that a norm or bias turns into a constant before its consumers goes
    #    into their bias (all measured before any layer changes).
    inputs = coupling.input_values(small, example_inputs, [m for _, c in removable for m in c])
    with torch.no_grad():
        compensated = [layer for layer, consumers in removable if _compensate(consumers, inputs)]
    stream += [layer for layer, _ in removable if layer not in compensated]
    for layer in compensated:
        _prune(coupling.coupled_group(dg, layer.producer, layer.name, layer.dead), layer, names)
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
