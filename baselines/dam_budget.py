"""Budget-DAM (:mod:`torchdam.budget`) run like any baseline: attach, one training stage to
a FLOPs target, compact.

``strength`` is the target, a fraction of the dense model's FLOPs per sample
(``Trainer(budget=Budget(flops=strength))``): the budget drives the betas to it by
``reach_at`` of the steps, snaps the widths and trains the rest of the run at that width.
``schedule`` and ``cold_start`` (epochs before the budget starts) are the budget's own
options, for variants; a run off a default is labelled with it.
``penalty`` is ``"cost"`` (each gate pulled by what its units cost; method ``dam-budget``)
or ``"uniform"`` (the paper's ``mean(beta)`` direction; ``dam-budget-uniform``). ``lam``
and ``beta_lr`` are not used. Single stage (``finetune_epochs`` ignored), except
``dam-budget-ft``: the same run, then the compacted model fine-tuned like the baselines'
(``finetune_epochs`` at their fine-tune lr), a second stage the library itself never adds.

Two variants that start from the dense model the baselines prune (a diagnostic for the
LeNet-300-100 gap, BENCHMARKS.md; not the paper's method): ``dam-budget-pretrained`` runs
budget-DAM on that trained network, and ``dam-budget-ordered`` first reorders each gated
Linear's units by the L1 norm of their weights (the magnitude baseline's importance), least
important first, so DAM's fixed order removes them first. Both count the dense epochs too.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from baselines.common import NotApplicableError, Result, Setup, Trained, find_sites, finetune, fit, finish, test_accuracy
from torchdam.attach import attach, named_gates, widths
from torchdam.budget import REACH_AT, Budget
from torchdam.compact import compact
from torchdam.count import count

NAMES = {"cost": "dam-budget", "uniform": "dam-budget-uniform"}
FINETUNED = "dam-budget-ft"
PRETRAINED, ORDERED = "dam-budget-pretrained", "dam-budget-ordered"


def order_units(model: nn.Module, setup: Setup) -> None:
    """Permute each gated Linear's units (in place) by ascending L1 norm of their weight rows,
    and the next Linear's input columns with them: the same function, with the least important
    units at index 0, where DAM's offsets ``mu_j = k j / n`` switch units off first. MLPs only
    (each gated Linear read by the next Linear alone)."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    sites = find_sites(model, setup)
    if any(not isinstance(model.get_submodule(n), nn.Linear) for n in sites):
        raise NotApplicableError("unit ordering is written for MLPs (gated Linears only)")
    with torch.no_grad():
        for (name, layer), (_, consumer) in zip(linears, linears[1:]):
            if name not in sites:
                continue
            if consumer.in_features != layer.out_features:
                raise NotApplicableError(f"unit ordering: {name!r} is not read by the next Linear")
            order = layer.weight.abs().sum(1).argsort()
            layer.weight.copy_(layer.weight[order])
            if layer.bias is not None:
                layer.bias.copy_(layer.bias[order])
            consumer.weight.copy_(consumer.weight[:, order])


def run(setup: Setup, strength: float, *, penalty: str = "cost", reach_at: float = REACH_AT,
        schedule: str | None = None, cold_start: int | None = None,
        gate: str = "relu_tanh", tune: bool = False, pretrained: Trained | None = None,
        ordered: bool = False) -> Result:
    """Train to ``strength`` of the dense FLOPs, then :func:`torchdam.compact` the last epoch
    (and with ``tune``, fine-tune the compacted model: method ``dam-budget-ft``). From
    ``pretrained`` (a copy of its model; its units reordered first with ``ordered``) for the
    ``dam-budget-pretrained`` / ``-ordered`` variants."""
    model = setup.build() if pretrained is None else copy.deepcopy(pretrained.model).train()
    if ordered:
        sample = setup.sample()
        before = model.eval()(sample)
        order_units(model, setup)
        if not torch.allclose(model(sample), before, atol=1e-5):
            raise AssertionError("unit ordering changed the network's function")
        model.train()
    attach(model, setup.layers, setup.exclude, gate=gate)
    config = setup.config if cold_start is None else dataclasses.replace(setup.config, cold_start=cold_start)
    options = {"schedule": schedule} if schedule is not None else {}
    trained = fit(model, config, setup,
                  budget=Budget(flops=strength, reach_at=reach_at, penalty=penalty, round_to=config.round_to, **options))
    layer_widths = widths(model)
    small = compact(model, setup.examples(), min_width=setup.min_width)
    sample = setup.sample()
    reached = count(small, sample)["flops"] / count(setup.build(), sample)["flops"]
    budget = trained.trainer.budget.summary(reached)
    gated_acc = test_accuracy(trained.trainer, model, setup)
    stages = [trained] if pretrained is None else [pretrained, trained]
    if tune:
        tuned = finetune(small, setup)
        stages += [tuned] if tuned is not None else []
    base = FINETUNED if tune else (ORDERED if ordered else PRETRAINED) if pretrained is not None else NAMES[penalty]
    # a run off the budget's defaults is labelled with them
    name = base + (f" reach_at={reach_at:g}" if reach_at != REACH_AT else "") + "".join(
        f" {key}={value}" for key, value in (("schedule", schedule), ("cold_start", cold_start)) if value is not None)
    return finish(name, strength, small, stages, setup, layer_widths, gate=gate,
                  target_flops=strength, reached_flops=reached, penalty=penalty, reach_at=reach_at,
                  schedule=trained.trainer.budget.schedule, cold_start=config.cold_start,
                  budget_ok=budget["ok"], budget_floor=budget["floor"],
                  test_acc_gated=gated_acc,
                  betas={name: g.beta.item() for name, g in named_gates(model)})


def run_uniform(setup: Setup, strength: float, **options) -> Result:
    """:func:`run` with the paper's uniform pull (method ``dam-budget-uniform``)."""
    return run(setup, strength, penalty="uniform", **options)


def run_finetuned(setup: Setup, strength: float, **options) -> Result:
    """:func:`run` (cost-aware pull), then the baselines' fine-tune of the compacted model
    (method ``dam-budget-ft``)."""
    return run(setup, strength, tune=True, **options)
