"""ChipNet baseline: its mask maths by hand, its losses, its threshold, and a run end to end."""
from __future__ import annotations

import math

import pytest
import torch

from baselines import BASELINES, Setup, chipnet, dense
from baselines.common import place
from torchdam.count import count
from torchdam.errors import ConfigError, ShapeError
from torchdam.train import TrainConfig

from tiny_task import one_thread, tiny_cnn, tiny_splits  # noqa: F401 (one_thread: autouse fixture)


def _setup(**kw) -> Setup:
    # batch 8: 32 steps an epoch, so a 4-epoch ChipNet stage has 128 steps to learn its masks
    config = TrainConfig(epochs=2, batch_size=8, lr=0.05, progress=False)
    return Setup(tiny_cnn, tiny_splits(), config, **{"finetune_epochs": 1, **kw})


def test_logistic_and_heaviside_by_hand() -> None:
    mask = chipnet.ChipNetMask(3, beta=1.5, gamma=4.0)
    with torch.no_grad():
        mask.psi.copy_(torch.tensor([-2.0, 0.0, 3.0]))
    soft = [1 / (1 + math.exp(-1.5 * p)) for p in (-2.0, 0.0, 3.0)]
    assert mask.soft().tolist() == pytest.approx(soft, rel=1e-6)
    z = [1 - math.exp(-4.0 * s) + s * math.exp(-4.0) for s in soft]
    assert mask.mask().tolist() == pytest.approx(z, rel=1e-6)
    # the official start: psi ~ 0, beta = 1, gamma = 2 -> z~ = 0.5, z = 1 - e^-1 + e^-2 / 2
    assert chipnet.continuous_heaviside(torch.tensor([0.5]), 2.0).item() == pytest.approx(0.6997882, abs=1e-6)
    ends = chipnet.continuous_heaviside(torch.tensor([0.0, 1.0]), 256.0)
    assert ends.tolist() == pytest.approx([0.0, 1.0], abs=1e-6)
    x = torch.ones(2, 3, 4, 4)
    torch.testing.assert_close(mask(x), x * torch.tensor(z).view(1, 3, 1, 1))
    start = chipnet.ChipNetMask(1000)
    assert 0 <= start.psi.min() and start.psi.max() <= chipnet.PSI_INIT


def test_crispness_is_zero_only_for_binary_masks() -> None:
    binary = torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert chipnet.crispness(binary, chipnet.continuous_heaviside(binary, 2.0)).item() == pytest.approx(0, abs=1e-12)
    half = torch.tensor([0.5])
    assert chipnet.crispness(half, chipnet.continuous_heaviside(half, 2.0)).item() == pytest.approx(0.1997882 ** 2)
    mask = chipnet.ChipNetMask(4)
    with torch.no_grad():
        mask.psi.copy_(torch.tensor([60.0, -60.0, 60.0, -60.0]))  # z~ saturates at 1 and 0
    _, crisp = chipnet.Objective([mask], 0.5, 10).terms()
    assert crisp.item() == pytest.approx(0, abs=1e-12)


