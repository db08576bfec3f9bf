"""Crash-safe training checkpoints: write atomically, verify on read, never run code.

A checkpoint file is one header line ``TORCHDAM-CKPT 1 <sha256>`` followed by a
``torch.save`` payload of tensors and plain containers. Reading checks the digest (a
flipped or missing byte is caught, which ``torch.load`` alone does not do) and unpickles
with ``torch.load(weights_only=True)``, which refuses any pickle that would import or
call code. Writing goes to a temporary file in the same directory, is fsync'ed, and is
renamed over ``ckpt-last.pt`` only once complete; the checkpoint it replaces is kept as
``ckpt-prev.pt``, so a latest file that is damaged anyway (a bad disk, a copy cut short)
still leaves one good checkpoint, which :func:`load_latest` falls back to.

    >>> import tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> _ = save_checkpoint({"step": 1, "w": torch.ones(2)}, d)
    >>> _ = save_checkpoint({"step": 2, "w": torch.ones(2)}, d)
    >>> load_latest(d)[0]["step"], load_checkpoint(f"{d}/ckpt-prev.pt")["step"]
    (2, 1)
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import random
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchdam.atomic import fsync_dir
from torchdam.errors import CheckpointError, DiskFullError

__all__ = ["LAST", "PREV", "find_checkpoints", "fingerprint", "get_rng_state", "load_checkpoint", "load_latest",
           "save_checkpoint", "set_rng_state", "state_digest"]

LAST = "ckpt-last.pt"
PREV = "ckpt-prev.pt"
MAGIC = b"TORCHDAM-CKPT"
VERSION = 1
_HEADER_MAX = 128


def _write_payload(file, payload: bytes) -> None:
    """Isolated so tests can simulate a full disk."""
    file.write(payload)
    file.flush()
    os.fsync(file.fileno())


def save_checkpoint(state: dict[str, Any], directory: str | Path) -> Path:
    """Write ``state`` (tensors, numbers, strings, None, and lists/tuples/dicts of them)
    as ``directory/ckpt-last.pt``, keeping the one it replaces as ``ckpt-prev.pt``.

    Raises :class:`DiskFullError` when the disk is full and :class:`CheckpointError` for
    any other write failure (read-only directory, ...); either way the checkpoints already
    on disk are untouched and no temporary file is left behind."""
    directory = Path(directory)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = b"%s %d %s\n" % (MAGIC, VERSION, hashlib.sha256(payload).hexdigest().encode())
    last, prev = directory / LAST, directory / PREV
    tmp = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ckpt-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            _write_payload(f, header + payload)
        if last.exists():
            os.replace(last, prev)
        os.replace(tmp, last)
        tmp = None
        fsync_dir(directory)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise DiskFullError(f"{last}: disk full while writing the checkpoint; free space and "
                                f"resume (the previous checkpoint in {directory} is intact)") from None
        raise CheckpointError(f"{last}: cannot write the checkpoint ({err.strerror or err}); "
                              f"check that {directory} is writable") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return last


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu") -> dict:
    """Read a file :func:`save_checkpoint` wrote; :class:`CheckpointError` naming the file
    if it is missing, truncated, corrupted, not a torchdam checkpoint, or holds a pickle
    that would run code."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({err.strerror or err})") from None
    newline = data.find(b"\n", 0, _HEADER_MAX)
    fields = data[:newline].split() if newline > 0 else []
    if len(fields) != 3 or fields[0] != MAGIC:
        raise CheckpointError(f"{path}: not a torchdam checkpoint (no {MAGIC.decode()} header); "
                              "refusing to unpickle it")
    if fields[1] != str(VERSION).encode():
        raise CheckpointError(f"{path}: checkpoint format version {fields[1].decode(errors='replace')} "
                              f"is not supported (this torchdam reads version {VERSION})")
    payload = data[newline + 1:]
    if hashlib.sha256(payload).hexdigest().encode() != fields[2]:
        raise CheckpointError(f"{path}: truncated or corrupted (checksum mismatch); "
                              f"resume from {PREV} in the same folder or start again")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: refused: the file holds objects other than tensors and "
                              f"plain containers, which could run code on load ({first})") from None
    except Exception as err:  # torch's zip reader raises RuntimeError for a damaged archive
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: checkpoint does not hold a dict")
    return state


def _update(digest, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy())


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict: every key, dtype, shape and byte, in key order. Stored
    beside tensors that are read back later (``best.safetensors``) to catch a flipped bit."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode() + b"\0")
        _update(digest, state[key])
    return digest.hexdigest()


def fingerprint(*tensors: torch.Tensor | Iterable[torch.Tensor]) -> str:
    """SHA-256 of tensors' dtypes, shapes and bytes, in order (iterables of tensors are
    flattened): a run's data identity, e.g. ``fingerprint(train_x, train_y)``, recorded
    in its checkpoints so a resume on other data is refused."""
    digest = hashlib.sha256()
    for item in tensors:
        for t in ([item] if isinstance(item, torch.Tensor) else item):
            _update(digest, t)
    return digest.hexdigest()


def find_checkpoints(directory: str | Path) -> list[Path]:
    """The checkpoints in ``directory``, newest first."""
    directory = Path(directory)
    return [p for p in (directory / LAST, directory / PREV) if p.is_file()]


def load_latest(directory: str | Path, map_location: str | torch.device | None = "cpu",
                validate: Callable[[dict, Path], None] | None = None) -> tuple[dict, Path]:
    """Load the newest good checkpoint in ``directory``: ``ckpt-last.pt``, or with a
    warning ``ckpt-prev.pt`` when the latest one is damaged. Returns ``(state, path)``.

    ``validate(state, path)`` may raise :class:`CheckpointError` for a state that loads but
    is malformed; such a checkpoint counts as damaged too."""
    directory = Path(directory)
    candidates = find_checkpoints(directory)
    if not candidates:
        raise CheckpointError(f"{directory}: no checkpoint ({LAST} or {PREV}) to resume from")
    errors = []
    for path in candidates:
        try:
            state = load_checkpoint(path, map_location)
            if validate is not None:
                validate(state, path)
        except CheckpointError as err:
            errors.append(str(err))
            continue
        if errors:
            warnings.warn(f"{errors[0]}; resuming from the previous checkpoint {path}", stacklevel=2)
        return state, path
    raise CheckpointError("; ".join(errors) + " (no good checkpoint left)")


# ---------------------------------------------------------------------------- RNG states

def get_rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python RNG states as tensors and plain containers,
    which ``torch.load(weights_only=True)`` reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Undo :func:`get_rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
