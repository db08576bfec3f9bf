import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from torchdam import ConfigError, DAMGate, ShapeError

GATES = ["relu_tanh", "linear", "piecewise_linear"]
REFERENCE = {
    "relu_tanh": lambda z: max(0.0, math.tanh(z)),
    "linear": lambda z: max(0.0, z),
    "piecewise_linear": lambda z: min(1.0, max(0.0, z)),
}


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
def test_mask_matches_paper_formula(gate, alpha):
    n, k, beta = 10, 5.0, -1.3
    g = DAMGate(n, gate=gate, k=k, beta_init=beta, alpha=alpha)
    expected = [REFERENCE[gate](alpha**2 * (k * j / n + beta)) for j in range(n)]
    assert torch.allclose(g.mask(), torch.tensor(expected), atol=1e-6)


def test_default_beta_init_per_gate_type():
    assert DAMGate(4).beta.item() == 1.0
    assert DAMGate(4, gate="linear").beta.item() == pytest.approx(0.1)
    assert DAMGate(4, gate="piecewise_linear").beta.item() == pytest.approx(0.1)
    # every unit starts on
    for gate in GATES:
        assert int(DAMGate(7, gate=gate).active()) == 7


def _paper_active_count(n: int, beta: float, k: float = 5.0) -> int:
    if beta > 0:
        return n
    return max(0, n - 1 - math.floor(-beta * n / k))


@pytest.mark.parametrize("gate", GATES)
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), beta=st.floats(-6.0, 2.0))
def test_active_count_follows_beta(gate, n, beta):
    t = -beta * n / 5.0
    if abs(t - round(t)) < 1e-3:  # float32 rounding decides exact boundaries
        return
    g = DAMGate(n, gate=gate, beta_init=beta)
    assert int(g.active()) == _paper_active_count(n, beta)
    # dead units are the lowest indices: the order is fixed
    live = (g.mask() > 0).nonzero().flatten().tolist()
    assert live == list(range(n - len(live), n))


@pytest.mark.parametrize("gate", GATES)
def test_vector_axis_is_last_dim(gate):
    g = DAMGate(6, gate=gate, beta_init=-2.0)
    x = torch.randn(3, 5, 6)
    g.axis = -1
    assert torch.equal(g(x), x * g.mask())
    g.axis = None  # auto on a 2-D input: last dim
    x2 = torch.randn(4, 6)
    assert torch.equal(g(x2), x2 * g.mask())


@pytest.mark.parametrize("gate", GATES)
def test_channel_axis_is_dim_1(gate):
    g = DAMGate(6, gate=gate, beta_init=-2.0)
    x = torch.randn(2, 6, 4, 5)
    out = g(x)
    assert torch.equal(out, x * g.mask().view(1, 6, 1, 1))
    dead = (g.mask() == 0).nonzero().flatten()
    assert len(dead) > 0 and torch.all(out[:, dead] == 0)


def test_gradient_reaches_beta_only_through_active_units():
    g = DAMGate(10, beta_init=-2.0)
    g(torch.ones(1, 10)).sum().backward()
    assert g.beta.grad is not None and g.beta.grad.item() > 0
    g2 = DAMGate(10, beta_init=-6.0)  # all dead: no gradient, as in the paper
    g2(torch.ones(1, 10)).sum().backward()
    assert g2.beta.grad.item() == 0.0


def test_state_dict_holds_only_beta():
    assert list(DAMGate(5).state_dict()) == ["beta"]


@pytest.mark.parametrize(
    "kwargs", [dict(n=0), dict(n=4, gate="sigmoid"), dict(n=4, k=0.0), dict(n=4, alpha=0.0), dict(n=2.5)]
)
def test_bad_arguments_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        DAMGate(**kwargs)


def test_wrong_width_input_raises_shape_error():
    with pytest.raises(ShapeError, match="4 units"):
        DAMGate(4)(torch.randn(2, 5))


def test_grouped_units_share_one_offset_and_switch_off_together():
    """A graph attention conv's heads: ``group`` consecutive units, one offset."""
    g = DAMGate(12, group=4)
    assert torch.allclose(g.mu, torch.tensor([0.0] * 4 + [5 * 4 / 12] * 4 + [5 * 8 / 12] * 4))
    for beta in torch.linspace(-5, 1, 25):
        g.beta.data.fill_(float(beta))
        assert int(g.active()) % 4 == 0
    assert "group=4" in repr(g) and "group" not in repr(DAMGate(12))
    with pytest.raises(ConfigError, match="group must divide"):
        DAMGate(10, group=4)
