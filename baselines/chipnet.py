"""ChipNet (Tiwari, Bamba, Chavan, Gupta, ICLR 2021): budget-aware channel pruning of a
pretrained model with soft masks made crisp by a continuous Heaviside function.

1. Start from the dense model (:func:`baselines.dense.train`, or ``pretrained``).
2. Give every prunable unit ``j`` a learnable ``psi_j`` and multiply its output by
   ``z_j = H(z~_j) = 1 - exp(-gamma z~_j) + z~_j exp(-gamma)``, ``z~_j = 1 / (1 + exp(-beta psi_j))``.
   Train weights and ``psi`` on ``CE + 30 (V(z) - V0)^2 + 10 mean_j (z_j - z~_j)^2``: the
   budget term with ``V(z) = mean_j sigmoid(s (z_j - 0.5))`` (a smooth "fraction of masks
   above 0.5", the paper's channel budget) and ``V0 = 1 - strength``, and the crispness term,
   which is 0 only where ``z~`` is 0 or 1. ``beta``, ``gamma`` and ``s`` grow as training goes.
3. Keep the units whose mask exceeds the official threshold (below), remove the others
   with :func:`torchdam.compact` (kept units scaled by 1, as the official binary
   ``pruned_zeta``), and fine-tune for ``setup.finetune_epochs``.

What comes from the official code (github.com/transmuteAI/ChipNet), and every deviation
(the stage compressed onto a short schedule, psi's lr scaled to keep its travel), are in
``docs/baselines/chipnet.md``.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable

import torch
from torch import Tensor, nn

from baselines import dense
from baselines.common import (Result, Setup, Trained, find_sites, global_masks, keep_top, finetune, finish, fit,
                                       freeze_gates, place, ratio_for_flops, test_accuracy, uniform_masks,
                                       widths_of)
from torchdam.compact import compact
from torchdam.errors import ConfigError, ShapeError
from torchdam.train import Group, Trainer, param_groups

LR, WEIGHT_DECAY = 1e-3, 1e-3
BUDGET_WEIGHT, CRISPNESS_WEIGHT = 30.0, 10.0
BETA_START, BETA_STEP, BETA_MAX = 1.0, 0.1 / 5.0, 6.0
GAMMA_START, GAMMA_FACTOR, GAMMA_MAX = 2.0, 2.0 ** (1.0 / 2.0), 256.0
STEEPNESS_START, STEEPNESS_STEP, STEEPNESS_MAX = 10.0, 5.0, 60.0
PSI_INIT = 0.01
#: the official pruning run: 20 epochs over CIFAR's 45k training images in batches of 32
OFFICIAL_EPOCHS = 20
OFFICIAL_STEPS = OFFICIAL_EPOCHS * math.ceil(45_000 / 32)
MAX_THRESHOLD, THRESHOLD_STEP = 0.9, 1e-4


def logistic(psi: Tensor, beta: float) -> Tensor:
    """``z~ = 1 / (1 + exp(-beta psi))``: the soft mask before the Heaviside step."""
    return torch.sigmoid(beta * psi)


def continuous_heaviside(soft: Tensor, gamma: float) -> Tensor:
    """``z = 1 - exp(-gamma z~) + z~ exp(-gamma)``: maps 0 -> 0 and 1 -> 1, and pushes the
    rest of [0, 1] towards 1 the larger gamma is."""
    return 1.0 - torch.exp(-gamma * soft) + soft * math.exp(-gamma)


def crispness(soft: Tensor, z: Tensor) -> Tensor:
    """``mean (z - z~)^2``: zero only where the soft masks are already 0 or 1."""
    return (z - soft).pow(2).mean()


def smooth_budget(z: Tensor, steepness: float) -> Tensor:
    """The fraction of units kept, smoothed: ``mean sigmoid(s (z - 0.5))``."""
    return torch.sigmoid(steepness * (z - 0.5)).mean()


def schedule(step: int, total_steps: int) -> tuple[float, float, float]:
    """``(beta, gamma, steepness)`` after ``step`` of the stage's ``total_steps``: the
    official schedules at the same point of the official 20 epochs (``beta`` and ``gamma``
    raised at each official epoch's end, the steepness at every step)."""
    progress = OFFICIAL_EPOCHS * min(max(step, 0), total_steps)
    epoch = progress // total_steps
    beta = min(BETA_MAX, BETA_START + BETA_STEP * epoch)
    gamma = min(GAMMA_MAX, GAMMA_START * GAMMA_FACTOR ** epoch)
    steepness = min(STEEPNESS_MAX, STEEPNESS_START + STEEPNESS_STEP * progress / total_steps)
    return beta, gamma, steepness


class ChipNetMask(nn.Module):
    """ChipNet's soft mask over ``n`` units (unit axis as :class:`torchdam.DAMGate`: dim 1
    for ``N, C, ...`` maps, the last dim for vectors), the same in train and eval mode.
    Hooked like a DAM gate: its host multiplies its units by :meth:`mask`. ``beta`` and
    ``gamma`` are plain floats, set by the schedule between steps."""

    def __init__(self, n: int, axis: int | None = None, beta: float = BETA_START, gamma: float = GAMMA_START,
                 init: float = PSI_INIT) -> None:
        super().__init__()
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"ChipNetMask needs a positive number of units, got n={n!r}")
        if not (beta > 0 and gamma > 0 and init >= 0):
            raise ConfigError(f"ChipNetMask needs beta > 0, gamma > 0 and init >= 0, got "
                              f"beta={beta}, gamma={gamma}, init={init}")
        self.n, self.axis = n, axis
        self.beta, self.gamma = float(beta), float(gamma)
        self.psi = nn.Parameter(init * torch.rand(n))

    def soft(self) -> Tensor:
        """``z~``, the logistic of psi."""
        return logistic(self.psi, self.beta)

    def mask(self) -> Tensor:
        """``z``, what the host multiplies its units by."""
        return continuous_heaviside(self.soft(), self.gamma)

    def forward(self, x: Tensor) -> Tensor:
        axis = self.axis % x.dim() if self.axis is not None else (1 if x.dim() > 2 else x.dim() - 1)
        if x.shape[axis] != self.n:
            raise ShapeError(f"ChipNetMask over {self.n} units got shape {tuple(x.shape)}")
        return x * self.mask().to(x.dtype).view([-1] + [1] * (x.dim() - axis - 1))

    def extra_repr(self) -> str:
        return f"n={self.n}, beta={self.beta:.4g}, gamma={self.gamma:.4g}, axis={self.axis}"


