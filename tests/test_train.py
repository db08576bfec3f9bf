import csv
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchdam
from torchdam.errors import CheckpointError, ConfigError, TorchDAMError
from torchdam.train import (BETA_GROUP, WEIGHTS_GROUP, DAMPolicy, Group, TrainConfig, Trainer, build_optimizer,
                            dam_param_groups, param_groups, to_device)


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
    # lambda 0.5 and beta at the weights' lr: the recipe these tests were written for
    return TrainConfig(**{"epochs": 2, "batch_size": 64, "progress": False, "lam": 0.5, "beta_lr": None, **kw})


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


# ---------------------------------------------------------------- the policy, for any loop

def test_param_groups_give_special_parameters_their_own_lr_and_decay():
    net = mlp(gated=False)
    frozen = nn.Parameter(torch.zeros(3), requires_grad=False)
    net.register_parameter("frozen", frozen)
    groups = param_groups(net, {"head": Group(list(net[4].parameters()), lr=0.5), "empty": ([], 1.0)},
                          weight_decay=0.1)
    assert [g["name"] for g in groups] == [WEIGHTS_GROUP, "head"]  # an empty group is left out
    weights, head = groups
    assert "lr" not in weights and weights["weight_decay"] == 0.1  # the optimizer's lr
    assert head["lr"] == 0.5 and head["weight_decay"] == 0.0
    assert {id(p) for p in weights["params"]} == {id(p) for p in [*net[0].parameters(), *net[2].parameters()]}
    with pytest.raises(ConfigError, match="listed twice"):
        param_groups(net, {"a": [[net[0].weight]], "b": [[net[0].weight]]})


def test_dam_param_groups_are_the_trainers_and_beta_lr_defaults_to_lr():
    net = mlp()
    groups = dam_param_groups(net, lr=0.1, beta_lr=None, weight_decay=0.01)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [(WEIGHTS_GROUP, 0.1, 0.01), (BETA_GROUP, 0.1, 0.0)]
    trainer_groups = build_optimizer(net, config(lr=0.1, beta_lr=0.02)).param_groups
    assert [[id(p) for p in g["params"]] for g in trainer_groups] == [[id(p) for p in g["params"]] for g in groups]
    # betas named in another special group stay in the beta group
    betas = torchdam.gate_parameters(net)
    groups = dam_param_groups(net, 0.1, 0.02, special={"other": Group([*betas, net[4].bias])})
    assert [g["name"] for g in groups] == [WEIGHTS_GROUP, "other", BETA_GROUP]
    assert [id(p) for p in groups[1]["params"]] == [id(net[4].bias)]


