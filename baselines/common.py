"""What every baseline shares: the setup it runs in, its result, and unit removal.

Every method prunes the same units: the outputs of the layers :func:`torchdam.attach`
would gate (``Setup.layers`` minus ``Setup.exclude``, never the output layer), each
scaled after the BatchNorm that directly follows it, if any. A method only decides a
keep-mask (or gate value) per unit; :func:`compact_masks` then hooks those values on the
same places a DAM gate would sit and lets :func:`torchdam.compact` remove the zeros, so
every method ends in a physically smaller model built by the same code, residual streams
included, and checked against the masked model's outputs.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from torchdam.attach import Selector, Site, attach, plan
from torchdam.budget import Budget
from torchdam.count import count
from torchdam.data import Splits
from torchdam.errors import ConfigError
from torchdam.masks import compact_masks as _compact_masks
from torchdam.masks import freeze_gates  # noqa: F401  (re-exported for the methods)
from torchdam.models import build_model
from torchdam.train import TrainConfig, Trainer

EVAL_BATCH = 1000


class NotApplicableError(ConfigError):
    """A method cannot run on this model (e.g. Network Slimming without BatchNorm)."""


@dataclass
class Setup:
    """What every method is run on, so a comparison changes only the method.

    ``config`` drives the main training stage (``config.epochs``, ``config.seed``: the
    same seed gives every method the same initial weights and batch order). Two-stage
    methods then fine-tune the compacted model for ``finetune_epochs`` epochs at
    ``finetune_lr`` (default ``config.lr / 10``) with the same schedule type.
    """

    #: a registered model name, or a zero-argument constructor (called after seeding)
    model: str | Callable[[], nn.Module]
    splits: Splits
    config: TrainConfig
    finetune_epochs: int = 0
    finetune_lr: float | None = None
    layers: Sequence[Selector] = (nn.Linear, nn.Conv2d)
    exclude: Sequence[Selector] = ()
    min_width: int = 1
    device: str = "cpu"
    #: traces the dependency graph and checks compaction; default: 8 validation images
    example_inputs: Tensor | None = None

    def __post_init__(self) -> None:
        if self.finetune_epochs < 0:
            raise ConfigError(f"finetune_epochs must be >= 0, got {self.finetune_epochs}")
        if self.finetune_lr is not None and self.finetune_lr <= 0:
            raise ConfigError(f"finetune_lr must be > 0, got {self.finetune_lr}")
        if self.min_width < 1:
            raise ConfigError(f"min_width must be >= 1, got {self.min_width}")

    def examples(self) -> Tensor:
        if self.example_inputs is not None:
            return self.example_inputs
        source = self.splits.val if len(self.splits.val) else self.splits.train
        return source.tensors[0][:8]

    def sample(self) -> Tensor:
        """One test input: FLOPs are counted per sample."""
        return self.splits.test.tensors[0][:1]

    @property
    def model_name(self) -> str:
        return self.model if isinstance(self.model, str) else getattr(self.model, "__name__", repr(self.model))

    def build(self) -> nn.Module:
        """The model, initialised from ``config.seed`` (identical for every method)."""
        torch.manual_seed(self.config.seed)
        if not isinstance(self.model, str):
            return self.model()
        channels, size = self.splits.input_shape[0], self.splits.input_shape[-1]
        return build_model(self.model, in_channels=channels, num_classes=self.splits.num_classes, image_size=size)


@dataclass
class Trained:
    """A model after one training stage, with what that stage cost."""

    model: nn.Module
    trainer: Trainer
    epochs: int
    seconds: float

    @property
    def records(self) -> list[dict]:
        return self.trainer.records


@dataclass
class Result:
    """One method at one strength: the compacted model and its measurements.

    ``params``/``flops`` are :func:`torchdam.count` of ``model`` on one test input (FLOPs
    per sample); ``dense_*`` the same for the unpruned architecture. ``test_acc`` is
    ``Trainer.evaluate`` of ``model`` on the test set. ``epochs_total``/``seconds_total``
    cover every training stage that produced ``model`` (a reused pretrained model's too).
    ``widths`` is ``{layer: (units kept, units before)}`` over the prunable layers.
    """

    method: str
    strength: float
    model: nn.Module
    test_acc: float | None
    params: int
    flops: int
    dense_params: int
    dense_flops: int
    widths: dict[str, tuple[int, int]]
    epochs_total: int
    seconds_total: float
    extra: dict = field(default_factory=dict)

    @property
    def params_ratio(self) -> float:
        """How many times fewer parameters than the dense model."""
        return self.dense_params / self.params

    @property
    def flops_ratio(self) -> float:
        return self.dense_flops / self.flops

    def summary(self) -> dict:
        """The numbers, without the model (JSON-ready)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("model", "extra")}
        out["widths"] = {k: list(v) for k, v in self.widths.items()}
        return {**out, "params_ratio": self.params_ratio, "flops_ratio": self.flops_ratio,
                **{k: v for k, v in self.extra.items() if k != "history"}}


