"""Training: :class:`TrainConfig` (options), :class:`Trainer` (the loop, resumable), and
DAM's training policy (:func:`build_optimizer`: the betas' own parameter group)."""
from torchdam.train.config import LOG_FORMATS, OPTIMIZERS, RESUMABLE_CHANGES, SCHEDULES, TrainConfig, lr_factor
from torchdam.train.loop import BEST_FILE, CHECKPOINT_DIR, STATE_FORMAT, Trainer
from torchdam.train.policy import BETA_GROUP, build_optimizer

__all__ = ["BEST_FILE", "BETA_GROUP", "CHECKPOINT_DIR", "LOG_FORMATS", "OPTIMIZERS", "RESUMABLE_CHANGES",
           "SCHEDULES", "STATE_FORMAT", "TrainConfig", "Trainer", "build_optimizer", "lr_factor"]
