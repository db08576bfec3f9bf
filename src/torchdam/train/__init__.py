"""Training: :class:`TrainConfig` (options, and every option's default), :class:`Trainer`
(the loop, resumable, batches of any layout), and DAM's training policy for any loop
(:func:`dam_param_groups`: the betas' own parameter group; :class:`DAMPolicy`: penalty
and cold start)."""
from torchdam.train.batch import ForwardFn, default_forward, to_device
from torchdam.train.config import LOG_FORMATS, OPTIMIZERS, RESUMABLE_CHANGES, SCHEDULES, TrainConfig, lr_factor
from torchdam.train.loop import BEST_FILE, CHECKPOINT_DIR, STATE_FORMAT, Trainer
from torchdam.train.policy import (BETA_GROUP, WEIGHTS_GROUP, DAMPolicy, Group, build_optimizer, dam_param_groups,
                                   param_groups)

__all__ = ["BEST_FILE", "BETA_GROUP", "CHECKPOINT_DIR", "DAMPolicy", "ForwardFn", "Group", "LOG_FORMATS",
           "OPTIMIZERS", "RESUMABLE_CHANGES", "SCHEDULES", "STATE_FORMAT", "TrainConfig", "Trainer",
           "WEIGHTS_GROUP", "build_optimizer", "dam_param_groups", "default_forward", "lr_factor",
           "param_groups", "to_device"]
