"""The budget's width model on the CNN / RNN / LM / recommender zoo of ``tests/test_zoo_cnn.py``
(models written from scratch, not the project's): ``WidthModel.cost`` must equal
``torchdam.count`` of the model ``torchdam.compact`` makes, for any live counts, because a
budget promises the compacted model lands within +-3% of its target and never above it.

The zoo covers what the width model must take from compact's decisions rather than
re-derive: dead units removed through depthwise convs and BatchNorms (MobileNetV2's inverted
residuals) and through concatenations (DenseNet, U-Net skips), with bias compensation into
bias-free consumers; a layer feeding tied weights (a tied LM's output projection keeps its
width, so the layer before it is scattered back, not narrowed); residual streams (ResNet,
ConvNeXt). The models are trained a few steps first, as in ``test_zoo_cnn.py``: the width
model prices a trained model (a fresh BatchNorm maps a dead unit's zero to zero, a trained
one to a constant that some consumers cannot absorb)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_zoo_cnn import (
    FAMILIES,
    ChannelMeanNorm,
    ResNet18ish,
    TiedLM,
    assert_same_outputs,
    images,
    tokens,
    train_steps,
)
from tiny_task import one_thread  # noqa: F401  (autouse fixture)
from torch import nn

import torchdam as dam
from torchdam.attach import unit_group
from torchdam.budget import TOLERANCE, Budget, WidthModel, _beta_for, live_counts
from torchdam.calling import call
from torchdam.compact import ScatterUnits


def _first(inputs):
    """The first sample of a tensor or of a tuple of positional inputs."""
    return tuple(t[:1] for t in inputs) if isinstance(inputs, tuple) else inputs[:1]


def _set_live(model: nn.Module, live: list[int]) -> None:
    with torch.no_grad():
        for (_, gate), count in zip(dam.named_gates(model), live):
            gate.beta.fill_(_beta_for(gate, count))


def _random_live(model: nn.Module, gen: torch.Generator) -> list[int]:
    """One live count per gate, anywhere from a fifth of its units to all of them."""
    return [max(1, int(g.n * (0.2 + 0.8 * torch.rand((), generator=gen).item()))) for _, g in dam.named_gates(model)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_width_model_equals_count_of_the_compacted_family(family):
    """Exact (float64 rounding) on every family, FLOPs and parameters, at 3 random widths."""
    fam = FAMILIES[family]
    torch.manual_seed(0)
    model = fam.make()
    dam.attach(model)
    train_steps(model, fam.inputs)
    gen = torch.Generator().manual_seed(1)
    example, one = fam.inputs(4, gen), fam.inputs(1, gen)
    wm = WidthModel(model, example)
    assert wm.dense == dam.count(model, one)
    widths = torch.Generator().manual_seed(2)
    for trial in range(3):
        live = _random_live(model, widths)
        _set_live(model, live)
        assert live_counts(model).tolist() == live
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            real = dam.count(dam.compact(model, example), one)
        for metric in ("flops", "params"):
            said = float(wm.cost(torch.tensor(live, dtype=torch.float64), metric))
            assert said == pytest.approx(real[metric], rel=1e-9, abs=1e-6), (family, trial, metric, live)


def test_a_layer_feeding_tied_weights_is_priced_scattered_back():
    """The tied output projection keeps its inputs: ``fc2``'s dead units are scattered back,
    so the head's work does not shrink with them (pricing it as shrunk would under-predict,
    landing a budget above its target)."""
    torch.manual_seed(0)
    model = TiedLM()
    dam.attach(model)
    x = tokens(4, torch.Generator().manual_seed(1))
    wm = WidthModel(model, x)
    _set_live(model, [10, 4])
    small = dam.compact(model, x)
    assert isinstance(small.fc2, ScatterUnits) and small.head.in_features == 8
    assert float(wm.cost(torch.tensor([10.0, 4.0]), "flops")) == dam.count(small, x[:1])["flops"]


def test_a_constant_a_trained_norm_makes_of_dead_units_is_priced_as_compact_does():
    """A gated conv, then ReLU and a BatchNorm, then a padded 3x3 conv: a trained BatchNorm
    turns the dead units into a constant the padded conv cannot take in its bias, so compact
    scatters them back; the width model says so (a fresh BatchNorm maps them to zero and
    compact removes them: then the width model over-predicts, never under)."""
    def net() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8),
                             nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))

    x = torch.randn(2, 3, 4, 4)
    costs = {}
    for trained in (False, True):
        model = net()
        if trained:
            with torch.no_grad():
                model[2].bias.uniform_(-1.0, 1.0)
        dam.attach(model)
        wm = WidthModel(model, x)
        _set_live(model, [4, 2])
        small = dam.compact(model, x)
        assert isinstance(small[0], ScatterUnits) == trained
        costs[trained] = (float(wm.cost(torch.tensor([4.0, 2.0]))), dam.count(small, x[:1])["flops"])
    assert costs[True][0] == costs[True][1]
    assert costs[False][0] > costs[False][1]


def test_units_compact_scatters_back_after_its_output_check_are_priced_scattered_back():
    """A mean over channels after a gated layer looks per-channel to Torch-Pruning; compact
    finds the layer by comparing outputs and scatters its units back, without narrowing any
    stream. The width model compacts once at half width when built, sees it, and prices it so
    (exact when compact's check finds the layer; where the outputs happen to agree and compact
    keeps the removal, the width model over-predicts, never under)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(), ChannelMeanNorm(),
                          nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 16, 2))
    dam.attach(model)
    x = torch.randn(2, 3, 6, 6)
    wm = WidthModel(model, x)
    found = 0
    widths = torch.Generator().manual_seed(0)
    for _ in range(3):
        live = _random_live(model, widths)
        _set_live(model, live)
        small = dam.compact(model, x)
        real = dam.count(small, x[:1])
        for metric in ("flops", "params"):
            said = float(wm.cost(torch.tensor(live, dtype=torch.float64), metric))
            assert said == real[metric] if isinstance(small[2], ScatterUnits) else said >= real[metric]
        found += isinstance(small[2], ScatterUnits)
    assert found >= 2


