"""Structured-pruning baselines, run on the same trainer, models, data and counting as DAM.

Every method is ``run(setup, strength, **options) -> Result`` and ends in a physically
smaller model (built by :func:`torchdam.compact` from the method's per-unit decision) that
is measured with :func:`torchdam.count`::

    setup = Setup("lenet300", load_dataset("mnist"), TrainConfig(epochs=15), finetune_epochs=5)
    for method in BASELINES.names():
        result = BASELINES.get(method)(setup, strength=...)

| method | strength | stages |
|---|---|---|
| ``dense`` | ignored | train |
| ``dam`` | lambda | train with gates, compact |
| ``l0`` | lambda per expected active unit | train with hard-concrete gates, compact |
| ``slimming`` | global channel ratio removed | train with L1 on BN scales, prune, fine-tune |
| ``magnitude`` | per-layer unit ratio removed | train dense, prune by L1 norm, fine-tune |
| ``chipnet`` | global unit ratio removed (budget) | train dense, learn soft masks to the budget, threshold, fine-tune |
| ``tp_vit`` | FLOPs reduction (dense / pruned) | train dense, Torch-Pruning removes heads + FFN units to the FLOPs target, fine-tune |
| ``chipnet-flops`` | fraction of dense FLOPs kept (target) | ChipNet with the paper's FLOPs budget in place of the channel one |
| ``dam-budget`` | fraction of dense FLOPs kept (target) | train with gates driven to the target (cost-aware pull), compact |
| ``dam-budget-uniform`` | fraction of dense FLOPs kept (target) | the same with the paper's uniform pull |
| ``dam-budget-ft`` | fraction of dense FLOPs kept (target) | ``dam-budget``, then fine-tune the compacted model |

``magnitude``, ``slimming`` and ``chipnet`` also take ``target_flops=`` (a fraction of the
dense FLOPs) in place of their ratio.
"""
from __future__ import annotations

from baselines import chipnet, dam, dam_budget, dense, l0, magnitude, slimming, tp_vit
from baselines.common import NotApplicableError, Result, Setup, Trained
from torchdam.registry import Registry

BASELINES: Registry[Result] = Registry("method")
BASELINES.register("dense")(dense.run)
BASELINES.register("dam")(dam.run)
BASELINES.register("l0")(l0.run)
BASELINES.register("slimming")(slimming.run)
BASELINES.register("magnitude")(magnitude.run)
BASELINES.register("chipnet")(chipnet.run)
BASELINES.register("tp_vit")(tp_vit.run)
BASELINES.register("chipnet-flops")(lambda setup, strength, **kw: chipnet.run(setup, strength, budget="flops", **kw))
BASELINES.register("dam-budget")(dam_budget.run)
BASELINES.register("dam-budget-uniform")(dam_budget.run_uniform)
BASELINES.register("dam-budget-ft")(dam_budget.run_finetuned)
BASELINES.register("dam-budget-pretrained")(dam_budget.run)
BASELINES.register("dam-budget-ordered")(lambda setup, strength, **kw: dam_budget.run(setup, strength, ordered=True, **kw))

__all__ = ["BASELINES", "NotApplicableError", "Result", "Setup", "Trained"]
