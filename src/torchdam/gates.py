"""The DAM gate (Bu et al., NeurIPS 2021, docs/METHOD.md section 1).

Unit j of n gets a fixed offset ``mu_j = k*j/n``; the layer shares one learnable scalar
``beta``. The gate ``g_j = f(alpha^2 * (mu_j + beta))`` multiplies unit j's output. As the
penalty pushes beta down, units switch off in a fixed order (low j first); a unit with
``g_j == 0`` is dead and :func:`torchdam.compact` removes it.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchdam.errors import ConfigError, ShapeError

#: The most units one gate may have: its offsets ``mu`` are ``n`` float32 values, and no
#: layer of any network we know of comes near 2**31 units.
MAX_UNITS = 2**31 - 1
#: Gate values are float32: beta, k and alpha**2 beyond this would be inf there.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def relu_tanh(z: Tensor) -> Tensor:
    """``max(0, tanh(z))``: the paper's gate."""
    return F.relu(torch.tanh(z))


def clamp_unit(z: Tensor) -> Tensor:
    """``min(1, max(0, z))``: the piecewise-linear gate."""
    return torch.clamp(z, 0.0, 1.0)


#: gate name -> (activation f, default beta_init). The linear variants start at 0.1 as in
#: the public code, so they begin close to the L0 surrogate's "all on" point. Module-level
#: functions, not lambdas, so that a gated model pickles (``torch.save(model)``).
GATE_FUNCTIONS: dict[str, tuple[Callable[[Tensor], Tensor], float]] = {
    "relu_tanh": (relu_tanh, 1.0),
    "linear": (F.relu, 0.1),
    "piecewise_linear": (clamp_unit, 0.1),
}


def available_memory() -> int | None:
    """Bytes of memory this machine can still hand out (Linux ``MemAvailable``), or
    ``None`` where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def real_number(name: str, value: object) -> float:
    """``value`` as a finite float, or :class:`ConfigError` naming ``name``.

    Accepts Python and numpy real numbers and one-element real tensors (read on the host:
    for options set once, not per step); refuses bools, strings, NaN and inf."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise ConfigError(f"{name} must be a real number, got a {value.dtype} tensor of shape "
                              f"{tuple(value.shape)}")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    return value


def whole_number(name: str, value: object) -> int:
    """``value`` as an int (Python/numpy integers, one-element integer tensors), or
    :class:`ConfigError` naming ``name``; bools and floats are refused."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point() \
            and not value.is_complex() and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    return int(value)


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
        group: units in consecutive blocks of ``group`` share one offset, so they switch off
            together (a graph attention conv's heads: ``n`` features, ``group`` per head).

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
        group: int = 1,
    ) -> None:
        super().__init__()
        try:
            n = whole_number("DAMGate's n (number of units)", n)
        except ConfigError:
            raise ConfigError(f"DAMGate needs a positive whole number of units, got n={n!r}") from None
        if not 1 <= n <= MAX_UNITS:
            raise ConfigError(f"DAMGate needs 1 <= n <= {MAX_UNITS} units, got n={n}")
        if not isinstance(gate, str) or gate not in GATE_FUNCTIONS:
            raise ConfigError(f"unknown gate type {gate!r}; choose one of: {', '.join(GATE_FUNCTIONS)}")
        k = real_number("DAMGate's k", k)
        if not 0 < k <= FLOAT32_MAX:
            raise ConfigError(f"DAMGate needs 0 < k <= {FLOAT32_MAX:.3g} (float32), got k={k!r}")
        alpha = real_number("DAMGate's alpha", alpha)
        if alpha == 0:
            raise ConfigError("DAMGate needs alpha != 0 (alpha=0 closes every gate)")
        if not abs(alpha) <= math.sqrt(FLOAT32_MAX):
            raise ConfigError(f"DAMGate needs |alpha| <= {math.sqrt(FLOAT32_MAX):.3g} (alpha**2 must be a "
                              f"float32), got alpha={alpha!r}")
        if beta_init is not None:
            beta_init = real_number("DAMGate's beta_init", beta_init)
            if not abs(beta_init) <= FLOAT32_MAX:
                raise ConfigError(f"DAMGate's beta_init must be a float32 (|beta_init| <= {FLOAT32_MAX:.3g}), "
                                  f"got {beta_init!r}")
        if axis is not None:
            axis = whole_number("DAMGate's axis", axis)
        group = whole_number("DAMGate's group", group)
        if group < 1 or n % group:
            raise ConfigError(f"DAMGate's group must divide its n={n} units, got group={group}")
        self.n = n
        self.axis = axis
        self.gate = gate
        self.k = k
        self.alpha = alpha
        if group != 1:
            self.group = group
        self._fn, default_beta = GATE_FUNCTIONS[gate]
        self.beta = nn.Parameter(torch.tensor(float(default_beta if beta_init is None else beta_init)))
        # mu is derived from (n, k): not persistent, so state_dicts carry only beta. Building
        # it takes ~3 float32 arrays of n; refuse up front what would only end in the OOM
        # killer (allocations are lazy, so the allocator alone would not say no in time).
        need = 12 * n
        free = available_memory() if n > 2**24 else None
        if free is not None and need > free:
            raise ConfigError(f"DAMGate over n={n} units needs about {need / 2**30:.1f} GiB for its offsets, "
                              f"more than the {free / 2**30:.1f} GiB available; is n the layer's width?")
        try:
            mu = self.k * (torch.arange(n) // group * group).float() / n
        except (RuntimeError, MemoryError) as err:  # the allocator's own error
            raise ConfigError(f"DAMGate over n={n} units needs {4 * n:,} bytes for its offsets and "
                              f"they cannot be allocated ({str(err).splitlines()[0][:120]})") from None
        self.register_buffer("mu", mu, persistent=False)

    #: units sharing one offset (an instance attribute only when not 1)
    group = 1

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
        return (f"n={self.n}, gate={self.gate!r}, k={self.k}, alpha={self.alpha}, axis={self.axis}"
                + (f", group={self.group}" if self.group != 1 else ""))
