"""DAM's training policy, in one place for every loop: the betas in their own parameter
group (own lr, no weight decay by default: decay would cap how far the penalty can push
beta), the penalty added to the task loss, and cold start (betas frozen for the first epochs)."""
from __future__ import annotations

import torch
from torch import nn

from torchdam.attach import gate_parameters
from torchdam.train.config import TrainConfig

BETA_GROUP = "dam_beta"


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Optimizer with group 0 ``"weights"`` (``weight_decay``) and, when the model has
    gates, group 1 ``"dam_beta"`` (``beta_lr``, ``beta_weight_decay``)."""
    betas = gate_parameters(model)
    beta_ids = {id(b) for b in betas}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in beta_ids]
    groups = [{"params": weights, "name": "weights", "weight_decay": config.weight_decay}]
    if betas:
        beta_lr = config.lr if config.beta_lr is None else config.beta_lr
        groups.append({"params": betas, "name": BETA_GROUP, "lr": beta_lr,
                       "weight_decay": config.beta_weight_decay})
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.Adam(groups, lr=config.lr)
