"""Budget-driven, cost-aware DAM (torchdam.budget): the width model against the compacted
model, targets reached within +-3% (never above), the controller following its schedule,
uniform vs cost-aware pull, round_to, the user-loop API, resume, and the one-line messages."""
import json
import os
import signal
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchdam as dam
from torchdam.budget import TOLERANCE, Budget, WidthModel, live_counts, nothing_removed_message
from torchdam.errors import ConfigError
from torchdam.models import build_model
from torchdam.train import TrainConfig, Trainer
from tiny_task import one_thread, tiny_cnn, tiny_splits  # noqa: F401  (one_thread: autouse fixture)

TARGETS = [1 / 2, 1 / 3, 1 / 5]


def mlp(hidden=(64, 64), inputs=20, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    layers, width = [], inputs
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    net = nn.Sequential(*layers, nn.Linear(width, 2))
    dam.attach(net)
    return net


def separable(n=512, inputs=20, seed=0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inputs, generator=g)
    w = torch.randn(inputs, generator=g)
    return TensorDataset(x, (x @ w > 0).long())


def cnn(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    net = tiny_cnn()  # conv+BN, conv+BN, pool, linear, head
    dam.attach(net)
    return net


def task(kind: str):
    if kind == "mlp":
        return mlp(), separable()
    return cnn(), tiny_splits().train


def reached(model: nn.Module, x: torch.Tensor, metric: str = "flops") -> float:
    small = dam.compact(model, x[:4])
    return dam.count(small, x[:1])[metric] / dam.count(model, x[:1])[metric]


def train_user_loop(model, data, budget, epochs=3, batch_size=32, optimizer=None):
    """The documented loop without Trainer: the loss has no DAM term; budget.step() after step()."""
    loader = DataLoader(data, batch_size=batch_size, shuffle=True)
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    budget.bind(model, data.tensors[0][:1], total_steps=epochs * len(loader))
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            budget.step()
    return budget


def set_random_betas(model, seed):
    g = torch.Generator().manual_seed(seed)
    for _, gate in dam.named_gates(model):
        gate.beta.data.fill_(float(torch.empty(()).uniform_(-0.95 * gate.k, 0.3, generator=g)))


# ------------------------------------------------------------------ the width model


@pytest.mark.parametrize("name,shape", [("lenet300", (1, 1, 28, 28)), ("lenet5", (1, 1, 28, 28)),
                                        ("resnet20", (1, 3, 32, 32)), ("tiny_cnn", (1, 3, 8, 8))])
def test_width_model_equals_count_of_the_compacted_model(name, shape):
    model = cnn() if name == "tiny_cnn" else build_model(name, in_channels=shape[1], image_size=shape[-1])
    if name != "tiny_cnn":
        dam.attach(model)
    x = torch.randn(2, *shape[1:])
    wm = WidthModel(model, x)
    assert wm.dense == dam.count(model, x[:1])
    for seed in range(2 if name == "resnet20" else 3):
        set_random_betas(model, seed)
        live = live_counts(model).clamp(min=1)  # compact keeps min_width=1 of a dead layer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            real = dam.count(dam.compact(model, x), x[:1])
        for metric in ("flops", "params"):
            model_says = float(wm.cost(live, metric))
            assert abs(model_says / real[metric] - 1) < 0.01, (name, seed, metric, model_says, real[metric])


def test_marginal_cost_is_what_one_unit_costs():
    net = mlp(hidden=(30, 20), inputs=10)
    wm = WidthModel(net, torch.randn(1, 10))
    live = torch.tensor([12.0, 7.0], dtype=torch.float64)
    grad = wm.marginal(live)
    for i in range(2):
        up = live.clone()
        up[i] += 1
        assert float(grad[i]) == pytest.approx(float(wm.cost(up) - wm.cost(live)))
    # layer 0's unit: 10 inputs + 7 consumers; layer 1's unit: 12 inputs + 2 outputs (2 FLOPs per MAC)
    assert grad.tolist() == [2 * (10 + 7), 2 * (12 + 2)]


# ------------------------------------------------------------------ targets reached


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("target", TARGETS, ids=["1/2", "1/3", "1/5"])
def test_trainer_reaches_the_flops_target_within_3_percent_never_above(kind, target):
    model, data = task(kind)
    trainer = Trainer(model, TrainConfig(epochs=3, batch_size=32, progress=False, target_flops=target))
    trainer.fit(DataLoader(data, batch_size=32, shuffle=True))
    got = reached(model, data.tensors[0])
    assert 1 - TOLERANCE <= got / target <= 1 + TOLERANCE, (kind, target, got, dam.widths(model))
    summary = trainer.budget.summary(got)
    assert summary["ok"] and summary["target"] == target and summary["reached"] == got
    assert trainer.budget.message(got) is None
    assert trainer.records[-1]["flops_rel"] == pytest.approx(got)  # the log's figure is the compacted one


def test_params_target():
    model, data = task("cnn")
    train_user_loop(model, data, Budget(params=1 / 3))
    got = reached(model, data.tensors[0], "params")
    assert 1 - TOLERANCE <= got * 3 <= 1 + TOLERANCE


def test_controller_follows_the_schedule_then_holds_the_width():
    model, data = mlp(), separable()
    budget = Budget(flops=0.25, reach_at=0.5)
    loader = DataLoader(data, batch_size=32, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    budget.bind(model, data.tensors[0][:1], total_steps=4 * len(loader))
    seen, held = [], []
    for _ in range(4):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            budget.step()
            seen.append((budget.t, budget.current(smooth=True), budget.schedule_at(budget.t)))
            if budget.frozen:
                held.append(([g.beta.item() for _, g in dam.named_gates(model)], dict(dam.widths(model))))
    before = [(t, f, s) for t, f, s in seen if t < budget.reach]
    assert before[0][1] > 0.9 and before[-1][2] < 0.3  # it starts wide and the schedule falls to 0.25
    assert max(abs(f - s) for _, f, s in before) < 0.03  # the cost follows the schedule all along
    schedule = [s for _, _, s in before]
    assert all(a >= b for a, b in zip(schedule, schedule[1:]))
    assert len(held) == 4 * len(loader) - budget.reach + 1
    assert all(h == held[0] for h in held)  # betas and widths frozen from reach_at on
    assert budget.pull == 0.0 and budget.frozen


def test_controller_raises_the_pull_above_schedule_and_relaxes_it_below():
    model, data = mlp(), separable()
    budget = Budget(flops=0.5).bind(model, data.tensors[0][:1], total_steps=100)
    for _ in range(5):
        budget.step()
    base = budget.pull
    budget._shadow = budget._shadow + 0.5  # wider than the schedule: pull harder
    budget.step()
    assert budget.pull > base
    budget._shadow = budget._shadow - 2.0  # narrower than the schedule: no pull
    budget.step()
    assert budget.pull == 0.0


def test_uniform_and_cost_aware_penalties_both_reach_the_target_and_differ():
    # layer 0 (784 inputs) costs ~8x more per unit than layer 1: the cost-aware pull takes it first
    results = {}
    for penalty in ("cost", "uniform"):
        model, data = mlp(hidden=(48, 48), inputs=196), separable(inputs=196)
        train_user_loop(model, data, Budget(flops=1 / 3, penalty=penalty), epochs=2)
        got = reached(model, data.tensors[0])
        assert 1 - TOLERANCE <= got * 3 <= 1 + TOLERANCE, (penalty, got)
        results[penalty] = {k: a / t for k, (a, t) in dam.widths(model).items()}
    cost, uniform = results["cost"], results["uniform"]
    assert cost["0"] < uniform["0"] and cost["2"] > uniform["2"], results


def test_round_to_gives_multiples_and_stays_under_the_target():
    model, data = mlp(hidden=(64, 40)), separable()
    train_user_loop(model, data, Budget(flops=0.4, round_to=8))
    widths = dam.widths(model)
    assert all(active % 8 == 0 for active, _ in widths.values()), widths
    assert reached(model, data.tensors[0]) <= 0.4 * (1 + TOLERANCE)
    small = dam.compact(model, data.tensors[0][:4])
    assert [m.out_features for m in small if isinstance(m, nn.Linear)][:2] == [w[0] for w in widths.values()]
    assert Budget(flops=0.5, round_to=8).allowed(20) == [8, 16, 20]  # a full layer stays allowed
    assert Budget(flops=0.5, round_to=8).allowed(6) == [6]


def test_snap_from_a_width_pattern_fits_it_to_the_target():
    """snap(start=...) rounds a given width pattern to the budget (as benchmarks/round_to
    does): multiples of round_to, under target + 3%, the wider layer kept wider."""
    model, data = mlp(hidden=(64, 40)), separable()
    budget = Budget(flops=0.4, round_to=4).bind(model, data.tensors[0][:1], total_steps=10)
    live = budget.snap(start=torch.tensor([60.0, 10.0]))
    assert all(v % 4 == 0 for v in live.values()) and budget.frozen
    assert list(live.values()) == [a for a, _ in dam.widths(model).values()]
    assert live["0"] > live["2"]
    assert reached(model, data.tensors[0]) <= 0.4 * (1 + TOLERANCE)
    with pytest.raises(ConfigError, match="one live count per gate"):
        budget.snap(start=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ConfigError, match="before Budget.bind"):
        Budget(flops=0.4).snap()


def test_user_loop_without_trainer_overrides_the_optimizers_beta_updates():
    model, data = task("mlp")
    opt = torch.optim.Adam(model.parameters(), lr=0.01)  # betas in Adam, with its own lr: overridden
    budget = train_user_loop(model, data, Budget(flops=0.3), optimizer=opt)
    got = reached(model, data.tensors[0])
    assert 1 - TOLERANCE <= got / 0.3 <= 1 + TOLERANCE
    assert budget.frozen and budget.summary(got)["ok"]


def test_unreachable_target_is_said_in_one_line():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(100, 64), nn.ReLU(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 2))
    dam.attach(net, exclude=("0",))  # the big first layer keeps its inputs: at least 100*64... of it stays
    data = separable(inputs=100)
    budget = train_user_loop(net, data, Budget(flops=0.1), epochs=1)
    got = reached(net, data.tensors[0])
    assert budget.unreachable and not budget.summary(got)["ok"]
    message = budget.message(got)
    assert "\n" not in message and "target not reached" in message and "gate more layers" in message


# ------------------------------------------------------------------ lambda mode unchanged


def test_lambda_mode_that_removes_nothing_warns_in_one_line():
    model, data = task("mlp")
    with pytest.warns(UserWarning, match="no unit was removed") as caught:
        Trainer(model, TrainConfig(epochs=1, batch_size=64, progress=False, lam=0.0)).fit(
            DataLoader(data, batch_size=64))
    messages = [str(w.message) for w in caught if "no unit" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0] and "target" in messages[0]
    assert nothing_removed_message(model, cli=True) == (
        "no unit was removed: raise --lam or --beta-lr, or give --target-flops")
    model, _ = task("mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a run that removes units does not warn
        Trainer(model, TrainConfig(epochs=2, batch_size=32, progress=False, lam=2.0, beta_lr=0.05)).fit(
            DataLoader(data, batch_size=32))
    assert any(a < t for a, t in dam.widths(model).values())


def test_no_target_is_todays_behaviour():
    trainer = Trainer(mlp(), TrainConfig(epochs=1, progress=False))
    assert trainer.budget is None


@pytest.mark.parametrize("kwargs,message", [
    ({}, "exactly one target"),
    ({"flops": 0.3, "params": 0.3}, "exactly one target"),
    ({"flops": 0.0}, "fraction in \\(0, 1\\]"),
    ({"flops": 3.0}, "fraction in \\(0, 1\\]"),
    ({"flops": 0.3, "penalty": "l2"}, "unknown penalty"),
    ({"flops": 0.3, "round_to": 0}, "round_to"),
    ({"flops": 0.3, "reach_at": 0}, "reach_at"),
])
def test_bad_budget_options(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Budget(**kwargs)


def test_bad_config_options():
    with pytest.raises(ConfigError, match="needs a target"):
        TrainConfig(penalty="cost")
    with pytest.raises(ConfigError, match="fraction"):
        TrainConfig(target_flops=1.5)
    with pytest.raises(ConfigError, match="give the target once"):
        Trainer(mlp(), TrainConfig(target_flops=0.5), budget=Budget(flops=0.5))
    with pytest.raises(ConfigError, match="before Budget.bind"):
        Budget(flops=0.5).step()


# ------------------------------------------------------------------ resume


def test_ctrl_c_then_resume_of_a_budget_run_is_bit_identical(tmp_path):
    def fit(out, resume=None, stop_at=None):
        model, data = task("mlp")
        calls = [0]

        def loss_fn(out_, y):
            if torch.is_grad_enabled():
                calls[0] += 1
                if calls[0] == stop_at:
                    os.kill(os.getpid(), signal.SIGINT)
            return F.cross_entropy(out_, y)

        trainer = Trainer(model, TrainConfig(epochs=3, batch_size=32, progress=False, target_flops=0.3),
                          loss_fn=loss_fn, out_dir=out)
        records = trainer.fit(DataLoader(data, batch_size=32, shuffle=True), resume=resume)
        return model, [{k: v for k, v in r.items() if k != "seconds"} for r in records], trainer

    reference, ref_records, ref_trainer = fit(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "run", stop_at=23)  # epoch 2, before reach_at
    model, records, trainer = fit(tmp_path / "run", resume=tmp_path / "run")
    assert records == ref_records
    for (k, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    assert trainer.budget.trace == ref_trainer.budget.trace


# ------------------------------------------------------------------ the command line


def test_cli_prune_with_a_flops_target_reports_target_vs_reached(tmp_path, capsys):
    from torchdam.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--target-flops", "0.33", "--limit", "2000", "--epochs", "2", "--latency-repeats", "3",
              "--no-progress", "--out", str(tmp_path)])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    budget = report["budget"]
    assert budget["target"] == 0.33 and budget["metric"] == "flops" and budget["ok"]
    assert budget["reached"] == report["after"]["flops"] / report["before"]["flops"]
    assert 0.33 * (1 - TOLERANCE) <= budget["reached"] <= 0.33 * (1 + TOLERANCE)
    assert "FLOPs target 33.0% of dense -> reached" in out and "within +-3%" in out
    assert report["message"] is None and "torchdam:" not in out.splitlines()[-1]
    assert set(report["speedup"]) == {"b1", "b64"} and report["speedup"]["b1"]["pairs"] == 3
    assert "interleaved" in out
    assert report["config"]["target_flops"] == 0.33 and len(budget["trace"]) > 10


def test_cli_prune_says_in_its_last_line_when_the_target_cannot_be_reached(tmp_path, capsys):
    from torchdam.cli import main

    with pytest.raises(SystemExit) as exit_info:  # the first layer ungated: 88% of the FLOPs stay
        main(["prune", "--target-flops", "0.05", "--exclude", "layers.1", "--limit", "500", "--epochs", "1",
              "--latency-repeats", "2", "--no-progress", "--out", str(tmp_path)])
    assert exit_info.value.code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("torchdam: target not reached: FLOPs 88.") and "gate more layers" in last
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["budget"]["ok"] and report["budget"]["unreachable"]


def test_cli_lambda_run_that_removes_nothing_says_what_to_change(tmp_path, capsys):
    from torchdam.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--lam", "0", "--limit", "500", "--epochs", "1", "--latency-repeats", "2",
              "--no-progress", "--out", str(tmp_path)])
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == (
        "torchdam: no unit was removed: raise --lam or --beta-lr, or give --target-flops")
    assert "no unit was removed" not in captured.err  # said once, in the CLI's words


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch built without gloo")
def test_prune_with_a_target_under_torchrun(tmp_path):
    """Two DDP ranks: the betas' task gradients are all-reduced, so every rank's budget takes
    the same steps (the Trainer checks the betas are bit-identical each epoch)."""
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("torchdam")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
         str(exe), "prune", "--target-flops", "0.33", "--limit", "1024", "--epochs", "2", "--latency-repeats", "2",
         "--no-progress", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["world_size"] == 2 and report["budget"]["ok"]
    assert 0.33 * (1 - TOLERANCE) <= report["budget"]["reached"] <= 0.33