class Objective:
    """The budget and crispness terms, added to the cross-entropy at every training step
    (as :class:`torchdam.train.Trainer`'s ``extra_penalty``, which it calls once per step).
    After each call it moves the masks to the next step's ``beta`` and ``gamma``."""

    def __init__(self, masks: list[ChipNetMask], target: float, total_steps: int,
                 budget_weight: float = BUDGET_WEIGHT, crispness_weight: float = CRISPNESS_WEIGHT) -> None:
        if total_steps < 1:
            raise ConfigError(f"the ChipNet stage needs at least one step, got {total_steps}")
        self.masks, self.target, self.total_steps = masks, target, total_steps
        self.budget_weight, self.crispness_weight = budget_weight, crispness_weight
        self.step = 0
        self._advance(0)

    def _advance(self, step: int) -> None:
        self.step = step
        self.beta, self.gamma, self.steepness = schedule(step, self.total_steps)
        for m in self.masks:
            m.beta, m.gamma = self.beta, self.gamma

    def terms(self) -> tuple[Tensor, Tensor]:
        """``(budget, crispness)`` at the current step, unweighted."""
        soft = torch.cat([m.soft() for m in self.masks])
        z = continuous_heaviside(soft, self.gamma)
        return (smooth_budget(z, self.steepness) - self.target).pow(2), crispness(soft, z)

    def __call__(self, _model: nn.Module | None = None) -> Tensor:
        budget, crisp = self.terms()
        self._advance(self.step + 1)  # floats only: the graph just built keeps this step's values
        return self.budget_weight * budget + self.crispness_weight * crisp


class FlopsObjective(Objective):
    """ChipNet's FLOPs budget (the paper's ``flops_ratio`` budget type) in place of the channel
    budget: ``V(z)`` is the compacted model's FLOPs over the dense model's at the smooth live
    counts ``sum_j sigmoid(s (z_j - 0.5))`` of every layer, from :class:`torchdam.budget.WidthModel`
    (the same width model budget-DAM uses, exact on these models); the crispness term is unchanged."""

    def __init__(self, masks: dict[str, ChipNetMask], width_model, target: float, total_steps: int,
                 budget_weight: float = BUDGET_WEIGHT, crispness_weight: float = CRISPNESS_WEIGHT) -> None:
        self.width_model = width_model
        self.ordered = [masks[name] for name in width_model.names]
        super().__init__(list(masks.values()), target, total_steps, budget_weight, crispness_weight)

    def terms(self) -> tuple[Tensor, Tensor]:
        soft = torch.cat([m.soft() for m in self.masks])
        z = continuous_heaviside(soft, self.gamma)
        live = torch.stack([torch.sigmoid(self.steepness * (m.mask() - 0.5)).sum() for m in self.ordered])
        flops = self.width_model.relative(live.double(), "flops").float()
        return (flops - self.target).pow(2), crispness(soft, z)


