"""L1-norm filter pruning (Li et al., ICLR 2017): train dense, remove each prunable
layer's units with the smallest L1 weight norm, fine-tune.

A unit's score is the L1 norm of its producer's weights (a Conv's filter, a Linear's
row), as Torch-Pruning's ``MagnitudeImportance(p=1, group_reduction="first",
normalizer=None)`` scores it. The ratio is uniform: every prunable layer loses
``floor(strength * n)`` units (L1 norms of layers with different fan-in are not
comparable, so a single global threshold would be arbitrary).
"""
from __future__ import annotations

from baselines import dense
from baselines.common import (Result, Setup, Trained, find_sites, masks_for, prune_and_finetune,
                              uniform_masks)


def l1_scores(trained: Trained, setup: Setup) -> dict:
    model = trained.model
    return {name: model.get_submodule(name).weight.detach().abs().flatten(1).sum(1).cpu()
            for name in find_sites(model, setup)}


def run(setup: Setup, strength: float, *, pretrained: Trained | None = None,
        target_flops: float | None = None) -> Result:
    """Prune ``strength`` (in [0, 1)) of every prunable layer's units. ``pretrained``: a
    :func:`baselines.dense.train` result to prune instead of training anew; its
    epochs and seconds are counted in the result. ``target_flops``: instead of
    ``strength``, the per-layer ratio is bisected so the compacted model's FLOPs land at
    this fraction of the dense model's (within -3%..+3%, never above; see
    :func:`baselines.common.ratio_for_flops`); the result's strength is then the target."""
    trained = pretrained if pretrained is not None else dense.train(setup)
    scores = l1_scores(trained, setup)
    strength, masks, extra = masks_for(lambda r: uniform_masks(scores, r, setup.min_width), trained.model, setup,
                                       strength, target_flops)
    return prune_and_finetune("magnitude", strength, trained, masks, setup,
                              reused_pretrained=pretrained is not None, **extra)
