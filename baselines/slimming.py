"""Network Slimming (Liu et al., ICCV 2017): L1 on BatchNorm scales, global threshold,
prune, fine-tune.

1. Train with ``sparsity * sum |gamma|`` over the BatchNorms of the prunable layers
   (the same subgradient ``sparsity * sign(gamma)`` the paper adds to their grads).
2. Rank every prunable channel by ``|gamma|`` with one global threshold and remove the
   ``strength`` fraction with the smallest scales (each layer keeps at least
   ``setup.min_width``, its largest-scale channels).
3. Fine-tune the compacted model for ``setup.finetune_epochs``.

Only layers whose units pass through a BatchNorm right after them can be slimmed; other
prunable layers keep every unit. A model without any (an MLP, LeNet-5) raises
:class:`NotApplicableError`: the method has no scale to rank by there.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from baselines.common import (NotApplicableError, Result, Setup, Trained, find_sites, fit,
                                       global_masks, masks_for, prune_and_finetune)
from torchdam.errors import ConfigError

DEFAULT_SPARSITY = 1e-4  # the paper's lambda for CIFAR (VGG / ResNet / DenseNet)


def scaled_norms(model: nn.Module, setup: Setup) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """``{prunable layer: the BatchNorm whose scales rank its channels}``."""
    norms = {}
    for name, site in find_sites(model, setup).items():
        host = model.get_submodule(site.host)
        if isinstance(host, nn.modules.batchnorm._BatchNorm) and host.affine:
            norms[name] = host
    if not norms:
        raise NotApplicableError(
            f"Network Slimming needs prunable layers followed by an affine BatchNorm; {setup.model_name} has "
            "none, so there is no channel scale to rank by (use magnitude or l0 on this model)")
    return norms


def train(setup: Setup, sparsity: float = DEFAULT_SPARSITY) -> Trained:
    """The sparsity-training stage; independent of the pruning ratio, so one run can be
    pruned at every ratio."""
    if sparsity < 0:
        raise ConfigError(f"sparsity must be >= 0, got {sparsity}")
    model = setup.build()
    norms = list(scaled_norms(model, setup).values())

    def l1_of_scales(_: nn.Module) -> Tensor:
        return sparsity * torch.stack([bn.weight.abs().sum() for bn in norms]).sum()

    return fit(model, setup.config, setup, extra_penalty=l1_of_scales)


def run(setup: Setup, strength: float, *, sparsity: float = DEFAULT_SPARSITY,
        pretrained: Trained | None = None, target_flops: float | None = None) -> Result:
    """Slim to a global channel pruning ratio ``strength`` (in [0, 1)). ``pretrained``: the
    output of :func:`train` with the same ``sparsity`` to prune instead of training anew.
    ``target_flops``: instead of ``strength``, the global ratio is bisected so the compacted
    model's FLOPs land at this fraction of the dense model's (within -3%..+3%, never above;
    :func:`baselines.common.ratio_for_flops`); the result's strength is then the target."""
    trained = pretrained if pretrained is not None else train(setup, sparsity)
    scores = {name: bn.weight.detach().abs().cpu() for name, bn in scaled_norms(trained.model, setup).items()}
    strength, masks, extra = masks_for(lambda r: global_masks(scores, r, setup.min_width), trained.model, setup,
                                       strength, target_flops)
    return prune_and_finetune("slimming", strength, trained, masks, setup, sparsity=sparsity,
                              reused_pretrained=pretrained is not None, **extra)