def flops_width_model(model: nn.Module, setup: Setup):
    """The :class:`torchdam.budget.WidthModel` of ``model``'s prunable sites (a DAM-gated copy
    is traced; the gates only mark the sites)."""
    from torchdam.attach import attach
    from torchdam.budget import WidthModel

    ref = copy.deepcopy(model)
    attach(ref, setup.layers, setup.exclude)
    return WidthModel(ref, setup.examples()[:1])


def psi_lr_scale(total_steps: int) -> float:
    """How much faster than the weights psi learns in a stage of ``total_steps``: AdamW moves
    a parameter by about its lr per step, so this lets psi travel as far as in the official
    run's ``OFFICIAL_STEPS`` (1 when the stage is that long)."""
    return OFFICIAL_STEPS / total_steps


def prune_stage(model: nn.Module, masks: list[ChipNetMask], setup: Setup, target: float, epochs: int,
                lr: float = LR, weight_decay: float = WEIGHT_DECAY, budget_weight: float = BUDGET_WEIGHT,
                crispness_weight: float = CRISPNESS_WEIGHT,
                make_objective: Callable[[int], Objective] | None = None) -> tuple[Trained, Objective]:
    """Train weights and masks (in place) for ``epochs`` with the official optimizer: AdamW
    at a constant ``lr`` (psi's scaled by :func:`psi_lr_scale`), ``weight_decay`` on the
    weights only. ``make_objective(total_steps)``: another budget (default: the channel budget)."""
    config = dataclasses.replace(setup.config, epochs=epochs, lr=lr, weight_decay=weight_decay,
                                 schedule="none", cold_start=0)
    steps = epochs * math.ceil(len(setup.splits.train) / config.batch_size)  # batches per epoch x epochs
    objective = (Objective(masks, target, steps, budget_weight, crispness_weight) if make_objective is None
                 else make_objective(steps))

    def official_optimizer(trainer: Trainer) -> None:
        # The Trainer's optimizers are SGD/Adam over one decayed group; ChipNet's is AdamW with
        # psi undecayed (decay would pull z~ back to 0.5), so it replaces the Trainer's own.
        psi = Group([m.psi for m in masks], lr=lr * psi_lr_scale(steps), weight_decay=0.0)
        trainer.optimizer = torch.optim.AdamW(
            param_groups(model, {"chipnet_psi": psi}, weight_decay=weight_decay), lr=lr)
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda _: 1.0)

    return fit(model, config, setup, extra_penalty=objective, adjust=official_optimizer), objective


def keep_decision(z: Tensor, target: float) -> tuple[Tensor, float]:
    """The official channel-budget threshold over all units' masks ``z``: the
    ``int((1 - target) N)``-th smallest mask capped at 0.9, lowered by 1e-4 until at least
    ``target`` of the units are kept; returns ``(z > threshold, threshold)``."""
    ordered = torch.sort(z.detach().flatten()).values
    index = min(int((1.0 - target) * ordered.numel()), ordered.numel() - 1)
    threshold = min(ordered[index].item(), MAX_THRESHOLD)
    keep = z > threshold
    while keep.float().mean() < target:  # a tensor compare, as the official get_remaining
        threshold -= THRESHOLD_STEP
        keep = z > threshold
    return keep, threshold


