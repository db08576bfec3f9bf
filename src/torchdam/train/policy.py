"""DAM's training policy, in one place for every loop (:class:`~torchdam.train.Trainer`,
the Lightning and Hugging Face callbacks, the experiments' own loops, yours):

- **the betas in their own parameter group** (:func:`dam_param_groups`): own learning rate
  (with Adam it, not lambda, sets the pruning speed), no weight decay by default (decay
  would cap how far the penalty can push beta, and with it how much can be pruned);
- **the penalty** ``lam * mean(beta)`` on the task loss (:meth:`DAMPolicy.penalty`), or its
  gradient added after a backward that did not include it (:meth:`DAMPolicy.after_backward`);
- **cold start** (:meth:`DAMPolicy.after_backward`): the betas' grads are dropped for the
  first ``cold_start`` epochs, so neither momentum nor Adam moves them. Dropping the grad
  rather than setting ``requires_grad=False`` keeps DDP's set of reduced parameters fixed.

A loop of your own::

    opt = torch.optim.AdamW(dam_param_groups(model, lr=1e-3, beta_lr=1e-2))
    policy = DAMPolicy(lam=0.1, cold_start=1)
    loss = task_loss + policy.penalty(model)
    loss.backward()
    policy.after_backward(model, epoch)
    opt.step()

:func:`param_groups` is the general form (any parameters in groups of their own, each with
its own lr and weight decay), used for the betas here and for the baselines' gate
parameters (L0's log_alpha, ChipNet's psi).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from torchdam.attach import gate_parameters, penalty
from torchdam.errors import ConfigError
from torchdam.train.config import TrainConfig, check_cold_start, check_lam

WEIGHTS_GROUP = "weights"
BETA_GROUP = "dam_beta"


class Group(NamedTuple):
    """Parameters trained in a group of their own; ``lr=None`` keeps the optimizer's lr."""

    params: Sequence[nn.Parameter]
    lr: float | None = None
    weight_decay: float = 0.0


def param_groups(model: nn.Module, special: Mapping[str, Group | tuple], *, lr: float | None = None,
                 weight_decay: float = 0.0) -> list[dict]:
    """Torch optimizer parameter groups: group 0 ``"weights"`` holds every trainable
    parameter of ``model`` that is in no special group (``lr``, ``weight_decay``; ``lr=None``
    leaves the optimizer's default), then one group per ``special`` entry, in order, named
    by its key, with its own ``lr`` and ``weight_decay``. Special groups with no parameters
    are left out (a model without gates gets no beta group); a parameter may be in one
    special group only."""
    groups, claimed = [], set()
    for name, entry in special.items():
        group = Group(*entry)
        params = list(group.params)
        ids = {id(p) for p in params}
        if ids & claimed or len(ids) != len(params):
            raise ConfigError(f"param_groups: a parameter of group {name!r} is listed twice")
        claimed |= ids
        if params:
            spec = {"params": params, "name": name, "weight_decay": group.weight_decay}
            if group.lr is not None:
                spec["lr"] = group.lr
            groups.append(spec)
    weights = {"params": [p for p in model.parameters() if p.requires_grad and id(p) not in claimed],
               "name": WEIGHTS_GROUP, "weight_decay": weight_decay}
    if lr is not None:
        weights["lr"] = lr
    return [weights, *groups]


def dam_param_groups(model: nn.Module, lr: float, beta_lr: float | None, weight_decay: float = 0.0,
                     beta_weight_decay: float = 0.0, special: Mapping[str, Group | tuple] | None = None,
                     ) -> list[dict]:
    """DAM's parameter groups for any torch optimizer: ``"weights"`` (``lr``,
    ``weight_decay``), any ``special`` groups, then ``"dam_beta"`` with every gate's beta
    (``beta_lr``, or ``lr`` when it is None; ``beta_weight_decay``, 0 by default). Betas
    listed in ``special`` stay in the beta group."""
    betas = gate_parameters(model)
    beta_ids = {id(b) for b in betas}
    others = {name: Group(*entry) for name, entry in (special or {}).items()}
    others = {name: g._replace(params=[p for p in g.params if id(p) not in beta_ids]) for name, g in others.items()}
    beta_group = Group(betas, lr if beta_lr is None else beta_lr, beta_weight_decay)
    return param_groups(model, {**others, BETA_GROUP: beta_group}, lr=lr, weight_decay=weight_decay)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The :class:`~torchdam.train.Trainer`'s optimizer (SGD with momentum, or Adam) over
    :func:`dam_param_groups`: group 0 ``"weights"`` and, when the model has gates, group 1
    ``"dam_beta"``."""
    groups = dam_param_groups(model, config.lr, config.beta_lr, config.weight_decay, config.beta_weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.Adam(groups, lr=config.lr)


@dataclass(frozen=True)
class DAMPolicy:
    """The penalty and cold start of DAM, validated once here rather than on every step.

    ``lam``: lambda, the penalty's weight (>= 0). ``cold_start``: epochs, counted from 0,
    during which the betas do not move (``cold_start=2`` freezes them in epochs 0 and 1)."""

    lam: float
    cold_start: int = 0

    def __post_init__(self) -> None:
        check_lam(self.lam)
        check_cold_start(self.cold_start)

    @classmethod
    def from_config(cls, config: TrainConfig) -> "DAMPolicy":
        return cls(config.lam, config.cold_start)

    def frozen(self, epoch: int) -> bool:
        """Whether the betas are frozen during 0-based ``epoch``."""
        return epoch < self.cold_start

    def penalty(self, model: nn.Module) -> Tensor:
        """``lam * mean_i clamp(beta_i, min=-5)``, to add to the task loss
        (:func:`torchdam.penalty`; the model must have gates)."""
        return penalty(model, self.lam)

    def after_backward(self, model: nn.Module, epoch: int, *, penalty_scale: float | None = None) -> None:
        """Call between ``backward()`` and ``optimizer.step()`` on every step.

        During cold start it drops the betas' grads. Otherwise, given ``penalty_scale``, it
        adds ``penalty_scale * d penalty / d beta`` to them: for loops whose loss does not
        contain the penalty (Lightning, Hugging Face), where ``penalty_scale`` is what the
        framework scaled its loss by (AMP loss scale, 1/accumulation steps). Going in as a
        gradient leaves the user's loss untouched and DDP's gradient hooks fire once."""
        if self.frozen(epoch):
            for beta in gate_parameters(model):
                beta.grad = None
            return
        if penalty_scale is None or self.lam == 0:
            return
        betas = gate_parameters(model)
        with torch.enable_grad():
            grads = torch.autograd.grad(penalty(model, self.lam) * penalty_scale, betas)
        for beta, grad in zip(betas, grads):
            beta.grad = grad if beta.grad is None else beta.grad + grad
