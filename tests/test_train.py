import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchdam
from torchdam.errors import CheckpointError, ConfigError, TorchDAMError
from torchdam.train import BETA_GROUP, TrainConfig, Trainer, build_optimizer


def mlp(gated: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    if gated:
        torchdam.attach(net)
    return net


def separable(n: int = 1024, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    w = torch.randn(20, generator=g)
    return TensorDataset(x, (x @ w > 0).long())


def loaders(n: int = 1024):
    data = separable(n)
    return DataLoader(data, batch_size=64, shuffle=True), DataLoader(data, batch_size=256)


def config(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 64, "progress": False, **kw})


def test_beta_group_has_no_weight_decay_by_default():
    net = mlp()
    opt = build_optimizer(net, config(weight_decay=0.1, beta_lr=0.01))
    weights, betas = opt.param_groups
    assert betas["name"] == BETA_GROUP and betas["weight_decay"] == 0.0 and betas["lr"] == 0.01
    assert weights["weight_decay"] == 0.1
    assert {id(p) for p in betas["params"]} == {id(b) for b in torchdam.gate_parameters(net)}

    # Zero task gradient and lam=0: the weights decay, beta does not move.
    before_w = net[0].weight.detach().clone()
    before_b = [b.detach().clone() for b in torchdam.gate_parameters(net)]
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(net[0].weight, before_w * (1 - 0.05 * 0.1))
    for b, b0 in zip(torchdam.gate_parameters(net), before_b):
        assert torch.equal(b, b0)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_cold_start_freezes_beta_exactly_then_it_falls(optimizer):
    net = mlp()
    train, _ = loaders(256)
    lr = 0.05 if optimizer == "sgd" else 0.01
    trainer = Trainer(net, config(epochs=3, cold_start=2, optimizer=optimizer, lr=lr, lam=1.0))
    records = trainer.fit(train)
    for r in records[:2]:
        assert r["beta/0"] == 1.0 and r["beta/2"] == 1.0  # bit-identical to the init
    assert records[2]["beta/0"] < 1.0 and records[2]["beta/2"] < 1.0
    assert all(b.requires_grad for b in torchdam.gate_parameters(net))


def test_penalty_shrinks_widths_and_keeps_accuracy():
    net = mlp()
    train, val = loaders()
    records = Trainer(net, config(epochs=15, lam=0.5)).fit(train, val)
    widths = torchdam.widths(net)
    assert all(active <= total // 2 for active, total in widths.values()), widths
    assert records[-1]["val_acc"] > 0.95
    assert records[-1]["width/0"] == widths["0"][0]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_log_has_one_line_per_epoch(tmp_path, fmt):
    train, val = loaders(256)
    Trainer(mlp(), config(epochs=3, log_format=fmt), out_dir=tmp_path).fit(train, val)
    path = tmp_path / f"log.{fmt}"
    if fmt == "jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    else:
        rows = list(csv.DictReader(path.open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds",
                "beta/0", "beta/2", "width/0", "width/2"):
        assert key in rows[0]


def test_no_out_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train, val = loaders(256)
    Trainer(mlp(), config()).fit(train, val)
    assert list(tmp_path.iterdir()) == []


def test_best_checkpoint_saved_and_restored(tmp_path):
    net = mlp()
    train, val = loaders(512)
    trainer = Trainer(net, config(epochs=3), out_dir=tmp_path)
    records = trainer.fit(train, val)
    assert (tmp_path / "best.safetensors").exists()
    assert trainer.best_val_acc == max(r["val_acc"] for r in records)
    assert records[trainer.best_epoch - 1]["val_acc"] == trainer.best_val_acc
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    trainer.restore_best()
    assert trainer.evaluate(val)["acc"] == trainer.best_val_acc


def test_restore_best_in_memory_and_without_fit():
    net = mlp()
    train, val = loaders(256)
    trainer = Trainer(net, config())
    with pytest.raises(CheckpointError):
        trainer.restore_best()
    trainer.fit(train, val)
    with torch.no_grad():
        net[0].weight.zero_()
    trainer.restore_best()
    assert trainer.evaluate(val)["acc"] == trainer.best_val_acc


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.05), ("adam", 0.01)])
def test_sgd_and_adam_learn(optimizer, lr):
    train, val = loaders()
    trainer = Trainer(mlp(), config(epochs=8, optimizer=optimizer, lr=lr))
    records = trainer.fit(train, val)
    assert isinstance(trainer.optimizer, torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)
    assert records[-1]["val_acc"] > 0.9


def test_step_schedule_changes_lr_at_milestones():
    net = mlp()
    train, _ = loaders(128)
    trainer = Trainer(net, config(epochs=4, schedule="step", milestones=(1, 3), lr=0.1))
    records = trainer.fit(train)
    assert [r["lr"] for r in records] == pytest.approx([0.1, 0.01, 0.01, 0.001])


def test_cosine_schedule_decays_lr():
    train, _ = loaders(128)
    records = Trainer(mlp(), config(epochs=4, lr=0.1)).fit(train)
    assert [r["lr"] for r in records] == pytest.approx(
        [0.1 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)])


@pytest.mark.parametrize("bad", [
    {"epochs": 0}, {"lr": 0.0}, {"lam": -1.0}, {"cold_start": 5}, {"cold_start": -1},
    {"optimizer": "rmsprop"}, {"schedule": "linear"}, {"log_format": "xml"},
])
def test_bad_config_raises(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        TrainConfig(**{"epochs": 3, **bad})


def test_dense_model_trains_without_beta_group():
    net = mlp(gated=False)
    train, val = loaders()
    trainer = Trainer(net, config(epochs=8))
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["weights"]
    records = trainer.fit(train, val)
    assert not any("/" in k for k in records[0])
    assert records[-1]["val_acc"] > 0.9


def test_nan_loss_raises():
    train, _ = loaders(128)
    nan_loss = lambda out, y: F.cross_entropy(out, y) * float("nan")  # noqa: E731
    with pytest.raises(TorchDAMError, match="NaN/inf at epoch 1"):
        Trainer(mlp(), config(), loss_fn=nan_loss).fit(train)


def test_autoencoder_with_mse_has_no_accuracy():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 8), nn.Linear(8, 20))
    torchdam.attach(net)
    x = torch.randn(256, 20)
    ae = DataLoader(TensorDataset(x, x), batch_size=64)
    trainer = Trainer(net, config(lr=0.01), loss_fn=F.mse_loss)
    records = trainer.fit(ae, ae)
    assert records[-1]["train_acc"] is None and records[-1]["val_acc"] is None
    assert trainer.best_epoch is not None and trainer.best_val_loss == min(r["val_loss"] for r in records)


def test_progress_bar_shows_loss_acc_and_width(monkeypatch):
    import io

    import torchdam.train.loop as train_module

    stream = io.StringIO()
    real_tqdm = train_module.tqdm
    monkeypatch.setattr(train_module, "tqdm",
                        lambda *a, **kw: real_tqdm(*a, **{**kw, "disable": False, "file": stream, "mininterval": 0}))
    train, _ = loaders(256)
    Trainer(mlp(), config(epochs=1, progress=True)).fit(train)
    shown = stream.getvalue()
    assert "loss=" in shown and "acc=" in shown and "width=" in shown