def find_sites(model: nn.Module, setup: Setup) -> dict[str, Site]:
    """The prunable sites of ``model``: where :func:`torchdam.attach` puts DAM gates."""
    return plan(model, setup.layers, setup.exclude)


def place(model: nn.Module, setup: Setup, make_gate: Callable[[Site], nn.Module],
          fused: bool = True) -> dict[str, nn.Module]:
    """Hook ``make_gate(site)`` (in place) on every site, through :func:`torchdam.attach`."""
    return attach(model, setup.layers, setup.exclude, make_gate=make_gate, fused=fused)


def compact_masks(model: nn.Module, masks: dict[str, Tensor], setup: Setup) -> nn.Module:
    """A smaller copy of the gate-free ``model`` whose site outputs are scaled by
    ``masks[name]`` (units at 0 removed); sites without a mask keep every unit."""
    return _compact_masks(model, masks, setup.examples(), layers=setup.layers, exclude=setup.exclude,
                          min_width=setup.min_width)


def widths_of(masks: dict[str, Tensor]) -> dict[str, tuple[int, int]]:
    return {name: (int((m != 0).sum()), m.numel()) for name, m in masks.items()}


def keep_top(score: Tensor, keep: Tensor, min_width: int) -> Tensor:
    if int(keep.sum()) < min_width:
        keep = keep.clone()
        keep[torch.topk(score, min(min_width, score.numel())).indices] = True
    return keep


def uniform_masks(scores: dict[str, Tensor], ratio: float, min_width: int = 1) -> dict[str, Tensor]:
    """Remove the ``floor(ratio * n)`` lowest-scoring units of every layer."""
    _check_ratio(ratio)
    masks = {}
    for name, score in scores.items():
        keep = torch.ones(score.numel(), dtype=torch.bool)
        keep[torch.argsort(score, stable=True)[: int(ratio * score.numel())]] = False
        masks[name] = keep_top(score, keep, min_width)
    return masks


def global_masks(scores: dict[str, Tensor], ratio: float, min_width: int = 1) -> dict[str, Tensor]:
    """Remove the ``floor(ratio * N)`` lowest-scoring of all ``N`` units (one threshold for
    every layer); a layer left with fewer than ``min_width`` units keeps its best ones."""
    _check_ratio(ratio)
    names = list(scores)
    flat = torch.cat([scores[n].flatten() for n in names])
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[: int(ratio * flat.numel())]] = False
    masks, start = {}, 0
    for name in names:
        n = scores[name].numel()
        masks[name] = keep_top(scores[name], keep[start:start + n], min_width)
        start += n
    return masks


def _check_ratio(ratio: float) -> None:
    if not 0 <= ratio < 1:
        raise ConfigError(f"pruning ratio (strength) must be in [0, 1), got {ratio}")


def fit(model: nn.Module, config: TrainConfig, setup: Setup,
        extra_penalty: Callable[[nn.Module], Tensor] | None = None,
        adjust: Callable[[Trainer], None] | None = None, budget: Budget | None = None) -> Trained:
    """Train ``model`` in place on the setup's data; the validation set is logged each epoch.
    ``adjust(trainer)`` runs before training (e.g. to regroup the optimizer's parameters);
    ``budget`` trains to a size (:class:`torchdam.Budget`) instead of with ``config.lam``."""
    splits = setup.splits
    trainer = Trainer(model, config, device=setup.device, extra_penalty=extra_penalty, budget=budget)
    if adjust is not None:
        adjust(trainer)
    val = DataLoader(splits.val, batch_size=EVAL_BATCH) if len(splits.val) else None
    start = time.perf_counter()
    trainer.fit(DataLoader(splits.train, batch_size=config.batch_size, shuffle=True), val)
    return Trained(model, trainer, config.epochs, time.perf_counter() - start)


def finetune(small: nn.Module, setup: Setup) -> Trained | None:
    """Fine-tune a compacted model (in place) for ``setup.finetune_epochs``; ``None`` if 0."""
    if setup.finetune_epochs == 0:
        return None
    for p in small.parameters():
        p.requires_grad_(True)
    lr = setup.finetune_lr if setup.finetune_lr is not None else setup.config.lr / 10
    config = dataclasses.replace(setup.config, epochs=setup.finetune_epochs, lr=lr, cold_start=0)
    trained = fit(small, config, setup)
    small.eval()
    return trained