@pytest.mark.parametrize("bad", [{"lam": -1.0}, {"lam": math.nan}, {"cold_start": -1}, {"cold_start": 1.5}])
def test_policy_is_validated_once_when_made(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        DAMPolicy(**{"lam": 0.1, **bad})


def test_penalty_as_a_gradient_equals_penalty_in_the_loss_and_cold_start_drops_it():
    x, y = torch.randn(16, 20), torch.randint(0, 2, (16,))
    policy = DAMPolicy(lam=0.7, cold_start=1)
    in_loss, as_grad = mlp(), mlp()
    (F.cross_entropy(in_loss(x), y) + policy.penalty(in_loss)).backward()
    F.cross_entropy(as_grad(x), y).backward()
    policy.after_backward(as_grad, epoch=1, penalty_scale=1.0)
    for a, b in zip(in_loss.parameters(), as_grad.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    policy.after_backward(as_grad, epoch=0)  # cold start
    assert all(b.grad is None for b in torchdam.gate_parameters(as_grad))
    assert as_grad[0].weight.grad is not None
    assert policy.frozen(0) and not policy.frozen(1)
    assert DAMPolicy.from_config(config(lam=0.3, cold_start=2)) == DAMPolicy(0.3, 2)


def test_own_loop_with_the_policy_is_the_trainer_bit_for_bit():
    train, _ = loaders(256)
    cfg = config(epochs=2, cold_start=1, schedule="none", beta_lr=0.02, lam=1.0)
    by_trainer = mlp()
    Trainer(by_trainer, cfg).fit(train)

    own = mlp()
    opt = torch.optim.SGD(dam_param_groups(own, lr=cfg.lr, beta_lr=cfg.beta_lr), lr=cfg.lr, momentum=cfg.momentum)
    policy = DAMPolicy(lam=cfg.lam, cold_start=cfg.cold_start)
    torch.manual_seed(cfg.seed)  # as Trainer.fit does: the same shuffles
    for epoch in range(cfg.epochs):
        for x, y in train:
            loss = F.cross_entropy(own(x), y) + policy.penalty(own)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            policy.after_backward(own, epoch)
            opt.step()
    for a, b in zip(by_trainer.state_dict().values(), own.state_dict().values()):
        assert torch.equal(a, b)
    assert torchdam.gate_parameters(own)[0].item() < 1.0


# ---------------------------------------------------------------- batches of any layout

def test_to_device_moves_nested_batches_and_keeps_their_types():
    from collections import namedtuple

    Pair = namedtuple("Pair", "a b")
    batch = {"x": (torch.ones(2), [torch.zeros(1), Pair(torch.ones(1), 3)]), "name": "b"}
    moved = to_device(batch, torch.device("meta"))
    assert moved["x"][0].is_meta and moved["x"][1][0].is_meta and moved["name"] == "b"
    pair = moved["x"][1][1]
    assert isinstance(pair, Pair) and pair.a.is_meta and pair.b == 3
    assert isinstance(moved["x"], tuple) and isinstance(moved["x"][1], list)


def test_to_device_moves_a_batch_that_moves_itself():
    """PyTorch Geometric's ``Data`` / ``Batch``: neither a tensor nor a container, but ``.to(device)``."""
    class Graph:
        def to(self, device):
            moved = Graph()
            moved.device = device
            return moved

    assert to_device([Graph()], torch.device("meta"))[0].device == torch.device("meta")
    assert to_device(mlp(), torch.device("meta"))[0].weight.device.type == "cpu"  # never a model


def test_dict_batches_need_a_forward_fn():
    loader = [{"x": torch.randn(4, 20), "y": torch.zeros(4, dtype=torch.long)}]
    with pytest.raises(ConfigError, match="forward_fn"):
        Trainer(mlp(), config()).fit(loader)


class Recommender(nn.Module):
    """Two inputs: user and item ids -> embeddings -> MLP -> rating."""

    def __init__(self, users: int = 20, items: int = 30, dim: int = 8) -> None:
        super().__init__()
        self.user, self.item = nn.Embedding(users, dim), nn.Embedding(items, dim)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([self.user(users), self.item(items)], 1)).squeeze(1)


def test_recommender_with_two_inputs_trains_with_dam_gates():
    torch.manual_seed(0)
    users, items = torch.randint(0, 20, (512,)), torch.randint(0, 30, (512,))
    ratings = torch.randn(20)[users] + torch.randn(30)[items]  # user bias + item bias
    model = Recommender()
    torchdam.attach(model)
    assert list(torchdam.widths(model)) == ["mlp.0"]
    loader = DataLoader(TensorDataset(users, items, ratings), batch_size=64, shuffle=True)
    trainer = Trainer(model, config(epochs=6, optimizer="adam", lr=0.02, beta_lr=0.1, lam=2.0), loss_fn=F.mse_loss,
                      forward_fn=lambda m, b: (m(b[0], b[1]), b[2]))
    records = trainer.fit(loader, loader)
    assert records[-1]["train_loss"] < 0.5 * records[0]["train_loss"]
    assert records[-1]["train_acc"] is None and records[-1]["val_acc"] is None
    assert records[-1]["width/mlp.0"] < 32  # the gate pruned the MLP
    assert trainer.evaluate(loader)["loss"] == pytest.approx(records[-1]["val_loss"])
    small = torchdam.compact(model, (users[:8], items[:8]))
    model.eval()
    torch.testing.assert_close(small(users, items), model(users, items), rtol=0, atol=1e-5)


def test_hf_bert_classifier_trains_from_dict_batches():
    if not os.environ.get("CI"):  # CI installs the extra: a missing transformers there is a failure
        pytest.importorskip("transformers")
    from transformers import BatchEncoding, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2))
    torchdam.attach(bert, layers=("*.intermediate.dense",))
    ids = torch.randint(2, 30, (128, 8))
    labels = (ids == 5).any(1).long()  # does token 5 occur?
    rows = [{"input_ids": i, "attention_mask": torch.ones(8, dtype=torch.long), "labels": y}
            for i, y in zip(ids, labels)]
    collate = lambda rows: BatchEncoding({k: torch.stack([r[k] for r in rows]) for k in rows[0]})  # noqa: E731
    loader = DataLoader(rows, batch_size=32, shuffle=True, collate_fn=collate)

    def forward_fn(model, batch):
        assert isinstance(batch, BatchEncoding)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits, batch["labels"]

    trainer = Trainer(bert, config(epochs=3, optimizer="adam", lr=1e-3, beta_lr=0.05, lam=1.0),
                      forward_fn=forward_fn)
    records = trainer.fit(loader, loader)
    assert all(isinstance(r["train_acc"], float) and isinstance(r["val_acc"], float) for r in records)
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["beta/bert.encoder.layer.0.intermediate.dense"] < 1.0
    assert trainer.evaluate(loader)["acc"] == records[-1]["val_acc"]
