"""Checkpoint files: atomic, verified, last + previous kept, and never unpickling code."""
import errno
import hashlib
import io
import os
import pickle
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import torchdam
from torchdam import checkpoint
from torchdam.checkpoint import LAST, PREV, load_checkpoint, load_latest, save_checkpoint
from torchdam.errors import CheckpointError, DiskFullError


def state(step: int) -> dict:
    return {"step": step, "w": torch.full((3,), float(step)), "nested": {"t": (1, 2.5, None, "x")}}


def test_round_trip_keeps_last_and_previous(tmp_path):
    save_checkpoint(state(1), tmp_path)
    save_checkpoint(state(2), tmp_path)
    save_checkpoint(state(3), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST, PREV]
    latest, path = load_latest(tmp_path)
    assert path.name == LAST and latest["step"] == 3 and torch.equal(latest["w"], torch.full((3,), 3.0))
    assert latest["nested"] == {"t": (1, 2.5, None, "x")}
    assert load_checkpoint(tmp_path / PREV)["step"] == 2


def test_rng_states_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.rand(1), np.random.rand(), random.random()
    save_checkpoint({"rng": checkpoint.get_rng_state()}, tmp_path)
    expected = torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)]
    checkpoint.set_rng_state(load_checkpoint(tmp_path / LAST)["rng"])
    got = torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)]
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_damaged_latest_is_named_and_previous_is_used(tmp_path, damage):
    save_checkpoint(state(1), tmp_path)
    save_checkpoint(state(2), tmp_path)
    last = tmp_path / LAST
    data = bytearray(last.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF  # torch.load alone would not notice this
    else:
        data = bytearray()
    last.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(last)):
        load_checkpoint(last)
    with pytest.warns(UserWarning, match=PREV):
        restored, path = load_latest(tmp_path)
    assert path.name == PREV and restored["step"] == 1


def test_no_good_checkpoint_left_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_latest(tmp_path)
    (tmp_path / LAST).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no good checkpoint left"):
        load_latest(tmp_path)


class Exploit:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"model": Exploit(marker)})
    # 1. a bare pickle (what a `torch.load(weights_only=False)` loader would run)
    bare = tmp_path / "bare.pt"
    bare.write_bytes(evil)
    with pytest.raises(CheckpointError, match="not a torchdam checkpoint"):
        load_checkpoint(bare)
    # 2. the same inside torch.save's zip, with a valid torchdam header and checksum
    buffer = io.BytesIO()
    torch.save({"model": Exploit(marker)}, buffer)
    payload = buffer.getvalue()
    forged = tmp_path / "forged.pt"
    forged.write_bytes(b"TORCHDAM-CKPT 1 " + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(forged)
    assert not marker.exists()


def test_malicious_pickle_as_compacted_model_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    torchdam.attach(net)
    folder = torchdam.save(torchdam.compact(net, torch.randn(2, 4)), tmp_path / "compacted")
    (folder / "model.safetensors").write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        torchdam.load(folder)
    assert not marker.exists()


def test_disk_full_raises_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(state(1), tmp_path)
    before = (tmp_path / LAST).read_bytes()

    def full(file, payload):
        file.write(payload[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "_write_payload", full)
    with pytest.raises(DiskFullError, match=f"{LAST}: disk full.*previous checkpoint .* intact"):
        save_checkpoint(state(2), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST]  # no temp file left over
    assert (tmp_path / LAST).read_bytes() == before and load_checkpoint(tmp_path / LAST)["step"] == 1


def test_unwritable_folder_is_a_checkpoint_error(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", read_only)
    with pytest.raises(CheckpointError, match="cannot write the checkpoint.*writable"):
        save_checkpoint(state(1), tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="cannot write"):
        save_checkpoint(state(1), blocker / "sub")


def test_warning_free_on_a_clean_load(tmp_path):
    save_checkpoint(state(1), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_latest(tmp_path)
