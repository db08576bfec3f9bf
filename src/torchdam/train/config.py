"""Options of the training loop: one dataclass, validated once when it is made.

Its field defaults are THE defaults: the ``torchdam`` command line reads them from here
(``TrainConfig.lam``), so an option has one default wherever it is offered."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from torchdam.budget import REACH_AT, ROUND_TO
from torchdam.errors import ConfigError

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "step", "none")
LOG_FORMATS = ("jsonl", "csv")
#: Options that may change between a run and its resume without changing its result.
RESUMABLE_CHANGES = frozenset({"progress", "checkpoint_every", "log_format"})
#: Seeds are handed to torch (64 bits), numpy and DistributedSampler (seed + epoch).
MAX_SEED = 2**63 - 1
#: A batch or epoch count beyond this cannot be indexed (``sys.maxsize`` on 32-bit builds).
MAX_COUNT = 2**31 - 1
#: The optimiser computes in float32: a larger lr, decay or lambda is inf there.
FLOAT32_MAX = 3.4028234663852886e38


def check_whole(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be a whole number, got {value!r}")


def check_finite(key: str, value: object) -> None:
    """A finite int/float (not a bool) that float32 can hold, or None."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if abs(value) > FLOAT32_MAX:
        raise ConfigError(f"{key} must be at most {FLOAT32_MAX:.4g} (training computes in float32), got {value!r}")


def check_lam(lam: object) -> None:
    """lambda must be a finite number >= 0 (checked once, where a run is configured, not
    on every step)."""
    check_finite("lam", lam)
    if lam is None or lam < 0:
        raise ConfigError(f"lam (lambda) must be >= 0, got {lam}")


def check_cold_start(cold_start: object) -> None:
    check_whole("cold_start", cold_start)
    if cold_start < 0:
        raise ConfigError(f"cold_start must be >= 0, got {cold_start}")


@dataclass
class TrainConfig:
    """Options of :class:`Trainer`. Epochs in ``milestones`` and ``cold_start`` count from
    0 (like ``torch.optim.lr_scheduler.MultiStepLR``): ``cold_start=20`` freezes beta for
    epochs 1..20 as logged; ``milestones=(100,)`` lowers the lr from logged epoch 101."""

    epochs: int = 15
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    #: the betas' learning rate (None: the weights' ``lr``); it sets the pruning speed
    beta_lr: float | None = 0.002
    # Decay on beta would cap how far the penalty can push it (docs/METHOD.md section 2).
    beta_weight_decay: float = 0.0
    #: lambda, the penalty's weight
    lam: float = 0.15
    cold_start: int = 0
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    seed: int = 0
    progress: bool = True
    log_format: str = "jsonl"
    #: Also checkpoint every this many optimizer steps (0: only at each epoch's end).
    checkpoint_every: int = 0
    #: Budget mode (:mod:`torchdam.budget`): train to this fraction of the dense model's
    #: FLOPs or parameters (give one); ``lam`` and ``beta_lr`` are then not used.
    target_flops: float | None = None
    target_params: float | None = None
    #: Fraction of the steps by which the target is reached (then the widths freeze).
    reach_at: float = REACH_AT
    #: ``"cost"`` (default with a target) or ``"uniform"`` (the paper's mean(beta)).
    penalty: str | None = None
    #: Snapped widths are multiples of this (budget mode; attention heads are not rounded).
    round_to: int = ROUND_TO

    def __post_init__(self) -> None:
        try:
            self.milestones = tuple(self.milestones)
        except TypeError:
            raise ConfigError(f"milestones must be a sequence of whole numbers, got {self.milestones!r}") from None
        for key in ("epochs", "batch_size", "cold_start", "seed", "checkpoint_every"):
            check_whole(key, getattr(self, key))
        if any(isinstance(m, bool) or not isinstance(m, numbers.Integral) for m in self.milestones):
            raise ConfigError(f"milestones must be whole numbers, got {self.milestones!r}")
        self.milestones = tuple(int(m) for m in self.milestones)
        for key in ("lr", "beta_lr", "momentum", "weight_decay", "beta_weight_decay", "gamma"):
            check_finite(key, getattr(self, key))
        check_lam(self.lam)
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.epochs <= MAX_COUNT, f"epochs must be <= {MAX_COUNT}, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.batch_size <= MAX_COUNT, f"batch_size must be <= {MAX_COUNT}, got {self.batch_size}"),
            (0 <= self.seed <= MAX_SEED, f"seed must be between 0 and 2**63-1, got {self.seed}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.beta_lr is None or self.beta_lr >= 0, f"beta_lr must be >= 0, got {self.beta_lr}"),
            (self.momentum >= 0, f"momentum must be >= 0, got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.beta_weight_decay >= 0, f"beta_weight_decay must be >= 0, got {self.beta_weight_decay}"),
            (0 <= self.cold_start <= self.epochs,
             f"cold_start must be between 0 and epochs={self.epochs}, got {self.cold_start}"),
            (self.optimizer in OPTIMIZERS,
             f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}"),
            (self.schedule in SCHEDULES,
             f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}"),
            (self.log_format in LOG_FORMATS,
             f"unknown log_format {self.log_format!r}; choose one of: {', '.join(LOG_FORMATS)}"),
            (self.gamma > 0, f"gamma must be > 0, got {self.gamma}"),
            (all(m >= 0 for m in self.milestones), f"milestones must be >= 0, got {self.milestones}"),
            (self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}"),
            (self.checkpoint_every <= MAX_SEED, f"checkpoint_every must be <= 2**63-1, got {self.checkpoint_every}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        from torchdam.budget import check_config  # the budget options are checked where they are used

        check_config(self)


def lr_factor(config: TrainConfig, epoch: int) -> float:
    """Multiplier of the base learning rate during 0-based ``epoch``."""
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
    if config.schedule == "step":
        return config.gamma ** sum(epoch >= m for m in config.milestones)
    return 1.0