# ------------------------------------------------------------------ a budget reached


def _wide_tied_lm() -> nn.Module:
    """The zoo's tied LM with a wider hidden layer: at its stock size the tied output
    projection, which keeps its width, is more than a third of the FLOPs."""
    return TiedLM(hidden=64)


BUDGET_FAMILIES = {
    "mobilenet_v2": (FAMILIES["mobilenet_v2"].make, images(32)),
    "densenet": (FAMILIES["densenet"].make, images(16)),
    "tied_lm_mlp": (_wide_tied_lm, tokens),
    # GroupNorm(4): units leave in whole groups of 4 and 8 channels; the snap keeps whole groups
    "resnet_groupnorm": (lambda: ResNet18ish(width=16, norm=lambda c: nn.GroupNorm(4, c)), images(32)),
}


@pytest.mark.parametrize("family", list(BUDGET_FAMILIES))
def test_budget_reaches_a_third_of_the_flops_on_the_zoo(family):
    """The user loop (no DAM term in the loss, ``budget.step()`` after ``opt.step()``) lands
    the compacted model within +-3% of the target, never above, computing what the gated
    model does; the width model's figure is the compacted model's."""
    make, inputs = BUDGET_FAMILIES[family]
    torch.manual_seed(0)
    model = make()
    dam.attach(model)
    gen = torch.Generator().manual_seed(0)
    example, one, fresh = inputs(4, gen), inputs(1, gen), inputs(3, gen)
    target, steps = 1 / 3, 30
    budget = Budget(flops=target)
    budget.bind(model, _first(example), total_steps=steps)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for _ in range(steps):
        out = call(model, inputs(8, gen))
        loss = F.mse_loss(out, torch.randn(out.shape, generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        budget.step()
    assert budget.frozen
    small = dam.compact(model, example)
    got = dam.count(small, one)["flops"] / dam.count(model, one)["flops"]
    assert 1 - TOLERANCE <= got / target <= 1 + TOLERANCE, (family, got, dam.widths(model))
    assert budget.current() == pytest.approx(got, rel=1e-9)
    assert budget.summary(got)["ok"] and budget.message(got) is None
    assert_same_outputs(model, small, fresh)
    for name, gate in dam.named_gates(model):  # whole groups live: the priced width is the kept one
        per = unit_group(model.get_submodule(gate.host_name))
        assert int(gate.active()) % per == 0 or int(gate.active()) == gate.n, (name, int(gate.active()), per)


def test_width_model_prices_a_layer_compact_keeps_whole():
    from test_zoo_cnn import SplitByWidth

    torch.manual_seed(0)
    model = SplitByWidth()
    gates = dam.attach(model)
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compact's warning that cv1.0 keeps its units
        wm = WidthModel(model, x)
        for seed in range(3):
            gen = torch.Generator().manual_seed(seed)
            for g in gates.values():
                g.beta.data.fill_(-float(torch.rand((), generator=gen)) * 4)
            real = dam.count(dam.compact(model, x), x[:1])
            for metric in ("flops", "params"):
                said = float(wm.cost(live_counts(model).clamp(min=1), metric))
                assert abs(said / real[metric] - 1) < 0.01, (seed, metric, said, real[metric])
