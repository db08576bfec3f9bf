"""DAM (this library) run like any baseline: attach, one training stage, compact.

``strength`` is lambda; every other DAM option (beta's learning rate, cold start, gate
type) comes from ``setup.config`` or the keywords below, exactly as in ``torchdam prune``.
Nothing is fine-tuned (the paper's method is single-stage), so ``finetune_epochs`` is
ignored.
"""
from __future__ import annotations

import dataclasses

from torchdam.attach import attach, named_gates, widths
from baselines.common import Result, Setup, fit, finish, test_accuracy
from torchdam.compact import compact


def run(setup: Setup, strength: float, *, gate: str = "relu_tanh") -> Result:
    """Train with ``penalty(model, lam=strength)``, then :func:`torchdam.compact` the last epoch."""
    model = setup.build()
    attach(model, setup.layers, setup.exclude, gate=gate)
    trained = fit(model, dataclasses.replace(setup.config, lam=strength), setup)
    layer_widths = widths(model)
    small = compact(model, setup.examples(), min_width=setup.min_width)
    return finish("dam", strength, small, [trained], setup, layer_widths, gate=gate,
                  test_acc_gated=test_accuracy(trained.trainer, model, setup),
                  betas={name: g.beta.item() for name, g in named_gates(model)})
