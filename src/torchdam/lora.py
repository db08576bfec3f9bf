"""peft's LoRA Linear (``peft.tuners.lora.layer.Linear``), taught to attach and compact once
a model's file has imported it (looked up in ``sys.modules``: torchdam works without peft).

The layer computes ``base_layer(x) + sum_a lora_B[a](lora_A[a](dropout(x))) * scaling[a]``:
its output units are the rows of ``base_layer`` and of every ``lora_B``, its inputs the
columns of ``base_layer`` and of every ``lora_A``. A gate on its output folds into those
rows; a dead unit leaves them all; a dead input leaves those columns. It is one layer to the
dependency graph, gated as a whole (its Linears are not gated apart), and an ``nn.Linear``
selector selects it. Variants with per-unit state of their own (DoRA's magnitudes) and
merged adapters are refused, naming the layer.
"""
from __future__ import annotations

import sys

import torch_pruning as tp
from torch import Tensor, nn

from torchdam.attach import register_library_linear


def lora_type() -> type | None:
    loaded = sys.modules.get("peft.tuners.lora.layer")
    return getattr(loaded, "Linear", None) if loaded is not None else None


def is_lora(module: nn.Module) -> bool:
    cls = lora_type()
    return cls is not None and isinstance(module, cls)


def refusal(layer: nn.Module) -> str | None:
    """Why a LoRA layer's units cannot be gated or removed (None: they can, or not LoRA)."""
    return _reason(layer) if is_lora(layer) else None


def _reason(layer: nn.Module) -> str | None:
    if type(layer.base_layer) is not nn.Linear:
        return f"its base layer is a {type(layer.base_layer).__name__}, not an nn.Linear"
    if layer.merged_adapters:
        return "its adapters are merged into the base layer; unmerge them or merge_and_unload() the model"
    if getattr(layer, "lora_variant", None) or len(layer.lora_magnitude_vector):
        return "it uses a LoRA variant with per-unit state of its own (DoRA, ...)"
    if any(type(m) is not nn.Linear for d in (layer.lora_A, layer.lora_B) for m in d.values()):
        return "its adapters are not nn.Linear"
    return None


def parts(layer: nn.Module) -> list[tuple[nn.Module, bool, bool]]:
    """``(linear, rows are the layer's outputs, columns read its inputs)`` for each of its Linears."""
    return ([(layer.base_layer, True, True)] + [(a, False, True) for a in layer.lora_A.values()]
            + [(b, True, False) for b in layer.lora_B.values()])


def fold(layer: nn.Module, g: Tensor) -> None:
    for lin, out, _ in parts(layer):
        if out:
            lin.weight.mul_(g.unsqueeze(1).to(lin.weight.dtype))
            if lin.bias is not None:
                lin.bias.mul_(g.to(lin.bias.dtype))


def scale_inputs(layer: nn.Module, g: Tensor) -> None:
    """Scale its input columns by ``g`` (a gate that acted on its input)."""
    for lin, _, inp in parts(layer):
        if inp:
            lin.weight.mul_(g.to(lin.weight.dtype))


class LoraPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning rule for a LoRA Linear: rows of the base layer and of every ``lora_B``,
    columns of the base layer and of every ``lora_A``; the width attributes updated."""

    TARGET_MODULES = None

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        keep = sorted(set(range(layer.out_features)) - set(idxs))
        for lin, out, _ in parts(layer):
            if out:
                lin.weight = self._prune_parameter_and_grad(lin.weight, keep, 0)
                if lin.bias is not None:
                    lin.bias = self._prune_parameter_and_grad(lin.bias, keep, 0)
                lin.out_features = len(keep)
        layer.out_features = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs) -> nn.Module:
        keep = sorted(set(range(layer.in_features)) - set(idxs))
        for lin, _, inp in parts(layer):
            if inp:
                lin.weight = self._prune_parameter_and_grad(lin.weight, keep, 1)
                lin.in_features = len(keep)
        layer.in_features = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.in_features


def register_lora_layers() -> None:
    """Teach attach/compact peft's LoRA Linear once peft's files are loaded (a no-op otherwise)."""
    cls = lora_type()
    if cls is not None:
        register_library_linear(cls, "out_features", fold, LoraPruner(), refuses=_reason)


def not_gated(module: nn.Module) -> tuple[str, ...]:
    """A LoRA layer's own Linears: gated with it, never apart."""
    if not is_lora(module):
        return ()
    return ("base_layer", *(f"lora_A.{k}" for k in module.lora_A), *(f"lora_B.{k}" for k in module.lora_B))


def unsupported(model: nn.Module) -> str:
    """For an attach that gated nothing: the first LoRA layer that cannot be gated, and why."""
    found = next(((n, refusal(m)) for n, m in model.named_modules() if refusal(m)), None)
    return f"; its LoRA layers cannot be gated ({found[0]!r}: {found[1]})" if found else ""
