"""Hugging Face diffusers' UNets as their users build them (from a config, random weights,
nothing downloaded): default ``attach``, a training step with the penalty, mixed live/dead
gates, ``compact`` under ``torch.no_grad()``; the compacted UNet gives the gated one's
outputs and is smaller. A ResNet block's ``conv1`` is gated after its ``norm2`` (a
GroupNorm its time embedding is added before), so its channels leave in whole groups with
the time embedding's rows; attention heads leave whole."""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo_checks import assert_no_dam_state

import torchdam as dam
from torchdam.budget import TOLERANCE, Budget, WidthModel, _beta_for

D = pytest.importorskip("diffusers")

UNET = {"sample_size": 16, "layers_per_block": 1, "block_out_channels": (32, 64), "norm_num_groups": 8}


def unet(**extra) -> nn.Module:
    return D.UNet2DModel(in_channels=3, out_channels=3, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                         up_block_types=("AttnUpBlock2D", "UpBlock2D"), **UNET, **extra)


def unet_inputs(batch: int, gen: torch.Generator) -> tuple:
    return torch.randn(batch, 3, 16, 16, generator=gen), torch.randint(0, 1000, (batch,), generator=gen)


def conditional() -> nn.Module:
    return D.UNet2DConditionModel(in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                                  attention_head_dim=8, **UNET)


def conditional_inputs(batch: int, gen: torch.Generator) -> tuple:
    return (torch.randn(batch, 4, 16, 16, generator=gen), torch.randint(0, 1000, (batch,), generator=gen),
            torch.randn(batch, 7, 24, generator=gen))


@dataclass(frozen=True)
class Family:
    make: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], tuple]


FAMILIES = {
    "unet2d": Family(unet, unet_inputs),
    "unet2d_scale_shift": Family(lambda: unet(resnet_time_scale_shift="scale_shift"), unet_inputs),
    "unet2d_condition": Family(conditional, conditional_inputs),
}


@dataclass
class Compacted:
    gated: nn.Module
    small: nn.Module
    gates: dict
    fresh: tuple


@functools.cache
def compacted(family: str) -> Compacted:
    fam = FAMILIES[family]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = fam.make()
    gates = dam.attach(model)
    model.train()
    out = model(*fam.inputs(2, gen)).sample
    (F.mse_loss(out, torch.zeros_like(out)) + dam.penalty(model, 1.0)).backward()
    with torch.no_grad():
        for g in gates.values():
            g.beta.fill_(-2.0)  # units j < 0.4 n dead (heads and groups: whole ones)
    model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        small = dam.compact(model, fam.inputs(2, gen))
    return Compacted(model, small, gates, fam.inputs(3, gen))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_unet_compacts_exactly_and_smaller(family):
    c = compacted(family)
    with torch.no_grad():
        ref, got = c.gated(*c.fresh).sample, c.small(*c.fresh).sample
    assert (ref - got).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    assert_no_dam_state(c.small)
    before, after = dam.count(c.gated, c.fresh), dam.count(c.small, c.fresh)
    assert after["params"] < 0.7 * before["params"] and after["flops"] < 0.7 * before["flops"], (before, after)