def _check(strength: float, epochs: int, lr: float, budget_weight: float, crispness_weight: float) -> None:
    if not 0 <= strength < 1:
        raise ConfigError(f"ChipNet strength (fraction of units removed) must be in [0, 1), got {strength}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"prune_epochs must be a whole number >= 1, got {epochs!r}")
    if not (lr > 0 and budget_weight >= 0 and crispness_weight >= 0):
        raise ConfigError(f"ChipNet needs lr > 0 and weights >= 0, got lr={lr}, "
                          f"budget_weight={budget_weight}, crispness_weight={crispness_weight}")


def run(setup: Setup, strength: float, *, pretrained: Trained | None = None, prune_epochs: int | None = None,
        lr: float = LR, weight_decay: float = WEIGHT_DECAY, budget_weight: float = BUDGET_WEIGHT,
        crispness_weight: float = CRISPNESS_WEIGHT, target_flops: float | None = None,
        budget: str = "channel") -> Result:
    """Prune ``strength`` (in [0, 1)) of all prunable units with ChipNet, then fine-tune.
    ``pretrained``: a :func:`baselines.dense.train` result to start from (left
    unchanged) instead of training anew; its epochs and seconds are counted in the result.

    ``target_flops`` (a fraction of the dense FLOPs) replaces ``strength``: the channel
    budget ``V0`` is the kept-unit fraction at which removing the same fraction of every
    layer gives that many FLOPs (ChipNet's own budget is over units, so it is mapped, not
    changed), and the official threshold is replaced by one over the same masks ``z``
    placed so the compacted FLOPs land at the target (within -3%..+3%, never above;
    :func:`baselines.common.ratio_for_flops`). The result's strength is then the target.
    ``budget="flops"`` (with ``target_flops``; method ``chipnet-flops``) trains to the
    paper's FLOPs budget instead of the mapped channel budget (:class:`FlopsObjective`)."""
    if budget not in ("channel", "flops") or (budget == "flops" and target_flops is None):
        raise ConfigError(f"ChipNet's budget is 'channel' or 'flops' (the latter with target_flops), got {budget!r}")
    epochs = max(1, setup.finetune_epochs) if prune_epochs is None else prune_epochs
    pre = pretrained if pretrained is not None else dense.train(setup)
    if target_flops is not None:
        zeros = {name: torch.zeros(site.units) for name, site in find_sites(pre.model, setup).items()}
        strength, _, _ = ratio_for_flops(lambda r: uniform_masks(zeros, r, setup.min_width), pre.model, setup,
                                         target_flops)
    _check(strength, epochs, lr, budget_weight, crispness_weight)
    target = 1.0 - strength
    model = copy.deepcopy(pre.model)
    gates = place(model, setup, lambda site: ChipNetMask(site.units, site.axis))
    make = None
    if budget == "flops":
        wm = flops_width_model(pre.model, setup)
        make = lambda steps: FlopsObjective(gates, wm, target_flops, steps, budget_weight, crispness_weight)
    stage, objective = prune_stage(model, list(gates.values()), setup, target, epochs, lr, weight_decay,
                                   budget_weight, crispness_weight, make_objective=make)
    with torch.no_grad():
        z = {name: g.mask().cpu() for name, g in gates.items()}
        budget_loss, crisp = objective.terms()
    flops_extra = {}
    if target_flops is None:
        keep, threshold = keep_decision(torch.cat(list(z.values())), target)
        masks, start = {}, 0
        for name, values in z.items():
            masks[name] = keep_top(values, keep[start:start + values.numel()], setup.min_width).float()
            start += values.numel()
    else:  # the lowest masks go first, as with the official threshold, until the FLOPs fit
        ratio, masks, reached = ratio_for_flops(lambda r: global_masks(z, r, setup.min_width), pre.model, setup,
                                                target_flops)
        masks = {name: m.float() for name, m in masks.items()}
        threshold = max((float(z[n][m == 0].max()) for n, m in masks.items() if (m == 0).any()), default=None)
        flops_extra = {"target_flops": target_flops, "ratio": ratio, "reached_flops": reached}
        strength = target_flops
    small = compact(freeze_gates(model, masks), setup.examples(), min_width=setup.min_width)
    before = test_accuracy(stage.trainer, small, setup)
    tuned = finetune(small, setup)
    stages = [pre, stage] if tuned is None else [pre, stage, tuned]
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return finish("chipnet" if budget == "channel" else "chipnet-flops", strength, small, stages, setup, widths_of(masks),
                  target_kept_fraction=target, kept_fraction=kept / total, threshold=threshold,
                  soft_kept_fraction=torch.cat(list(z.values())).gt(0.5).float().mean().item(),
                  final_budget_loss=budget_loss.item(), final_crispness_loss=crisp.item(),
                  beta=objective.beta, gamma=objective.gamma, steepness=objective.steepness,
                  prune_epochs=epochs, psi_lr=stage.trainer.optimizer.param_groups[1]["lr"],
                  test_acc_soft_masked=test_accuracy(stage.trainer, model, setup),
                  test_acc_before_finetune=before, reused_pretrained=pretrained is not None, **flops_extra)
