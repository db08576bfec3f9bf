"""Baselines: every method on a tiny synthetic task ends in a smaller, measured model."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils.data import DataLoader

from baselines import BASELINES, NotApplicableError, Setup, dense, l0
from baselines.common import compact_masks, global_masks, place, uniform_masks
from torchdam.count import count
from torchdam.errors import ConfigError
from torchdam.train import TrainConfig, Trainer

from tiny_task import one_thread, tiny_cnn, tiny_splits  # noqa: F401 (one_thread: autouse fixture)


def _setup(model=tiny_cnn, **kw) -> Setup:
    config = TrainConfig(epochs=2, batch_size=32, lr=0.05, beta_lr=0.2, progress=False)
    return Setup(model, tiny_splits(), config, **{"finetune_epochs": 1, **kw})


STRENGTHS = {"dense": 0.0, "dam": 1.0, "l0": 3.0, "slimming": 0.5, "magnitude": 0.5}
OPTIONS = {"l0": {"droprate_init": 0.7}}


@pytest.mark.filterwarnings("ignore:.*units are live")  # l0 at 3.0 closes whole layers
@pytest.mark.parametrize("method", sorted(STRENGTHS))
def test_method_ends_in_a_measured_smaller_model(method: str) -> None:
    setup = _setup()
    result = BASELINES.get(method)(setup, STRENGTHS[method], **OPTIONS.get(method, {}))
    assert result.method == method and result.strength == STRENGTHS[method]
    test = DataLoader(setup.splits.test, batch_size=1000)
    trainer = Trainer(tiny_cnn(), setup.config)
    assert result.test_acc == trainer.evaluate(test, model=result.model)["acc"]
    assert count(result.model, setup.sample()) == {"params": result.params, "flops": result.flops}
    assert count(setup.build(), setup.sample()) == {"params": result.dense_params, "flops": result.dense_flops}
    assert set(result.widths) == {"0", "3", "8"} or method == "slimming"
    two_stage = method in ("slimming", "magnitude")
    assert result.epochs_total == 2 + (1 if two_stage else 0)
    assert result.seconds_total > 0 and len(result.extra["history"]) == (2 if two_stage else 1)
    if method == "dense":
        assert result.params == result.dense_params and result.flops == result.dense_flops
        assert all(kept == total for kept, total in result.widths.values())
        return
    assert result.params < result.dense_params and result.flops < result.dense_flops
    assert any(kept < total for kept, total in result.widths.values())
    if "test_acc_gated" in result.extra:  # single-stage: compaction changes nothing
        assert result.extra["test_acc_gated"] == result.test_acc
    assert result.summary()["params_ratio"] == result.dense_params / result.params


def test_slimming_prunes_by_bn_scale_and_skips_bn_less_models() -> None:
    setup = _setup()
    result = BASELINES.get("slimming")(setup, 0.5)
    assert set(result.widths) == {"0", "3"}  # the Linear has no BatchNorm after it
    assert sum(k for k, _ in result.widths.values()) == 16
    with pytest.raises(NotApplicableError, match="BatchNorm"):
        BASELINES.get("slimming")(_setup("lenet300"), 0.5)


def test_magnitude_is_uniform_and_reuses_one_dense_run() -> None:
    setup = _setup("lenet300", finetune_epochs=0)
    pretrained = dense.train(setup)
    before = {k: v.clone() for k, v in pretrained.model.state_dict().items()}
    for ratio, widths in ((0.5, {"layers.1": (150, 300), "layers.3": (50, 100)}),
                          (0.9, {"layers.1": (30, 300), "layers.3": (10, 100)})):
        result = BASELINES.get("magnitude")(setup, ratio, pretrained=pretrained)
        assert result.widths == widths and result.epochs_total == 2
        assert result.test_acc == result.extra["test_acc_before_finetune"]
        assert result.extra["reused_pretrained"]
    assert all(torch.equal(before[k], v) for k, v in pretrained.model.state_dict().items())


def test_masks_by_hand() -> None:
    scores = {"a": torch.tensor([0.5, 0.1, 0.9, 0.3]), "b": torch.tensor([0.2, 0.05])}
    glob = global_masks(scores, 0.5)  # 3 of 6 lowest: 0.05, 0.1, 0.2 -> b would be empty
    assert glob["a"].tolist() == [True, False, True, True] and glob["b"].tolist() == [True, False]
    uni = uniform_masks(scores, 0.5)
    assert uni["a"].tolist() == [True, False, True, False] and uni["b"].tolist() == [True, False]
    assert global_masks(scores, 0.0)["a"].all()
    with pytest.raises(ConfigError, match="ratio"):
        uniform_masks(scores, 1.0)


def test_compact_masks_folds_values_and_removes_zeros() -> None:
    setup = _setup()
    torch.manual_seed(0)
    model = tiny_cnn().eval()
    masks = {"0": torch.tensor([0.0, 0.5] * 8), "8": torch.cat([torch.zeros(30), torch.ones(2)])}
    small = compact_masks(model, masks, setup)
    assert small[0].out_channels == 8 and small[8].out_features == 2 and small[3].out_channels == 16
    x = setup.examples()
    with torch.no_grad():
        h = model[2](model[1](model[0](x)) * masks["0"].view(1, -1, 1, 1))
        h = model[7](model[6](model[5](model[4](model[3](h)))))
        expected = model[10](model[9](model[8](h) * masks["8"]))
        torch.testing.assert_close(small(x), expected, rtol=1e-5, atol=1e-5)


def test_hard_concrete_gate_math_by_hand() -> None:
    gate = l0.HardConcreteGate(3)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-3.0, 0.0, 3.0]))
    beta, gamma, zeta = 2 / 3, -0.1, 1.1
    sig = lambda v: 1 / (1 + math.exp(-v))
    expected_p = [sig(a - beta * math.log(-gamma / zeta)) for a in (-3.0, 0.0, 3.0)]
    assert gate.prob_nonzero().tolist() == pytest.approx(expected_p, rel=1e-6)
    assert expected_p[1] == pytest.approx(0.831822, rel=1e-5)  # sigmoid(2/3 * log 11)
    assert gate.expected_l0().item() == pytest.approx(sum(expected_p), rel=1e-6)
    # deterministic: clamp(sigmoid(a) * 1.2 - 0.1, 0, 1) -> 0 (removed), 0.5, 1
    assert gate.eval().mask().tolist() == pytest.approx([0.0, 0.5, 1.0], abs=1e-6)
    torch.manual_seed(3)
    u = torch.rand(3).clamp(l0.EPS, 1 - l0.EPS)
    torch.manual_seed(3)
    z = gate.train().mask()
    by_hand = [min(1.0, max(0.0, sig((math.log(ui) - math.log(1 - ui) + a) / beta) * (zeta - gamma) + gamma))
               for ui, a in zip(u.tolist(), (-3.0, 0.0, 3.0))]
    assert z.tolist() == pytest.approx(by_hand, abs=1e-6)
    z.sum().backward()  # reparametrised: gradients reach log_alpha
    assert gate.log_alpha.grad is not None
    x = torch.ones(2, 3, 4, 4)
    assert torch.equal(gate.eval()(x)[:, 0], torch.zeros(2, 4, 4))


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown method"):
        BASELINES.get("nosuch")
    with pytest.raises(ConfigError, match="finetune_epochs"):
        _setup(finetune_epochs=-1)
    with pytest.raises(ConfigError, match="droprate_init"):
        l0.HardConcreteGate(4, droprate_init=1.0)


def test_l0_log_alpha_has_its_own_faster_lr() -> None:
    """At the weights' lr the penalty barely moves log_alpha in a short run; at the default
    (20x the weights' lr, in its own group) it moves it several times as far."""
    config = TrainConfig(epochs=2, batch_size=32, lr=0.05, weight_decay=0.01, progress=False)
    setup = Setup("lenet300", tiny_splits(), config)
    slow = l0.run(setup, 0.2, gate_lr=0.05)
    default = l0.run(setup, 0.2)
    assert slow.extra["gate_lr"] == 0.05 and default.extra["gate_lr"] == pytest.approx(20 * 0.05)
    start = 400 * torch.sigmoid(torch.tensor(math.log(0.7 / 0.3) - 2 / 3 * math.log(0.1 / 1.1))).item()
    assert start - default.extra["expected_l0"] > 4 * (start - slow.extra["expected_l0"]) > 0
    with pytest.raises(ConfigError, match="gate_lr"):
        l0.run(setup, 0.05, gate_lr=0.0)


def test_l0_draws_one_gate_per_sample_and_unit_through_the_hook() -> None:
    gate = l0.HardConcreteGate(16).train()
    out = gate(torch.ones(64, 16, 2, 2))
    assert torch.equal(out[:, :, 0, 0], out[:, :, 1, 1])  # one value per (sample, unit)
    assert not torch.equal(out[0], out[1])  # samples draw independently
    evaluated = gate.eval()(torch.ones(2, 16, 3))
    assert torch.equal(evaluated[0], evaluated[1]) and torch.equal(evaluated[0, :, 0], gate.deterministic())
    model = tiny_cnn()
    gates = place(model, _setup(), lambda site: l0.HardConcreteGate(site.units, site.axis), fused=False)
    seen = []
    gates["0"].register_forward_hook(lambda m, i, o: seen.append(o))
    model.train()(torch.randn(4, 3, 8, 8))
    assert len(seen) == 1 and seen[0].shape == (4, 16, 8, 8)  # the gate ran on the BatchNorm's output



def test_ordered_budget_dam_starts_from_the_dense_model_with_its_weakest_units_first() -> None:
    from baselines.dam_budget import order_units

    setup = _setup("lenet300", finetune_epochs=0)
    pretrained = dense.train(setup)
    model = pretrained.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = setup.sample()
    moved = copy.deepcopy(model).eval()
    order_units(moved, setup)
    assert torch.allclose(moved(x), model.eval()(x), atol=1e-5)  # the same function
    norms = moved.layers[1].weight.abs().sum(1)
    assert torch.all(norms[1:] >= norms[:-1])  # least important first: DAM removes index 0 first
    result = BASELINES.get("dam-budget-ordered")(setup, 0.5, pretrained=pretrained)
    assert result.method == "dam-budget-ordered" and result.epochs_total == 4  # dense 2 + budget 2
    assert result.extra["reached_flops"] == pytest.approx(0.5, rel=0.03)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the dense model untouched
    with pytest.raises(NotApplicableError, match="MLPs"):
        order_units(tiny_cnn(), _setup())
