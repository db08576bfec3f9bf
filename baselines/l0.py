"""L0 regularisation with hard-concrete gates (Louizos, Welling, Kingma, ICLR 2018),
on units: one gate per output unit of every prunable layer, single stage.

Gate j has a learnable ``log_alpha_j``. In training each forward draws, per sample and
unit (as the paper's code does), ``u ~ U(0, 1)``, ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``,
``z = clamp(s * (zeta - gamma) + gamma, 0, 1)``; at test time
``z = clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)`` (deterministic). The
penalty is ``strength * sum_j P(z_j != 0)``, the expected number of active units, with
``P(z_j != 0) = sigmoid(log_alpha_j - beta * log(-gamma / zeta))``. After training the
deterministic gates are folded into the weights and units whose gate is exactly 0 are
removed, so the compacted model computes what the gated model does in eval mode.

Constants as in the paper: beta = 2/3, gamma = -0.1, zeta = 1.1; log_alpha starts at
``log(1 - d) - log(d)`` plus N(0, 0.01^2) noise, d = ``droprate_init`` (0.3, the paper's
value for its wide ResNets).

log_alpha trains in its own optimizer group (lr ``gate_lr``, default ``GATE_LR_FACTOR`` x the
weights' lr, no decay); why, and how the factor was chosen: ``docs/baselines/l0.md``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from baselines.common import Result, Setup, finish, fit, freeze_gates, place, test_accuracy, widths_of
from torchdam.compact import compact
from torchdam.errors import ConfigError, ShapeError
from torchdam.train import Group, Trainer, lr_factor, param_groups

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
EPS = 1e-6
#: default log_alpha lr = this x the weights' lr (see the module docstring)
GATE_LR_FACTOR = 20.0


class HardConcreteGate(nn.Module):
    """Hard-concrete gates over ``n`` units (unit axis as :class:`torchdam.DAMGate`:
    dim 1 for ``N, C, ...`` maps, the last dim for vectors). In training mode
    :meth:`forward` draws one gate per sample and unit; in eval mode the gates are
    deterministic. Hooked on the host like a DAM gate, through the forward hook (the fused
    DAM forwards scale weights by one ``(n,)`` mask; see :func:`run`)."""

    def __init__(self, n: int, axis: int | None = None, droprate_init: float = 0.3,
                 beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA) -> None:
        super().__init__()
        if not 0 < droprate_init < 1:
            raise ConfigError(f"droprate_init must be in (0, 1), got {droprate_init}")
        if not (gamma < 0 and zeta > 1 and beta > 0):
            raise ConfigError(f"hard-concrete needs gamma < 0 < 1 < zeta and beta > 0, got "
                              f"gamma={gamma}, zeta={zeta}, beta={beta}")
        self.n, self.axis = n, axis
        self.beta, self.gamma, self.zeta = beta, gamma, zeta
        mean = math.log(1 - droprate_init) - math.log(droprate_init)
        self.log_alpha = nn.Parameter(mean + 0.01 * torch.randn(n))

    def prob_nonzero(self) -> Tensor:
        """``P(z_j != 0)`` per unit: the expected-L0 contribution of each gate."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))

    def expected_l0(self) -> Tensor:
        return self.prob_nonzero().sum()

    def deterministic(self) -> Tensor:
        """The test-time gate values; exactly 0 for units to remove."""
        return torch.clamp(torch.sigmoid(self.log_alpha) * (self.zeta - self.gamma) + self.gamma, 0.0, 1.0)

    def sample(self, batch: int | None = None) -> Tensor:
        """Stochastic gates reparametrised in log_alpha: shape ``(n,)``, or ``(batch, n)``
        (independent draws per sample)."""
        shape = (self.n,) if batch is None else (batch, self.n)
        u = torch.rand(shape, device=self.log_alpha.device).clamp(EPS, 1 - EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return torch.clamp(s * (self.zeta - self.gamma) + self.gamma, 0.0, 1.0)

    def mask(self) -> Tensor:
        """One ``(n,)`` mask: a single draw (shared by a batch) in training mode, the
        deterministic gates in eval mode."""
        return self.sample() if self.training else self.deterministic()

    def forward(self, x: Tensor) -> Tensor:
        axis = self.axis % x.dim() if self.axis is not None else (1 if x.dim() > 2 else x.dim() - 1)
        if x.shape[axis] != self.n:
            raise ShapeError(f"HardConcreteGate over {self.n} units got shape {tuple(x.shape)}")
        if self.training and axis > 0:  # one draw per sample (dim 0) and unit
            shape = [1] * x.dim()
            shape[0], shape[axis] = x.shape[0], self.n
            return x * self.sample(x.shape[0]).to(x.dtype).view(shape)
        return x * self.mask().to(x.dtype).view([-1] + [1] * (x.dim() - axis - 1))

    def extra_repr(self) -> str:
        return f"n={self.n}, beta={self.beta:.4g}, gamma={self.gamma}, zeta={self.zeta}, axis={self.axis}"


def gates_of(model: nn.Module) -> dict[str, HardConcreteGate]:
    return {getattr(m, "producer_name", n): m for n, m in model.named_modules() if isinstance(m, HardConcreteGate)}


def expected_l0(model: nn.Module) -> Tensor:
    """Sum of every hard-concrete gate's expected L0 in ``model``."""
    return torch.stack([g.expected_l0() for g in gates_of(model).values()]).sum()


def _own_gate_group(trainer: Trainer, model: nn.Module, gate_lr: float) -> None:
    """Rebuild the trainer's optimizer (same class and settings) with every ``log_alpha``
    in its own group (``gate_lr``, no weight decay), scheduled like the weights."""
    gates = [g.log_alpha for g in gates_of(model).values()]
    old = trainer.optimizer
    groups = param_groups(model, {"l0_log_alpha": Group(gates, lr=gate_lr, weight_decay=0.0)},
                          weight_decay=old.param_groups[0]["weight_decay"])
    trainer.optimizer = type(old)(groups, **old.defaults)
    config = trainer.config
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda e: lr_factor(config, e))


def run(setup: Setup, strength: float, *, droprate_init: float = 0.3, gate_lr: float | None = None) -> Result:
    """Train with ``strength * expected_l0(model)`` added to the loss, then remove the units
    whose deterministic gate is 0. ``finetune_epochs`` is ignored (single stage)."""
    if strength < 0:
        raise ConfigError(f"L0 strength (lambda) must be >= 0, got {strength}")
    if gate_lr is None:
        gate_lr = GATE_LR_FACTOR * setup.config.lr
    if not gate_lr > 0:
        raise ConfigError(f"L0 gate_lr must be > 0, got {gate_lr}")
    model = setup.build()
    place(model, setup, lambda site: HardConcreteGate(site.units, site.axis, droprate_init), fused=False)
    trained = fit(model, setup.config, setup, extra_penalty=lambda m: strength * expected_l0(m),
                  adjust=lambda trainer: _own_gate_group(trainer, model, gate_lr))
    masks = {name: g.deterministic().detach().cpu() for name, g in gates_of(model).items()}
    small = compact(freeze_gates(model, masks), setup.examples(), min_width=setup.min_width)
    return finish("l0", strength, small, [trained], setup, widths_of(masks), droprate_init=droprate_init,
                  gate_lr=gate_lr, test_acc_gated=test_accuracy(trained.trainer, model, setup),
                  expected_l0=expected_l0(model).detach().item())
