"""The bad-input matrix: each wrong input is one clear line and exit code 2 from the CLI,
or a torchdam exception from the API, and nothing already written is lost or corrupted."""
import errno
import math
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchdam
from torchdam import checkpoint
from torchdam.attach import warn_dead_layers
from torchdam.checkpoint import LAST, PREV, load_checkpoint
from torchdam.cli import main
from torchdam.errors import (AttachError, CheckpointError, CompactionError, ConfigError, DataError,
                             DiskFullError, DivergenceError, ShapeError, UnsupportedLayerError)

# ---------------------------------------------------------------------------- CLI
# (arguments, what the one line must say). "{tmp}" is this test's folder; cases that get
# past validation use --limit so that reading data stays cheap.
CLI = [
    (["--model", "vgg99"], "unknown model 'vgg99'"),
    (["--data", "imagenet"], "unknown dataset 'imagenet'"),
    (["--lam", "-0.5"], "lam (lambda) must be >= 0"),
    (["--lam", "nan"], "lam must be a finite number"),
    (["--lam", "inf"], "lam must be a finite number"),
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--epochs", "-3"], "epochs must be >= 1"),
    (["--epochs", "abc"], "Invalid value"),
    (["--lr", "0"], "lr must be > 0"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--beta-lr", "-0.1"], "beta_lr must be >= 0"),
    (["--momentum", "-1"], "momentum must be >= 0"),
    (["--weight-decay", "-1"], "weight_decay must be >= 0"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--optimizer", "rmsprop"], "unknown optimizer 'rmsprop'"),
    (["--schedule", "linear"], "unknown schedule 'linear'"),
    (["--schedule", "step", "--milestones", "-1"], "milestones must be >= 0"),
    (["--cold-start", "99"], "cold_start must be between 0 and epochs"),
    (["--ship", "middle"], "--ship must be 'last' or 'best'"),
    (["--checkpoint-every", "-1"], "checkpoint_every must be >= 0"),
    (["--layers", "lstm"], "unknown layer selector"),
    (["--no-such-option"], "No such option"),
    (["--limit", "0"], "limit must be a positive number"),
    (["--gate", "sigmoid", "--limit", "100"], "unknown gate type 'sigmoid'"),
    (["--layers", "nothing.here*", "--limit", "100"], "matched no layer"),
    (["--resume", "{tmp}/never-ran"], "nothing to resume"),
    (["--out", "{tmp}/a-file/out"], "is not writable"),
    # every option is checked before the first epoch: bounds a run could only trip over later
    (["--seed", "-1"], "seed must be between 0 and 2**63-1"),
    (["--seed", str(2**64)], "seed must be between 0 and 2**63-1"),
    (["--batch-size", str(10**19)], "batch_size must be <= 2147483647"),
    (["--lr", "1e39"], "lr must be at most 3.403e+38"),
    (["--lam", "1e39"], "lam must be at most 3.403e+38"),
    (["--beta-lr", "1e39"], "beta_lr must be at most 3.403e+38"),
    (["--latency-repeats", "0"], "latency_repeats must be a whole number >= 1"),
    (["--min-width", "0"], "min_width must be a whole number >= 1"),
    (["--limit", str(2**40)], "limit must be a positive number of training examples (and <= 2**31-1)"),
    (["--out", "{tmp}/a-file"], "is not writable"),
]


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--no-progress", "--epochs", "1", *args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err


@pytest.mark.parametrize("args,message", CLI, ids=[" ".join(a) for a, _ in CLI])
def test_cli_bad_input_is_one_line_and_exit_code_2(args, message, tmp_path, capsys):
    (tmp_path / "a-file").write_text("keep me")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in args and "--resume" not in args:
        args += ["--out", str(tmp_path / "out")]
    code, err = run_cli(args, capsys)
    assert code == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert (tmp_path / "a-file").read_text() == "keep me"
    assert not (tmp_path / "out" / "log.jsonl").exists()  # refused before the first epoch


def broken_run(folder, last: bytes, prev: bytes | None = None):
    ckpts = folder / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / LAST).write_bytes(last)
    if prev is not None:
        (ckpts / PREV).write_bytes(prev)
    return ckpts


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("case", ["truncated", "malicious"])
def test_cli_resume_from_a_bad_checkpoint_is_exit_2_and_leaves_it(case, tmp_path, capsys):
    marker = tmp_path / "pwned"
    content = b"TORCHDAM-CKPT 1 " + b"0" * 64 + b"\n" + b"PK\x03\x04" if case == "truncated" \
        else pickle.dumps(Exploit(marker))
    ckpts = broken_run(tmp_path / "run", content)
    code, err = run_cli(["--limit", "100", "--resume", str(tmp_path / "run")], capsys)
    assert code == 2 and str(ckpts / LAST) in err and len(err.strip().splitlines()) == 1
    assert (ckpts / LAST).read_bytes() == content and not marker.exists()


# ---------------------------------------------------------------------------- API

def mlp() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    torchdam.attach(net)
    return net


def data(n=64, nan=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    if nan:
        x[5, 2] = float("nan")
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16)


def config(**kw):
    return torchdam.TrainConfig(**{"epochs": 2, "batch_size": 16, "progress": False, **kw})


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.out_features = 16
        self.w = nn.Parameter(torch.ones(16))

    def forward(self, x):
        return x * self.w


def _unsupported_compaction():
    from torchdam.attach import UNIT_LAYERS

    UNIT_LAYERS[Scale] = ("out_features", -1)
    try:
        net = nn.Sequential(nn.Linear(6, 16), Scale(), nn.Linear(16, 2))
        torchdam.attach(net, layers=(Scale,))
        torchdam.compact(net, torch.randn(2, 6))
    finally:
        del UNIT_LAYERS[Scale]


API = [
    ("lr nan", lambda: config(lr=math.nan), ConfigError, "lr must be a finite number"),
    ("beta_lr inf", lambda: config(beta_lr=math.inf), ConfigError, "beta_lr must be a finite number"),
    ("epochs 2.5", lambda: config(epochs=2.5), ConfigError, "epochs must be a whole number"),
    ("epochs '3'", lambda: config(epochs="3"), ConfigError, "epochs must be a whole number"),
    ("lam -1", lambda: config(lam=-1.0), ConfigError, "lam (lambda) must be >= 0"),
    ("config not a TrainConfig", lambda: torchdam.Trainer(mlp(), {"epochs": 1}), ConfigError, "needs a TrainConfig"),
    ("unknown gate", lambda: torchdam.attach(nn.Sequential(nn.Linear(3, 3)), gate="sigmoid",
                                                     include_output=True),
     ConfigError, "unknown gate type"),
    ("attach matches nothing", lambda: torchdam.attach(mlp(), layers=("nothing*",)), AttachError, ""),
    ("attach twice", lambda: torchdam.attach(mlp()), AttachError, "already has a DAM gate"),
    ("attach unsupported type", lambda: torchdam.attach(nn.Sequential(nn.LSTM(3, 3)), layers=(nn.LSTM,),
                                                        include_output=True), AttachError, "LSTM"),
    ("attach a TorchScript module", lambda: torchdam.attach(torch.jit.script(nn.Sequential(nn.Linear(3, 3)))),
     AttachError, "TorchScript module cannot be gated"),
    ("penalty without gates", lambda: torchdam.penalty(nn.Linear(3, 3), 0.1), AttachError, "no DAM gates"),
    ("penalty negative", lambda: torchdam.penalty(mlp(), -1.0), ConfigError, "lambda must be >= 0"),
    ("compact unsupported layer", _unsupported_compaction, UnsupportedLayerError, "Scale"),
    ("compact wrong input shape", lambda: torchdam.compact(mlp(), torch.randn(2, 7)), ShapeError, "do not fit"),
    ("compact min_width 0", lambda: torchdam.compact(mlp(), torch.randn(2, 6), min_width=0),
     CompactionError, "min_width"),
    ("empty data", lambda: torchdam.Trainer(mlp(), config()).fit(DataLoader(TensorDataset(
        torch.zeros(0, 6), torch.zeros(0, dtype=torch.long)), batch_size=4)), DataError, "yielded no batches"),
    ("NaN in the data", lambda: torchdam.Trainer(mlp(), config()).fit(data(nan=True)), DivergenceError, "NaN/inf"),
    ("resume from nothing", lambda: torchdam.Trainer(mlp(), config()).fit(data(), resume="/nonexistent"),
     CheckpointError, "no checkpoint"),
    ("load a non-model folder", lambda: torchdam.load("/nonexistent"), CheckpointError, "no saved model"),
    # numeric options of penalty / DAMGate / attach, as Python, numpy and tensor values
    ("penalty tensor -1", lambda: torchdam.penalty(mlp(), torch.tensor(-1.0)), ConfigError, "lambda must be >= 0"),
    ("penalty nan", lambda: torchdam.penalty(mlp(), math.nan), ConfigError, "lambda must be a finite number"),
    ("penalty numpy inf", lambda: torchdam.penalty(mlp(), np.float32("inf")), ConfigError,
     "lambda must be a finite number"),
    ("penalty tensor nan", lambda: torchdam.penalty(mlp(), torch.tensor(math.nan)), ConfigError,
     "lambda must be a finite number"),
    ("penalty 2-element tensor", lambda: torchdam.penalty(mlp(), torch.ones(2)), ConfigError, "0-dim real tensor"),
    ("penalty True", lambda: torchdam.penalty(mlp(), True), ConfigError, "lambda must be a number"),
    ("penalty string", lambda: torchdam.penalty(mlp(), "0.1"), ConfigError, "lambda must be a number"),
    ("gate k inf", lambda: torchdam.DAMGate(4, k=math.inf), ConfigError, "k must be a finite number"),
    ("gate k numpy nan", lambda: torchdam.DAMGate(4, k=np.float64("nan")), ConfigError, "k must be a finite number"),
    ("gate k 1e39", lambda: torchdam.DAMGate(4, k=1e39), ConfigError, "k <= "),
    ("gate alpha nan", lambda: torchdam.DAMGate(4, alpha=math.nan), ConfigError, "alpha must be a finite number"),
    ("gate alpha tensor 0", lambda: torchdam.DAMGate(4, alpha=torch.tensor(0.0)), ConfigError, "alpha != 0"),
    ("gate alpha 1e20", lambda: torchdam.DAMGate(4, alpha=1e20), ConfigError, "alpha\\*\\*2 must be a float32"),
    ("gate beta_init nan", lambda: torchdam.DAMGate(4, beta_init=math.nan), ConfigError,
     "beta_init must be a finite number"),
    ("gate beta_init string", lambda: torchdam.DAMGate(4, beta_init="1"), ConfigError, "beta_init must be a real"),
    ("gate n True", lambda: torchdam.DAMGate(True), ConfigError, "positive whole number of units"),
    ("gate n 4.0", lambda: torchdam.DAMGate(4.0), ConfigError, "positive whole number of units"),
    ("gate n 10**12", lambda: torchdam.DAMGate(10**12), ConfigError, "n <= 2147483647"),
    ("gate n numpy 0", lambda: torchdam.DAMGate(np.int64(0)), ConfigError, "1 <= n"),
    ("attach k inf", lambda: torchdam.attach(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), k=math.inf),
     ConfigError, "k must be a finite number"),
    ("attach beta_init tensor nan", lambda: torchdam.attach(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)),
                                                            beta_init=torch.tensor(math.nan)),
     ConfigError, "beta_init must be a finite number"),
]


