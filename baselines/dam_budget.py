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
"""
from __future__ import annotations

import dataclasses

from baselines.common import Result, Setup, finetune, fit, finish, test_accuracy
from torchdam.attach import attach, named_gates, widths
from torchdam.budget import REACH_AT, Budget
from torchdam.compact import compact
from torchdam.count import count

NAMES = {"cost": "dam-budget", "uniform": "dam-budget-uniform"}
FINETUNED = "dam-budget-ft"


def run(setup: Setup, strength: float, *, penalty: str = "cost", reach_at: float = REACH_AT,
        schedule: str | None = None, cold_start: int | None = None,
        gate: str = "relu_tanh", tune: bool = False) -> Result:
    """Train to ``strength`` of the dense FLOPs, then :func:`torchdam.compact` the last epoch
    (and with ``tune``, fine-tune the compacted model: method ``dam-budget-ft``)."""
    model = setup.build()
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
    stages = [trained]
    if tune:
        tuned = finetune(small, setup)
        stages += [tuned] if tuned is not None else []
    base = FINETUNED if tune else NAMES[penalty]
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