def test_schedule_is_the_official_one_compressed() -> None:
    full = chipnet.OFFICIAL_STEPS  # a stage as long as the official run: its schedule exactly
    per_epoch = full // chipnet.OFFICIAL_EPOCHS
    assert chipnet.schedule(0, full) == (1.0, 2.0, 10.0)
    beta, gamma, steepness = chipnet.schedule(per_epoch, full)  # after one official epoch
    assert (beta, gamma, steepness) == pytest.approx((1.02, 2 * math.sqrt(2), 15.0))
    assert chipnet.schedule(per_epoch - 1, full)[:2] == (1.0, 2.0)
    assert chipnet.schedule(10 * per_epoch, full) == pytest.approx((1.2, 64.0, 60.0))
    assert chipnet.schedule(full, full) == pytest.approx((1.4, 256.0, 60.0))  # gamma capped
    assert chipnet.schedule(5, 100) == pytest.approx((1.02, 2 * math.sqrt(2), 15.0))  # 100 steps = 20 epochs
    assert chipnet.psi_lr_scale(full) == 1.0 and chipnet.psi_lr_scale(full // 4) == pytest.approx(4.0)


def test_budget_term_drives_the_kept_fraction_to_the_target() -> None:
    # A toy "task" rewards every unit, high-index ones most; only the budget term can close units.
    w = torch.linspace(0, 1, 20)

    def train(budget_weight: float) -> torch.Tensor:
        torch.manual_seed(0)
        mask = chipnet.ChipNetMask(20)
        objective = chipnet.Objective([mask], 0.3, 400, budget_weight=budget_weight)
        opt = torch.optim.AdamW([mask.psi], lr=0.05, weight_decay=0.0)
        for _ in range(400):
            loss = -(w * mask.mask()).mean() + objective()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert objective.gamma == 256.0  # the schedule ran to its end
        return mask.mask().detach()

    assert (train(0.0) > 0.5).all()  # without the budget term every unit stays
    z = train(chipnet.BUDGET_WEIGHT)
    assert (z > 0.5).float().mean().item() == pytest.approx(0.3, abs=0.051)
    assert (z[14:] > 0.5).all() and (z[:10] < 0.5).all()  # the task decided which units stay


def test_keep_decision_is_the_official_threshold() -> None:
    z = torch.tensor([0.1, 0.95, 0.3, 0.92, 0.6])
    keep, t = chipnet.keep_decision(z, 0.4)  # 3rd-smallest of 5 is 0.92, capped at 0.9
    assert keep.tolist() == [False, True, False, True, False] and t == 0.9
    keep, t = chipnet.keep_decision(z, 0.6)  # 0.6 keeps 2 of 5; lowered by 1e-4 once, 3
    assert keep.tolist() == [False, True, False, True, True] and t == pytest.approx(0.6 - 1e-4)
    keep, t = chipnet.keep_decision(torch.tensor([0.95, 0.97, 0.99, 0.1]), 0.25)
    assert keep.float().mean().item() == 0.75 and t == 0.9  # the cap keeps more than the budget
    assert chipnet.keep_decision(z, 1.0)[0].all()


def test_prune_stage_trains_psi_undecayed_and_steps_the_schedule() -> None:
    setup = _setup()
    model = tiny_cnn()
    masks = list(place(model, setup, lambda site: chipnet.ChipNetMask(site.units, site.axis)).values())
    before = [m.psi.detach().clone() for m in masks]
    stage, objective = chipnet.prune_stage(model, masks, setup, 0.5, epochs=1)
    weights, psi = stage.trainer.optimizer.param_groups
    assert psi["weight_decay"] == 0.0 and weights["weight_decay"] == chipnet.WEIGHT_DECAY
    assert psi["lr"] == pytest.approx(chipnet.LR * chipnet.OFFICIAL_STEPS / 32) and weights["lr"] == chipnet.LR
    assert {id(p) for p in psi["params"]} == {id(m.psi) for m in masks}
    assert all(not torch.equal(m.psi, b) for m, b in zip(masks, before))
    assert objective.step == 32 and (masks[0].beta, masks[0].gamma) == pytest.approx((1.4, 256.0))
    assert stage.epochs == 1 and len(stage.records) == 1


def test_run_ends_in_a_smaller_model_at_the_budget() -> None:
    setup = _setup()
    pretrained = dense.train(setup)
    before = {k: v.clone() for k, v in pretrained.model.state_dict().items()}
    result = BASELINES.get("chipnet")(setup, 0.5, pretrained=pretrained, prune_epochs=4)
    assert result.method == "chipnet" and result.strength == 0.5
    small = result.model
    widths = result.widths
    assert set(widths) == {"0", "3", "8"}
    assert (small[0].out_channels, small[3].out_channels, small[8].out_features) == (
        widths["0"][0], widths["3"][0], widths["8"][0])
    kept = sum(k for k, _ in widths.values()) / sum(t for _, t in widths.values())
    assert result.extra["kept_fraction"] == kept and result.extra["target_kept_fraction"] == 0.5
    assert 0.5 <= kept <= 0.55  # the official threshold meets the budget here
    assert result.params < result.dense_params and result.flops < result.dense_flops
    assert count(small, setup.sample()) == {"params": result.params, "flops": result.flops}
    assert result.epochs_total == 2 + 4 + 1 and len(result.extra["history"]) == 3
    assert result.seconds_total > pretrained.seconds and result.extra["reused_pretrained"]
    assert all(torch.equal(before[k], v) for k, v in pretrained.model.state_dict().items())


def test_bad_options_are_config_errors() -> None:
    setup = _setup()
    for strength in (1.0, -0.1):
        with pytest.raises(ConfigError, match="strength"):
            chipnet.run(setup, strength)
    with pytest.raises(ConfigError, match="prune_epochs"):
        chipnet.run(setup, 0.5, prune_epochs=0)
    with pytest.raises(ConfigError, match="positive number of units"):
        chipnet.ChipNetMask(0)
    with pytest.raises(ConfigError, match="gamma > 0"):
        chipnet.ChipNetMask(4, gamma=0.0)
    with pytest.raises(ShapeError, match="4 units"):
        chipnet.ChipNetMask(4)(torch.ones(2, 3))
