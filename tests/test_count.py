import torch
from torch import nn

import torchdam as dam
from torchdam.compact import compact
from torchdam.count import count, latency, profile


def test_params_and_flops_of_a_linear_stack():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    stats = count(model, torch.randn(1, 10))
    assert stats == {"params": 10 * 20 + 20 + 20 * 5 + 5, "flops": 2 * (10 * 20 + 20 * 5)}


def test_conv_flops_scale_with_batch_and_channels():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    one = count(conv, torch.randn(1, 3, 8, 8))["flops"]
    assert one == 2 * 8 * 8 * 8 * 3 * 9
    assert count(conv, torch.randn(4, 3, 8, 8))["flops"] == 4 * one


def test_gated_model_counts_full_width_compacted_counts_what_runs():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    dam.attach(model)["0"].beta.data.fill_(-2.5)  # 20 units: j > 10 live -> 9
    x = torch.randn(1, 10)
    assert count(model, x)["params"] == 325  # beta not counted
    small = compact(model, x)
    assert count(small, x) == {"params": 10 * 9 + 9 + 9 * 5 + 5, "flops": 2 * (10 * 9 + 9 * 5)}


def test_latency_and_profile_report_positive_medians():
    model = nn.Linear(16, 4)
    assert latency(model, torch.randn(2, 16), repeats=5, warmup=1) > 0
    stats = profile(model, torch.randn(1, 16), batch_sizes=(1, 8), repeats=3)
    assert stats["latency_ms_b1"] > 0 and stats["latency_ms_b8"] > 0 and stats["params"] == 68
