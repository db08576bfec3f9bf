"""The DAM gate (Bu et al., NeurIPS 2021, PAPER.md section 1).

Unit j of n gets a fixed offset ``mu_j = k*j/n``; the layer shares one learnable scalar
``beta``. The gate ``g_j = f(alpha^2 * (mu_j + beta))`` multiplies unit j's output. As the
penalty pushes beta down, units switch off in a fixed order (low j first); a unit with
``g_j == 0`` is dead and :func:`torchdam.compact` removes it.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchdam.errors import ConfigError, ShapeError

#: gate name -> (activation f, default beta_init). The linear variants start at 0.1 as in
#: the public code, so they begin close to the L0 surrogate's "all on" point.
GATE_FUNCTIONS: dict[str, tuple[Callable[[Tensor], Tensor], float]] = {
    "relu_tanh": (lambda z: F.relu(torch.tanh(z)), 1.0),
    "linear": (F.relu, 0.1),
    "piecewise_linear": (lambda z: torch.clamp(z, 0.0, 1.0), 0.1),
}


class DAMGate(nn.Module):
    """Discriminative mask over ``n`` units of a layer's output.

    Args:
        n: number of units (features of a Linear, channels of a Conv).
        axis: the unit axis of the input; ``None`` means dim 1 for ``N,C,...`` maps and
            the last dim for vectors.
        gate: ``"relu_tanh"`` (paper default), ``"linear"`` or ``"piecewise_linear"``.
        k: spread of the offsets ``mu_j = k*j/n`` (5 in the paper).
        beta_init: initial beta; ``None`` takes the gate type's default (1.0 / 0.1).
        alpha: slope, frozen (1 in every experiment of the paper).

    Example:
        >>> g = DAMGate(4)
        >>> g(torch.ones(2, 4)).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        n: int,
        axis: int | None = None,
        gate: str = "relu_tanh",
        k: float = 5.0,
        beta_init: float | None = None,
        alpha: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"DAMGate needs a positive number of units, got n={n!r}")
        if gate not in GATE_FUNCTIONS:
            raise ConfigError(f"unknown gate type {gate!r}; choose one of: {', '.join(GATE_FUNCTIONS)}")
        if not k > 0:
            raise ConfigError(f"DAMGate needs k > 0, got k={k!r}")
        if alpha == 0:
            raise ConfigError("DAMGate needs alpha != 0 (alpha=0 closes every gate)")
        self.n = n
        self.axis = axis
        self.gate = gate
        self.k = float(k)
        self.alpha = float(alpha)
        self._fn, default_beta = GATE_FUNCTIONS[gate]
        self.beta = nn.Parameter(torch.tensor(float(default_beta if beta_init is None else beta_init)))
        # mu is derived from (n, k): not persistent, so state_dicts carry only beta.
        self.register_buffer("mu", self.k * torch.arange(n, dtype=torch.float32) / n, persistent=False)

    def mask(self) -> Tensor:
        """Gate values g (shape ``(n,)``), differentiable in beta."""
        z = self.mu + self.beta
        # alpha is 1 in every experiment of the paper; skipping the multiply by 1 saves an
        # op in every forward and backward (the values are identical).
        return self._fn(z if self.alpha == 1.0 else self.alpha**2 * z)

    def active(self) -> Tensor:
        """Number of live units (g > 0) as a 0-dim tensor: no host sync."""
        return (self.mask() > 0).sum()

    def unit_axis(self, x: Tensor) -> int:
        if self.axis is not None:
            return self.axis % x.dim()
        return 1 if x.dim() > 2 else x.dim() - 1

    def forward(self, x: Tensor) -> Tensor:
        axis = self.unit_axis(x)
        if x.shape[axis] != self.n:
            raise ShapeError(
                f"DAMGate over {self.n} units got an input of shape {tuple(x.shape)} "
                f"({x.shape[axis]} units on axis {axis})"
            )
        g = self.mask()
        if g.dtype != x.dtype:
            g = g.to(x.dtype)
        if axis != x.dim() - 1:
            g = g.view([-1] + [1] * (x.dim() - axis - 1))
        return x * g

    def extra_repr(self) -> str:
        return f"n={self.n}, gate={self.gate!r}, k={self.k}, alpha={self.alpha}, axis={self.axis}"
