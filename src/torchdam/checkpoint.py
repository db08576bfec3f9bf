"""Crash-safe training checkpoints: write atomically, verify on read, never run code.

A checkpoint file is one header line ``TORCHDAM-CKPT 1 <sha256>`` followed by a
``torch.save`` payload of tensors and plain containers. Reading checks the digest (a
flipped or missing byte is caught, which ``torch.load`` alone does not do) and unpickles
with ``torch.load(weights_only=True)``, which refuses any pickle that would import or
call code. Writing goes to a temporary file in the same directory, is fsync'ed, and is
renamed over ``ckpt-last.pt`` only once complete; the checkpoint it replaces is kept as
``ckpt-prev.pt``, so a latest file that is damaged anyway (a bad disk, a copy cut short)
still leaves one good checkpoint, which :func:`load_latest` falls back to.

Reading trusts nothing in the file: only a regular file is opened (a FIFO, device or
socket, or a symlink to one, is refused before it is opened, so it cannot hang or feed
endless data), its size is bounded (:data:`MAX_CHECKPOINT_BYTES`), the zip payload may hold
only uncompressed records no larger than the payload itself (no zip bombs), and what
``torch.load`` returns must be plain containers nested at most :data:`MAX_NESTING` deep
without reference cycles, holding tensors whose elements fit in their storage.

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
import stat
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchdam.atomic import fsync_dir
from torchdam.errors import CheckpointError, DiskFullError

__all__ = ["LAST", "MAX_CHECKPOINT_BYTES", "MAX_NESTING", "PREV", "find_checkpoints", "fingerprint",
           "get_rng_state", "load_checkpoint", "load_latest", "read_regular_file", "save_checkpoint",
           "set_rng_state", "state_digest"]

LAST = "ckpt-last.pt"
PREV = "ckpt-prev.pt"
MAGIC = b"TORCHDAM-CKPT"
VERSION = 1
_HEADER_MAX = 128
#: Largest checkpoint file :func:`load_checkpoint` reads (it reads the whole file into memory).
MAX_CHECKPOINT_BYTES = 64 * 2**30
#: Deepest nesting of containers a checkpoint may hold (training states nest a few levels).
MAX_NESTING = 64

_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def _not_regular(path: Path, mode: int, what: str) -> CheckpointError:
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    return CheckpointError(f"{path}: is {kind}, not a regular file; refusing to read {what} from it")


def read_regular_file(path: str | Path, what: str, limit: int, missing: str | None = None) -> bytes:
    """The bytes of ``path``, which must be a regular file (or a symlink to one) of at
    most ``limit`` bytes. A FIFO, device or socket is refused from ``os.stat`` alone,
    before any ``open``; the file is then opened non-blocking and checked again on its
    descriptor, so one swapped in between cannot block or stream endless data either.
    Raises :class:`CheckpointError` naming ``path`` and ``what`` it was to hold;
    ``missing`` replaces the message for a file that does not exist."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(missing or f"{path}: missing; cannot read {what}") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    if not stat.S_ISREG(info.st_mode):
        raise _not_regular(path, info.st_mode, what)
    if info.st_size > limit:
        raise CheckpointError(f"{path}: {info.st_size} bytes, more than the {limit} bytes allowed for {what}; "
                              "not a file torchdam wrote, or raise the limit if you trust it")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    with os.fdopen(fd, "rb") as file:
        try:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise _not_regular(path, info.st_mode, what)
            if info.st_size > limit:
                raise CheckpointError(f"{path}: more than the {limit} bytes allowed for {what}")
            # read(n) allocates n bytes up front: ask for the size fstat reported, plus one
            # byte to notice a file that grows while it is read
            data = file.read(info.st_size + 1)
        except OSError as err:
            raise CheckpointError(f"{path}: cannot read {what} ({err.strerror or err})") from None
        except MemoryError:
            raise CheckpointError(f"{path}: not enough memory to read {what} "
                                  f"({info.st_size} bytes)") from None
    if len(data) > info.st_size:
        raise CheckpointError(f"{path}: changed while {what} was read from it; read it again "
                              "once nothing writes to it")
    return data


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
    if it is missing, not a regular file, too large, truncated, corrupted, not a torchdam
    checkpoint, holds a pickle that would run code, a zip record that would expand beyond
    the file, containers nested deeper than :data:`MAX_NESTING` or holding themselves, or a
    tensor claiming more elements than its storage holds."""
    path = Path(path)
    data = read_regular_file(path, "a checkpoint", MAX_CHECKPOINT_BYTES)
    newline = data.find(b"\n", 0, _HEADER_MAX)
    fields = data[:newline].split() if newline > 0 else []
    if len(fields) != 3 or fields[0] != MAGIC:
        raise CheckpointError(f"{path}: not a torchdam checkpoint (no {MAGIC.decode()} header); "
                              "refusing to unpickle it")
    if fields[1] != str(VERSION).encode():
        raise CheckpointError(f"{path}: checkpoint format version {fields[1].decode(errors='replace')} "
                              f"is not supported (this torchdam reads version {VERSION})")
    payload = memoryview(data)[newline + 1:]
    if hashlib.sha256(payload).hexdigest().encode() != fields[2]:
        raise CheckpointError(f"{path}: truncated or corrupted (checksum mismatch); "
                              f"resume from {PREV} in the same folder or start again")
    _check_archive(path, payload)
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: refused: the file holds objects other than tensors and "
                              f"plain containers, which could run code on load ({first})") from None
    except Exception as err:  # torch's zip reader raises RuntimeError for a damaged archive
        detail = " ".join(str(err).split())[:300]
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {detail})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: checkpoint does not hold a dict")
    _check_state(path, state)
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


def _check_archive(path: Path, payload: memoryview) -> None:
    """The payload must be a zip of stored (uncompressed) records whose sizes add up to no
    more than the payload: ``torch.save`` writes nothing else, and ``torch.load`` would
    inflate a compressed record to whatever size its header claims."""
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint (not a torch.save archive: {err})") from None
    compressed = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise CheckpointError(f"{path}: refused: record {compressed[0]!r} is compressed, which "
                              "torch.save never writes; its size could not be bounded before reading it")
    total = sum(r.file_size for r in records)
    if total > len(payload):
        raise CheckpointError(f"{path}: refused: its records claim {total} bytes, more than the "
                              f"{len(payload)}-byte file holds")


def _check_state(path: Path, state: dict) -> None:
    """Containers nest at most MAX_NESTING deep and hold no reference cycles (consumers
    recurse into them), and every tensor's elements lie within its storage (no view
    inflated by zero strides, which would allocate far beyond the file once copied)."""
    active: set[int] = set()  # containers on the current path
    done: set[int] = set()  # containers already checked (a shared one is checked once)

    def walk(value: Any, depth: int) -> None:
        if isinstance(value, torch.Tensor):
            needed = value.numel() * value.element_size()
            if needed > value.untyped_storage().nbytes():
                raise CheckpointError(f"{path}: refused: a {tuple(value.shape)} tensor claims {needed} bytes "
                                      f"over a storage of {value.untyped_storage().nbytes()} bytes")
            return
        if not isinstance(value, (dict, list, tuple, set, frozenset)) or id(value) in done:
            return
        if id(value) in active:
            raise CheckpointError(f"{path}: refused: a container holds itself (a reference cycle)")
        if depth >= MAX_NESTING:
            raise CheckpointError(f"{path}: refused: containers nested more than {MAX_NESTING} deep")
        active.add(id(value))
        for item in ([*value.keys(), *value.values()] if isinstance(value, dict) else value):
            walk(item, depth + 1)
        active.discard(id(value))
        done.add(id(value))

    walk(state, 0)


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