def test_accuracy(trainer: Trainer, model: nn.Module, setup: Setup) -> float | None:
    return trainer.evaluate(DataLoader(setup.splits.test, batch_size=EVAL_BATCH), model=model)["acc"]


def finish(method: str, strength: float, small: nn.Module, stages: Sequence[Trained], setup: Setup,
           widths: dict[str, tuple[int, int]], **extra) -> Result:
    """Measure ``small`` (the final model) and assemble the :class:`Result`."""
    small.eval()
    sample = setup.sample()
    dense = count(setup.build(), sample)
    measured = count(small, sample)
    extra["history"] = [s.records for s in stages]
    return Result(
        method=method,
        strength=float(strength),
        model=small,
        test_acc=test_accuracy(stages[-1].trainer, small, setup),
        params=measured["params"],
        flops=measured["flops"],
        dense_params=dense["params"],
        dense_flops=dense["flops"],
        widths=widths,
        epochs_total=sum(s.epochs for s in stages),
        seconds_total=sum(s.seconds for s in stages),
        extra=extra,
    )


def prune_and_finetune(method: str, strength: float, trained: Trained, masks: dict[str, Tensor],
                       setup: Setup, **extra) -> Result:
    """The second half of every train-prune-fine-tune method."""
    small = compact_masks(trained.model, masks, setup)
    extra["test_acc_before_finetune"] = test_accuracy(trained.trainer, small, setup)
    tuned = finetune(small, setup)
    stages = [trained] if tuned is None else [trained, tuned]
    return finish(method, strength, small, stages, setup, widths_of(masks), **extra)


#: A FLOPs-target run lands within this relative tolerance of the target, never above it
#: (the same +-3% as :data:`torchdam.budget.TOLERANCE`).
FLOPS_TOLERANCE = 0.03


def flops_fraction(model: nn.Module, masks: dict[str, Tensor], setup: Setup) -> float:
    """FLOPs per sample of ``model`` compacted under ``masks``, as a fraction of the dense
    architecture's (both by :func:`torchdam.count`)."""
    sample = setup.sample()
    small = compact_masks(model, {k: v.float() for k, v in masks.items()}, setup)
    return count(small, sample)["flops"] / count(setup.build(), sample)["flops"]


def masks_for(masks_at: Callable[[float], dict[str, Tensor]], model: nn.Module, setup: Setup,
              strength: float, target_flops: float | None) -> tuple[float, dict[str, Tensor], dict]:
    """``(strength, masks, extra)`` of a ratio-driven method: ``masks_at(strength)``, or with
    ``target_flops`` the ratio found by :func:`ratio_for_flops` (the strength is then the
    target, and ``extra`` records the target, the ratio and the FLOPs fraction reached)."""
    if target_flops is None:
        return strength, masks_at(strength), {}
    ratio, masks, reached = ratio_for_flops(masks_at, model, setup, target_flops)
    return target_flops, masks, {"target_flops": target_flops, "ratio": ratio, "reached_flops": reached}


def ratio_for_flops(masks_at: Callable[[float], dict[str, Tensor]], model: nn.Module, setup: Setup,
                    target: float, tolerance: float = FLOPS_TOLERANCE, iterations: int = 16
                    ) -> tuple[float, dict[str, Tensor], float]:
    """The smallest pruning ratio whose masks (``masks_at(ratio)``, more units removed as
    the ratio grows) compact ``model`` to at most ``target * (1 + tolerance)`` of the dense
    FLOPs, found by bisection (masks and counts are cheap; nothing is trained). Returns
    ``(ratio, masks, reached fraction)``; the reached fraction can fall below
    ``target * (1 - tolerance)`` only where one more unit costs more than the tolerance
    (e.g. a 6-channel conv) or where even the largest ratio cannot reach the target
    (then the largest ratio's masks are returned)."""
    if not 0 < target <= 1:
        raise ConfigError(f"a FLOPs target must be a fraction in (0, 1], got {target}")
    ceiling = target * (1.0 + tolerance)
    lo, hi = 0.0, 1.0 - 1e-6
    masks = masks_at(lo)
    reached = flops_fraction(model, masks, setup)
    if reached <= ceiling:
        return lo, masks, reached
    best = (hi, masks_at(hi))
    best_reached = flops_fraction(model, best[1], setup)
    if best_reached > ceiling:
        return hi, best[1], best_reached
    for _ in range(iterations):  # invariant: frac(lo) > ceiling >= frac(hi)
        mid = (lo + hi) / 2
        m = masks_at(mid)
        f = flops_fraction(model, m, setup)
        if f <= ceiling:
            hi, best, best_reached = mid, (mid, m), f
        else:
            lo = mid
    return best[0], best[1], best_reached
