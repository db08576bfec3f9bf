"""Nothing lost, nothing silently wrong: a gated model pickles, a run's folder and identity
are its own, every result is written whole, and every option and data file is checked
before the first epoch (docs/RELIABILITY.md)."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import torchdam
from torchdam import gates
from torchdam.errors import ConfigError


# ---------------------------------------------------------------------------- pickling

def _gated_zoo(gate: str) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    torchdam.attach(net, exclude=("6",), gate=gate, beta_init=-0.7)  # some units closed: the mask matters
    torchdam.attach(net, layers=("6",), gate=gate, fused=False)  # hook-applied gate too
    return net.eval()


@pytest.mark.parametrize("gate", sorted(gates.GATE_FUNCTIONS))
def test_torch_save_of_a_gated_model_round_trips(gate):
    """``torch.save(model)`` pickles the whole gated model (gate functions, fused forwards,
    hooks); loading it back gives the same outputs. ``torchdam.save`` stays the way to ship."""
    net = _gated_zoo(gate)
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False).eval()
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(again(x), net(x))
    assert torchdam.widths(again) == torchdam.widths(net)
    assert again[1].forward.host is again[1]  # the fused forward is bound to the copy, not the original


def test_a_gate_too_big_for_memory_is_a_config_error(monkeypatch):
    monkeypatch.setattr(gates, "available_memory", lambda: 2**20)
    with pytest.raises(ConfigError, match="GiB available"):
        torchdam.DAMGate(2**25)
