"""torchdam.masks: any per-unit decision, as masks, into a physically smaller model."""
from __future__ import annotations

import torch
from torch import nn

import torchdam as dam
from torchdam.masks import FixedMask, compact_masks, freeze_gates


def test_masks_scale_kept_units_and_remove_zeros() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 6),
                        nn.ReLU(), nn.Linear(6, 2)).eval()
    conv_mask = torch.tensor([1.0, 0, 0.5, 1, 0, 1, 1, 0])
    fc_mask = torch.tensor([0.0, 1, 1, 0, 2, 1])
    small = compact_masks(net, {"0": conv_mask, "4": fc_mask}, torch.randn(4, 3, 6, 6))
    assert small[0].out_channels == 5 and small[1].num_features == 5 and small[4].out_features == 4
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        h = net[1](net[0](x)) * conv_mask.view(1, -1, 1, 1)
        h = torch.relu(net[4](torch.relu(h).flatten(1))) * fc_mask
        expected = net[6](h)
        assert torch.allclose(small(x), expected, atol=1e-5)
    assert dam.count(small, x[:1])["flops"] < dam.count(net, x[:1])["flops"]


def test_unmasked_sites_keep_every_unit_and_the_source_is_untouched() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    small = compact_masks(net, {"2": torch.tensor([0.0, 0, 1, 1, 1, 1, 1, 1])}, torch.randn(2, 4))
    assert small[0].out_features == 8 and small[2].out_features == 6
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(isinstance(m, FixedMask) for m in net.modules())


def test_freeze_gates_hands_a_trained_decision_to_compact() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    dam.attach(net)
    frozen = freeze_gates(net, {"0": torch.tensor([0.0, 1, 1, 1, 0, 1, 1, 1])})
    assert isinstance(frozen[0].dam_gate, FixedMask) and not isinstance(net[0].dam_gate, FixedMask)
    small = dam.compact(frozen, torch.randn(3, 4))
    assert small[0].out_features == 6
