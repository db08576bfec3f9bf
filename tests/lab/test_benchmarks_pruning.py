"""The pruning benchmark's quick mode, end to end on real MNIST (benchmarks/pruning.py)."""
from __future__ import annotations

import dataclasses
import json

import pytest

@pytest.fixture(scope="module")
def pruning():
    from benchmarks import pruning as module

    return module


@pytest.mark.slow
def test_quick_lenet300_writes_every_output(pruning, tmp_path):
    assert pruning.main(["lenet300-mnist", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["quick"] and data["meta"]["config"]["epochs"] == 1
    runs = {r["method"]: r for r in data["runs"]}
    assert set(runs) == {"dense", "dam", "l0", "magnitude", "slimming", "chipnet"}
    assert "BatchNorm" in runs["slimming"]["not_applicable"]  # LeNet-300-100 has none
    dense = runs["dense"]
    for method in ("dense", "dam", "l0", "magnitude"):
        r = runs[method]
        assert 0 <= r["test_acc"] <= 1
        assert r["params"] <= dense["params"] and r["flops"] <= dense["flops"]
        assert r["speedup_b1"] > 0 and r["speedup_b64"] > 0
        assert r["speedup_over_flops_b64"] == pytest.approx(r["speedup_b64"] / r["flops_ratio"])
        assert r["seconds_total"] > 0
    # magnitude prunes half of each layer and fine-tunes: two stages of one epoch
    assert runs["magnitude"]["units_kept"] == 200 and runs["magnitude"]["epochs_total"] == 2
    table = (tmp_path / "results.md").read_text()
    assert "| magnitude | 0.5 |" in table and "| slimming | 0.5 | n/a |" in table
    assert (tmp_path / "pareto.png").stat().st_size > 1000


def test_paper_study_is_the_published_recipe(pruning):
    study = pruning.STUDIES["preresnet164-cifar10-paper"]
    c = study.config
    assert (study.model, study.data, study.augment, study.val_size) == ("preresnet164", "cifar10", True, 5000)
    assert (c.epochs, c.lr, c.momentum, c.batch_size, c.weight_decay, c.beta_weight_decay) == (200, 0.05, 0.9, 128, 1e-3, 0.0)
    assert (c.schedule, c.milestones, c.gamma, c.cold_start) == ("step", (100, 150), 0.1, 20)
    assert study.strengths == {"dam": (0.2,)}


def test_markdown_reports_mean_and_std_over_seeds(pruning):
    rows = [{"method": "dam", "strength": 0.15, "test_acc": a, "seed": s} for s, a in enumerate((0.9, 0.8))]
    table = pruning.markdown({"study": "s", "model": "m", "data": "d", "config": {
        "epochs": 1, "optimizer": "sgd", "lr": 0.1, "schedule": "none", "batch_size": 1, "weight_decay": 0,
        "beta_lr": None}, "finetune_epochs": 0, "train_images": 1, "seeds": 2, "quick": False}, rows)
    assert "85.00 +- 7.07" in table


def _results(folder, rows, epochs=1, command="run"):
    folder.mkdir()
    meta = {"study": "s", "model": "m", "data": "d", "config": {
        "epochs": epochs, "optimizer": "sgd", "lr": 0.1, "schedule": "none", "batch_size": 1, "weight_decay": 0,
        "beta_lr": None}, "finetune_epochs": 0, "train_images": 1, "seeds": 1, "quick": False, "command": command}
    (folder / "results.json").write_text(json.dumps({"meta": meta, "runs": rows}))
    return folder


def test_merge_adds_a_later_method_and_refuses_other_recipes(pruning, tmp_path):
    row = lambda method, strength, acc: {"method": method, "strength": strength, "seed": 0, "test_acc": acc,
                                          "flops": 10, "params": 10}
    a = _results(tmp_path / "a", [row("dense", 0, 0.9), row("dam", 0.15, 0.8)], command="first")
    b = _results(tmp_path / "b", [row("dense", 0, 0.9), row("chipnet", 0.5, 0.7)], command="second")
    assert pruning.main(["lenet300-mnist", "--merge", str(a), str(b), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert [r["method"] for r in merged["runs"]] == ["dense", "dam", "chipnet"]  # one dense row, METHODS order
    assert merged["meta"]["command"] == "first ; second"
    assert "| chipnet | 0.5 |" in (tmp_path / "m" / "results.md").read_text()
    newer = _results(tmp_path / "newer", [row("dam", 0.5, 0.6)], command="newer")
    assert pruning.main(["lenet300-mnist", "--merge", str(newer), f"{a}:dense", str(b), "--out",
                         str(tmp_path / "m2")]) == 0
    merged = json.loads((tmp_path / "m2" / "results.json").read_text())
    assert [(r["method"], r["strength"]) for r in merged["runs"]] == [("dense", 0), ("dam", 0.5), ("chipnet", 0.5)]
    c = _results(tmp_path / "c", [row("l0", 0.01, 0.5)], epochs=2)
    with pytest.raises(SystemExit, match="config differs"):
        pruning.main(["lenet300-mnist", "--merge", str(a), str(c), "--out", str(tmp_path / "n")])


def test_slimming_trains_its_sparsity_stage_once_per_seed(pruning, monkeypatch):
    """The sparsity stage does not depend on the ratio: every ratio of one seed prunes it."""
    calls, pruned = [], []
    monkeypatch.setattr(pruning.slimming, "train", lambda setup: calls.append(setup.config.seed) or f"stage{len(calls)}")
    monkeypatch.setattr(pruning.BASELINES, "get", lambda name: lambda setup, s, pretrained=None: pruned.append(
        (s, pretrained)))
    plan = pruning.method_jobs(pruning.STUDIES["resnet20-cifar10"], ("slimming",), quick=False)
    setup = lambda seed: type("S", (), {"config": type("C", (), {"seed": seed})()})()
    for seed in (0, 1):
        for _, strength, runner in plan.jobs:
            runner(setup(seed), strength, None)
    assert calls == [0, 1]
    assert [p for _, p in pruned] == ["stage1"] * 3 + ["stage2"] * 3


def test_l0_gate_lr_of_the_study_reaches_every_l0_run(pruning, monkeypatch):
    seen = []
    monkeypatch.setattr(pruning.BASELINES, "get", lambda name: lambda setup, s, **kw: seen.append((s, kw)))
    study = dataclasses.replace(pruning.STUDIES["lenet300-mnist"], l0_gate_lr=0.7)
    for _, strength, runner in pruning.method_jobs(study, ("l0",), quick=False).jobs:
        runner(None, strength, None)
    assert seen == [(s, {"gate_lr": 0.7}) for s in study.strengths["l0"]]


@pytest.mark.slow
def test_a_later_seed_runs_alone_and_merges_into_mean_and_std(pruning, tmp_path):
    out = tmp_path / "seed1"
    assert pruning.main(["lenet300-mnist", "--quick", "--no-progress", "--first-seed", "1", "--methods", "dam",
                         "--out", str(out)]) == 0
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert run["seed"] == 1 and run["method"] == "dam"
    row = lambda seed, acc: {"method": "dam", "strength": run["strength"], "seed": seed, "test_acc": acc,
                             "flops": 10, "params": 10}
    seed0 = _results(tmp_path / "seed0", [row(0, 0.9)])
    seed1 = _results(tmp_path / "s1", [row(1, 0.8)])
    assert pruning.main(["lenet300-mnist", "--merge", str(seed0), str(seed1), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert merged["meta"]["seeds"] == 2 and len(merged["runs"]) == 2
    assert "85.00 +- 7.07" in (tmp_path / "m" / "results.md").read_text()


def test_vit_study_runs_dam_against_torch_pruning_on_a_cifar_subset(pruning, monkeypatch):
    study = pruning.STUDIES["vit-tiny-cifar10"]
    c = study.config
    assert (study.model, study.data, study.train_limit, study.augment) == ("vit-tiny", "cifar10", 10000, True)
    assert (c.optimizer, c.lr, c.weight_decay, c.schedule) == ("adam", 1e-3, 0.0, "cosine")
    assert set(study.strengths) == {"dam", "tp_vit"}
    seen = []  # tp_vit prunes the dense run of the same seed, like magnitude
    monkeypatch.setattr(pruning.BASELINES, "get", lambda name: lambda setup, s, **kw: seen.append((name, s, kw)))
    for _, strength, runner in pruning.method_jobs(study, ("tp_vit",), quick=False).jobs:
        runner(None, strength, "dense run")
    assert seen == [("tp_vit", s, {"pretrained": "dense run"}) for s in study.strengths["tp_vit"]]


# --------------------------------------------------------------------------- matched FLOPs budgets

@pytest.mark.slow
def test_quick_targets_match_every_method_to_the_flops_target(pruning, tmp_path):
    """--targets: the budget DAMs train to the target, magnitude and chipnet bisect their
    ratio; every compacted model lands within -3%..+3% of it (never above), measured."""
    assert pruning.main(["lenet300-mnist", "--quick", "--no-progress", "--targets", "0.5,0.33,0.2", "--methods",
                         "dense", "dam", "l0", "dam-budget", "dam-budget-uniform", "dam-budget-ft", "magnitude",
                         "chipnet", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    runs = {r["method"]: r for r in data["runs"]}
    # quick: the middle target only; dam and l0 (lambda-driven) have no target mode
    assert set(runs) == {"dense", "dam-budget", "dam-budget-uniform", "dam-budget-ft", "magnitude", "chipnet"}
    for method in ("dam-budget", "dam-budget-uniform", "dam-budget-ft", "magnitude", "chipnet"):
        r = runs[method]
        assert r["strength"] == r["target_flops"] == 0.33
        reached = 1 / r["flops_ratio"]
        assert r["reached_flops"] == pytest.approx(reached)
        assert 0.33 * 0.97 <= reached <= 0.33 * 1.03, (method, reached)
    assert runs["dam-budget"]["penalty"] == "cost" and runs["dam-budget-uniform"]["penalty"] == "uniform"
    assert runs["dam-budget"]["epochs_total"] == 1  # single stage, the study's epochs
    assert runs["dam-budget-ft"]["epochs_total"] == 2  # + the baselines' fine-tune of the compacted model
    assert runs["dam-budget-ft"]["test_acc_gated"] == pytest.approx(runs["dam-budget"]["test_acc_gated"])
    assert runs["magnitude"]["epochs_total"] == 2 and 0 < runs["magnitude"]["ratio"] < 1
    table = (tmp_path / "results.md").read_text()
    assert "### FLOPs target 33% of dense" in table
    assert "| dam-budget | 33.0 |" in table and "| magnitude (to FLOPs) |" in table


def test_target_mode_gives_each_method_the_targets(pruning, monkeypatch):
    seen = []
    monkeypatch.setattr(pruning.BASELINES, "get", lambda name: lambda setup, s, **kw: seen.append((name, s, kw)))
    study = dataclasses.replace(pruning.STUDIES["lenet300-mnist"], targets=(0.5, 0.33, 0.2))
    plan = pruning.method_jobs(study, ("dam", "l0", "dam-budget", "magnitude", "chipnet"), quick=False)
    assert [(m, s) for m, s, _ in plan.jobs] == [(m, t) for m in ("dam-budget", "magnitude", "chipnet")
                                                 for t in (0.5, 0.33, 0.2)]
    for method, strength, runner in plan.jobs:
        runner("setup", strength, "pre")
    assert seen[0] == ("dam-budget", 0.5, {})
    assert seen[3] == ("magnitude", 0.0, {"pretrained": "pre", "target_flops": 0.5})
    assert seen[8] == ("chipnet", 0.0, {"pretrained": "pre", "target_flops": 0.2})


def test_budget_variant_flags_reach_the_budget_and_label_the_rows(pruning, tmp_path):
    """--reach-at, --budget-schedule and --budget-cold-start are the budget's own options:
    the trained budget used them, and each row says which it ran with."""
    assert pruning.main(["lenet300-mnist", "--quick", "--no-progress", "--epochs", "2", "--targets", "0.5",
                         "--methods", "dam-budget", "--reach-at", "0.5", "--budget-schedule", "linear",
                         "--budget-cold-start", "1", "--out", str(tmp_path)]) == 0
    (run,) = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert run["method"] == "dam-budget reach_at=0.5 schedule=linear cold_start=1"
    assert (run["schedule"], run["cold_start"], run["reach_at"]) == ("linear", 1, 0.5)
    assert 0.5 * 0.97 <= 1 / run["flops_ratio"] <= 0.5 * 1.03
    with pytest.raises(SystemExit):
        pruning.main(["lenet300-mnist", "--budget-schedule", "exponential", "--out", str(tmp_path)])


def test_bad_targets_are_a_usage_error(pruning):
    with pytest.raises(SystemExit):
        pruning.main(["lenet300-mnist", "--targets", "0.5,2", "--out", "/nonexistent"])


def test_ratio_for_flops_lands_at_the_target_from_below():
    """The bisection on a tiny MLP: the smallest ratio whose compacted FLOPs are at most
    target * 1.03, counted on the compacted model."""
    import torch
    from torch import nn

    from baselines.common import Setup, flops_fraction, ratio_for_flops, uniform_masks
    from torchdam.data import Splits
    from torchdam.train import TrainConfig

    x = torch.randn(16, 20)
    data = torch.utils.data.TensorDataset(x, torch.zeros(16, dtype=torch.long))
    splits = Splits(train=data, val=data, test=data, num_classes=2, input_shape=(20,), name="toy")
    make = lambda: nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    setup = Setup(make, splits, TrainConfig(progress=False))
    model = setup.build()
    scores = {"0": torch.rand(64), "2": torch.rand(64)}
    for target in (0.5, 0.33, 0.2):
        ratio, masks, reached = ratio_for_flops(lambda r: uniform_masks(scores, r), model, setup, target)
        assert 0.97 * target <= reached <= 1.03 * target
        assert reached == pytest.approx(flops_fraction(model, masks, setup))
        assert flops_fraction(model, uniform_masks(scores, max(0.0, ratio - 0.02)), setup) > 1.03 * target


def test_chipnet_flops_budget_is_the_width_models_flops_fraction():
    """chipnet-flops: the budget term is (FLOPs(z) / dense - target)^2 at the smooth live
    counts, and its gradient reaches every mask's psi."""
    import torch
    from torch import nn

    from baselines import chipnet
    from baselines.common import Setup
    from torchdam.data import Splits
    from torchdam.train import TrainConfig

    x = torch.randn(8, 20)
    data = torch.utils.data.TensorDataset(x, torch.zeros(8, dtype=torch.long))
    splits = Splits(train=data, val=data, test=data, num_classes=2, input_shape=(20,), name="toy")
    setup = Setup(lambda: nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 2)),
                  splits, TrainConfig(progress=False))
    wm = chipnet.flops_width_model(setup.build(), setup)
    masks = {name: chipnet.ChipNetMask(n) for name, n in (("0", 32), ("2", 16))}
    objective = chipnet.FlopsObjective(masks, wm, 0.4, total_steps=100)
    objective._advance(100)  # the end of the schedule: masks crisp, budget sigmoid steep
    with torch.no_grad():
        masks["0"].psi.fill_(20.0)
        masks["2"].psi.fill_(20.0)
    budget, _ = objective.terms()
    assert budget.item() == pytest.approx((1 - 0.4) ** 2, rel=1e-3)  # every unit live: all the FLOPs
    with torch.no_grad():
        masks["0"].psi[:16] = -20.0  # half of the first layer closed
    budget, _ = objective.terms()
    half = wm.relative(torch.tensor([16.0, 16.0], dtype=torch.float64)).item()
    assert budget.item() == pytest.approx((half - 0.4) ** 2, rel=1e-2)
    budget.backward()
    assert all(m.psi.grad is not None for m in masks.values())