@pytest.mark.parametrize("family", ["unet2d", "unet2d_condition"])
def test_resnet_conv1_leaves_in_whole_groups_of_its_norm_with_the_time_embedding(family):
    c = compacted(family)
    block_name = "down_blocks.0.resnets.0" if family == "unet2d" else "mid_block.resnets.0"
    gate = c.gates[f"{block_name}.conv1"]
    assert gate.host_name == f"{block_name}.norm2" and f"{block_name}.time_emb_proj" not in c.gates
    live, total = dam.widths(c.gated)[f"{block_name}.conv1"]
    per = total // 8
    kept = -(-live // per) * per  # whole groups with a live unit
    block = c.small.get_submodule(block_name)
    assert kept < total
    assert block.conv1.out_channels == block.norm2.num_channels == block.time_emb_proj.out_features == kept
    assert block.norm2.num_groups == kept // per and block.conv2.in_channels == kept


def test_scale_shift_time_embedding_keeps_the_gate_on_conv1():
    """With ``scale_shift`` the norm's output is shifted per channel: a dead unit would not
    be zero after it, so the gate stays on the conv."""
    gates = compacted("unet2d_scale_shift").gates
    assert gates["down_blocks.0.resnets.0.conv1"].host_name == "down_blocks.0.resnets.0.conv1"


@pytest.mark.parametrize("family", ["unet2d", "unet2d_condition"])
def test_attention_heads_are_the_units_and_leave(family):
    c = compacted(family)
    names = [n for n, m in c.gated.named_modules() if type(m).__name__ == "Attention"]
    assert names and all(n in c.gates for n in names)
    for name in names:
        live, total = dam.widths(c.gated)[name]
        gated, attn = c.gated.get_submodule(name), c.small.get_submodule(name)
        d = gated.inner_dim // gated.heads  # (UNet2DConditionModel's attention_head_dim is a head count)
        assert attn.heads == live < total == gated.heads
        assert attn.to_q.out_features == attn.to_k.out_features == attn.inner_dim == live * d
        assert attn.to_out[0].in_features == live * d


def test_a_gated_feed_forward_is_gated_by_its_hidden_pairs():
    """GEGLU's projection packs ``[h | g]`` for ``h * gelu(g)``: a unit is one channel of each
    half and one input of the output Linear (as Phi-3's MLP)."""
    c = compacted("unet2d_condition")
    name = "down_blocks.0.attentions.0.transformer_blocks.0.ff"
    live, total = dam.widths(c.gated)[name]
    ff = c.small.get_submodule(name)
    assert 0 < live < total == c.gated.get_submodule(name).net[2].in_features
    assert ff.net[0].proj.out_features == 2 * live and ff.net[2].in_features == live


def gated_unet(make: Callable[[], nn.Module] = unet,
               inputs: Callable[[int, torch.Generator], tuple] = unet_inputs) -> tuple[nn.Module, torch.Generator, tuple]:
    """A fresh gated UNet, a generator and example inputs (two samples)."""
    torch.manual_seed(0)
    model = make()
    dam.attach(model)
    gen = torch.Generator().manual_seed(0)
    return model, gen, inputs(2, gen)


@pytest.mark.parametrize("family", ["unet2d", "unet2d_condition"])
def test_width_model_prices_what_compact_gives(family):
    fam = FAMILIES[family]
    model, gen, example = gated_unet(fam.make, fam.inputs)
    wm = WidthModel(model, example)
    for fraction in (0.3, 0.7):
        live = [max(g.group, int(g.n * fraction)) for _, g in dam.named_gates(model)]
        with torch.no_grad():
            for (_, g), count in zip(dam.named_gates(model), live):
                g.beta.fill_(_beta_for(g, count))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            small = dam.compact(model, example)
        one = fam.inputs(1, gen)
        for metric in ("flops", "params"):
            said = float(wm.relative(torch.tensor(live, dtype=torch.float64), metric))
            real = dam.count(small, one)[metric] / dam.count(model, one)[metric]
            assert said == pytest.approx(real, rel=1e-9), (fraction, metric)


def test_budget_lands_a_unet_on_half_its_flops():
    model, gen, example = gated_unet()
    budget, steps = Budget(flops=0.5), 12
    budget.bind(model, example, total_steps=steps)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        x, t = unet_inputs(4, gen)
        noise = torch.randn(x.shape, generator=gen)
        loss = F.mse_loss(model(x + noise, t).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        budget.step()
    small = dam.compact(model, example)
    one = unet_inputs(1, gen)
    got = dam.count(small, one)["flops"] / dam.count(model, one)["flops"]
    assert abs(got / 0.5 - 1) <= TOLERANCE, got


def test_saving_a_compacted_unet_is_refused_in_one_line(tmp_path):
    """torchdam.save stores no Python objects it cannot rebuild safely; diffusers keeps its
    config in a ``FrozenDict``: refused by name, nothing half-written (README)."""
    from torchdam.errors import CheckpointError

    with pytest.raises(CheckpointError, match="_internal_dict.*FrozenDict") as err:
        dam.save(compacted("unet2d").small, tmp_path / "unet")
    assert "\n" not in str(err.value) and not (tmp_path / "unet").exists()
