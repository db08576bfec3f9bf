"""Any per-unit decision, as a mask, into a physically smaller model.

The bridge between "which units go" (any method: magnitude, L0, ChipNet, a user's own
scores) and :func:`torchdam.compact` (how they go), like ``torch.nn.utils.prune``'s
``CustomFromMask``: masks are hooked where :func:`torchdam.attach` puts DAM gates, as
:class:`FixedMask` gates, and ``compact`` folds them into the weights and removes the zeros.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import Tensor, nn

from torchdam.attach import DEFAULT_LAYERS, GATE_ATTR, Selector, attach, gate_paths, unwrap
from torchdam.compact import compact
from torchdam.gates import DAMGate


class FixedMask(DAMGate):
    """A gate with fixed values (not trained): the form in which :func:`torchdam.compact`
    takes any method's decision. Units whose value is 0 are removed; the others are scaled
    by their value (1 keeps them as they are)."""

    def __init__(self, values: Tensor, axis: int | None = None) -> None:
        super().__init__(int(values.numel()), axis=axis)
        self.beta.requires_grad_(False)
        self.register_buffer("values", values.detach().to(torch.float32).flatten().clone())

    def mask(self) -> Tensor:
        return self.values


def freeze_gates(model: nn.Module, values: dict[str, Tensor]) -> nn.Module:
    """A copy of ``model`` in which every gate whose layer is in ``values`` is replaced by a
    :class:`FixedMask` with those values: how a method with trained gates of its own kind
    (L0, ChipNet) hands its final decision to :func:`torchdam.compact`."""
    frozen = copy.deepcopy(model)
    for name, host, gate in list(gate_paths(frozen, nn.Module)):
        if name in values:
            device = next(iter(gate.parameters()), values[name]).device  # the trained gate's device
            fixed = FixedMask(values[name].to(device), gate.axis)
            fixed.producer_name, fixed.host_name = name, host
            setattr(unwrap(frozen).get_submodule(host), GATE_ATTR, fixed)
    return frozen


def compact_masks(
    model: nn.Module,
    masks: dict[str, Tensor],
    example_inputs,
    *,
    layers: Iterable[Selector] = DEFAULT_LAYERS,
    exclude: Iterable[Selector] = (),
    min_width: int = 1,
) -> nn.Module:
    """A smaller copy of the gate-free ``model`` whose layer outputs are scaled by
    ``masks[layer name]`` (``(n,)`` tensors; units at 0 removed). Layers selected by
    ``layers``/``exclude`` (as in :func:`torchdam.attach`) without a mask keep every unit.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> small = compact_masks(net, {"0": torch.tensor([1., 0, 1, 0, 1, 1, 0, 1])}, torch.randn(3, 4))
        >>> small[0].out_features
        5
    """
    work = copy.deepcopy(model)
    attach(work, layers, exclude,
           make_gate=lambda site: FixedMask(masks.get(site.name, torch.ones(site.units)), site.axis))
    return compact(work, example_inputs, min_width=min_width)