@pytest.mark.parametrize("make,error,message", [a[1:] for a in API], ids=[a[0] for a in API])
def test_api_bad_input_raises_a_torchdam_error(make, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_nan_loss_mid_training_keeps_the_good_checkpoints(tmp_path):
    calls = [0]

    def loss_fn(out, y):  # finite for 1.5 epochs, then NaN
        calls[0] += torch.is_grad_enabled()
        return F.cross_entropy(out, y) * (math.nan if calls[0] > 6 else 1.0)

    trainer = torchdam.Trainer(mlp(), config(epochs=3, checkpoint_every=1), loss_fn=loss_fn, out_dir=tmp_path)
    with pytest.raises(DivergenceError, match="epoch 2 .step 3."):
        trainer.fit(data())
    for name in (LAST, PREV):
        saved = load_checkpoint(tmp_path / "checkpoints" / name)
        assert saved["global_step"] in (5, 6)
        assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_all_units_dead_warns_and_compaction_keeps_the_network_connected():
    net = mlp()
    with torch.no_grad():
        for gate in torchdam.named_gates(net):
            gate[1].beta.fill_(-10.0)
    with pytest.warns(UserWarning, match="every unit of 0, 2 is off"):
        assert warn_dead_layers(net) == ["0", "2"]
    x = torch.randn(4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = torchdam.compact(net, x)
    net.eval()
    torch.testing.assert_close(small(x), net(x))


@pytest.mark.parametrize("errno_,error", [(errno.ENOSPC, DiskFullError), (errno.EROFS, CheckpointError)])
def test_disk_full_or_read_only_mid_training_keeps_the_last_checkpoint(tmp_path, monkeypatch, errno_, error):
    trainer = torchdam.Trainer(mlp(), config(epochs=2), out_dir=tmp_path)
    real = checkpoint._write_payload
    writes = [0]

    def failing(file, payload):
        writes[0] += 1
        if writes[0] == 2:  # the second epoch's checkpoint
            raise OSError(errno_, os.strerror(errno_))
        real(file, payload)

    monkeypatch.setattr(checkpoint, "_write_payload", failing)
    with pytest.raises(error, match=str(tmp_path / "checkpoints" / LAST)):
        trainer.fit(data())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [LAST]
    assert load_checkpoint(tmp_path / "checkpoints" / LAST)["epoch"] == 1
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2  # the log is not lost
