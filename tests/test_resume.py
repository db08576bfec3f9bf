"""Resume: a run killed with SIGKILL, or stopped by Ctrl-C, ends bit-identical to an
uninterrupted one (CPU, fixed seeds, one thread, deterministic algorithms)."""
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchdam
import torchdam.train.policy as policy_module  # the penalty every training step calls
from torchdam.checkpoint import LAST, PREV, load_checkpoint
from torchdam.cli import main
from torchdam.errors import CheckpointError, ConfigError

WORKER = Path(__file__).with_name("train_worker.py")
STEPS = 3 * 12  # train_worker: 3 epochs of 192 examples in batches of 16


def worker(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), str(out), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path):
    kill_at = random.Random(4).randint(2, STEPS - 1)
    full, killed = tmp_path / "full", tmp_path / "killed"
    reference = worker(full)
    victim = worker(killed, "--pause-at", str(kill_at))
    try:
        assert victim.stdout.readline().strip() == "PAUSED"
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
    finally:
        victim.kill()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "result.json").exists()
    finish(reference)
    finish(worker(killed, "--resume"))

    expected = json.loads((full / "result.json").read_text())
    got = json.loads((killed / "result.json").read_text())
    assert got["betas"] == expected["betas"]  # float.hex: bit-identical
    assert got["widths"] == expected["widths"]
    assert got["records"] == expected["records"]  # losses, accuracies, lr, betas per epoch
    assert got["state"] == expected["state"]  # every weight and beta
    epochs = [json.loads(line)["epoch"] for line in (killed / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


# ---------------------------------------------------------------------------- in process

def net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2))
    torchdam.attach(model)
    return model


def loaders():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 20, generator=g)
    ds = TensorDataset(x, (x[:, 0] > 0).long())
    return DataLoader(ds, batch_size=16, shuffle=True), DataLoader(ds, batch_size=64)


def config(**kw):
    return torchdam.TrainConfig(**{"epochs": 2, "batch_size": 16, "lam": 0.5, "beta_lr": 0.05,
                                   "progress": False, "optimizer": "adam", "lr": 0.01, **kw})


def ctrl_c_at(step: int):
    calls = [0]

    def loss_fn(out, y):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == step:
                os.kill(os.getpid(), signal.SIGINT)
        return F.cross_entropy(out, y)

    return loss_fn


def fit(out, resume=None, loss_fn=F.cross_entropy, **kw):
    model = net()
    trainer = torchdam.Trainer(model, config(**kw), loss_fn=loss_fn, out_dir=out)
    records = trainer.fit(*loaders(), resume=resume)
    return model, trainer, records


def strip(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_ctrl_c_saves_the_last_step_and_resume_matches(tmp_path):
    reference, ref_trainer, ref_records = fit(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "run", loss_fn=ctrl_c_at(5))  # mid-epoch 1, no periodic checkpoint
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / LAST)
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (0, 5, 5)
    assert "exp_avg" in str(saved["optimizer"]["state"][0].keys())  # Adam moments are kept
    model, trainer, records = fit(tmp_path / "run", resume=tmp_path / "run")
    assert strip(records) == strip(ref_records)
    for (k, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    assert trainer.best_epoch == ref_trainer.best_epoch and trainer.best_val_acc == ref_trainer.best_val_acc


def test_resume_falls_back_to_the_previous_checkpoint_when_the_last_is_damaged(tmp_path):
    reference, _, ref_records = fit(tmp_path / "ref", epochs=3)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "run", epochs=3, loss_fn=ctrl_c_at(20))  # epoch 3, step 4
    last = tmp_path / "run" / "checkpoints" / LAST
    last.write_bytes(last.read_bytes()[:-100])  # a copy cut short
    with pytest.warns(UserWarning, match=f"{LAST}.*truncated or corrupted.*{PREV}"):
        model, _, records = fit(tmp_path / "run", resume=tmp_path / "run", epochs=3)
    assert strip(records) == strip(ref_records)
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), model.state_dict().values()))
    with pytest.raises(CheckpointError, match=str(last)):
        fit(tmp_path / "other", resume=last, epochs=3)


def test_resume_refuses_other_options_and_other_models(tmp_path):
    fit(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"lam: 0.5 -> 0.1"):
        fit(tmp_path / "run", resume=tmp_path / "run", lam=0.1)
    narrower = nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 2))
    torchdam.attach(narrower)
    with pytest.raises(ConfigError, match=r"gates.0.n: 32 -> 8"):  # the gates are part of a run's identity
        torchdam.Trainer(narrower, config(), out_dir=tmp_path / "run").fit(*loaders(), resume=tmp_path / "run")
    other = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))  # same gate, other output layer
    torchdam.attach(other)
    with pytest.raises(CheckpointError, match="does not match this model"):
        torchdam.Trainer(other, config(), out_dir=tmp_path / "run").fit(*loaders(), resume=tmp_path / "run")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        fit(tmp_path / "empty", resume=tmp_path)


def test_periodic_checkpoints_keep_last_and_previous(tmp_path):
    fit(tmp_path, checkpoint_every=3)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [LAST, PREV]  # no temp files left
    last, prev = load_checkpoint(folder / LAST), load_checkpoint(folder / PREV)
    assert (last["epoch"], last["step_in_epoch"]) == (2, 0)  # the final epoch's end
    assert (prev["global_step"], prev["step_in_epoch"]) == (15, 7)  # the step-15 checkpoint came before it


def test_cli_prune_ctrl_c_exits_130_and_resume_finishes(tmp_path, monkeypatch, capsys):
    args = ["prune", "--limit", "512", "--epochs", "2", "--batch-size", "64", "--latency-repeats", "1",
            "--no-progress", "--checkpoint-every", "3"]
    calls = [0]
    real_penalty = policy_module.penalty

    def interrupting_penalty(model, lam):
        calls[0] += 1
        if calls[0] == 10:  # epoch 2, step 2
            os.kill(os.getpid(), signal.SIGINT)
        return real_penalty(model, lam)

    monkeypatch.setattr(policy_module, "penalty", interrupting_penalty)
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--out", str(tmp_path / "run")])
    assert exit_info.value.code == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err
    assert not (tmp_path / "run" / "report.json").exists()
    monkeypatch.setattr(policy_module, "penalty", real_penalty)

    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--resume", str(tmp_path / "run")])
    assert exit_info.value.code == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["test_acc_gated"] == report["test_acc_compacted"] > 0.5
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]  # bit-identity with an uninterrupted run: the tests above
