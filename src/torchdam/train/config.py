"""Options of the training loop: one dataclass, validated once when it is made."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

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


@dataclass
class TrainConfig:
    """Options of :class:`Trainer`. Epochs in ``milestones`` and ``cold_start`` count from
    0 (like ``torch.optim.lr_scheduler.MultiStepLR``): ``cold_start=20`` freezes beta for
    epochs 1..20 as logged; ``milestones=(100,)`` lowers the lr from logged epoch 101."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    beta_lr: float | None = None
    # Decay on beta would cap how far the penalty can push it (PAPER.md section 2).
    beta_weight_decay: float = 0.0
    lam: float = 0.5
    cold_start: int = 0
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    seed: int = 0
    progress: bool = True
    log_format: str = "jsonl"
    #: Also checkpoint every this many optimizer steps (0: only at each epoch's end).
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        try:
            self.milestones = tuple(self.milestones)
        except TypeError:
            raise ConfigError(f"milestones must be a sequence of whole numbers, got {self.milestones!r}") from None
        for key in ("epochs", "batch_size", "cold_start", "seed", "checkpoint_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{key} must be a whole number, got {value!r}")
        if any(isinstance(m, bool) or not isinstance(m, numbers.Integral) for m in self.milestones):
            raise ConfigError(f"milestones must be whole numbers, got {self.milestones!r}")
        self.milestones = tuple(int(m) for m in self.milestones)
        for key in ("lr", "beta_lr", "momentum", "weight_decay", "beta_weight_decay", "lam", "gamma"):
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            if abs(value) > FLOAT32_MAX:
                raise ConfigError(f"{key} must be at most {FLOAT32_MAX:.4g} (training computes in float32), "
                                  f"got {value!r}")
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
            (self.lam >= 0, f"lam (lambda) must be >= 0, got {self.lam}"),
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


def lr_factor(config: TrainConfig, epoch: int) -> float:
    """Multiplier of the base learning rate during 0-based ``epoch``."""
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
    if config.schedule == "step":
        return config.gamma ** sum(epoch >= m for m in config.milestones)
    return 1.0
