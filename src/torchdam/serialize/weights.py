"""Reading model.safetensors: its header checked entry by entry before any tensor is made."""
from __future__ import annotations

import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load

from torchdam.checkpoint import read_regular_file
from torchdam.errors import CheckpointError
from torchdam.serialize import limits
from torchdam.serialize.limits import _INT64, _MAX_DIMS
from torchdam.serialize.text import _one_line, _unique_keys

_SAFETENSORS_HEADER_MAX = 100_000_000
try:
    from safetensors.torch import _TYPES as _SAFETENSORS_DTYPES
except ImportError:  # pragma: no cover - older safetensors
    _SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class _Entry:
    """One tensor of a safetensors header, with its data's place in the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    numel: int


def _read_weights(file: Path) -> tuple[bytes, dict[str, _Entry]]:
    """The weights file's bytes and its header, checked entry by entry (dtype, shape, data
    offsets that tile the data exactly), before any tensor is made from it."""
    data = read_regular_file(file, "the model's weights (torchdam.serialize.limits.MAX_WEIGHTS_BYTES)",
                             limits.MAX_WEIGHTS_BYTES,
                             missing=f"{file}: missing; the directory holds no saved weights")

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{file}: not a readable safetensors file ({why}); "
                               "it may be truncated or not written by torchdam.save")

    if len(data) < 8:
        raise bad("shorter than the 8-byte header length")
    size = int.from_bytes(data[:8], "little")
    if size > min(_SAFETENSORS_HEADER_MAX, len(data) - 8):
        raise bad(f"a header of {size} bytes does not fit")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"), object_pairs_hook=_unique_keys)
    except (RecursionError, UnicodeDecodeError, ValueError) as err:
        raise bad(f"header: {_one_line(err)}") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    room, base = len(data) - 8 - size, 8 + size
    entries: dict[str, _Entry] = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise bad("__metadata__ is not a dict of strings")
            continue
        if not (isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"}):
            raise bad(f"entry {name[:80]!r} is malformed")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        dtype = _SAFETENSORS_DTYPES.get(dtype) if isinstance(dtype, str) else None
        if dtype is None or not (isinstance(shape, list) and len(shape) <= _MAX_DIMS
                                 and all(type(d) is int and 0 <= d < _INT64 for d in shape)):
            raise bad(f"entry {name[:80]!r} has an unknown dtype or an invalid shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= room):
            raise bad(f"entry {name[:80]!r} has data offsets outside the file")
        numel = math.prod(shape)
        if offsets[1] - offsets[0] != numel * dtype.itemsize:
            raise bad(f"entry {name[:80]!r} holds {offsets[1] - offsets[0]} bytes, not the "
                      f"{numel * dtype.itemsize} its shape and dtype need")
        entries[name] = _Entry(dtype, tuple(shape), base + offsets[0], numel)
        spans.append(tuple(offsets))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise bad("tensor data overlaps or leaves gaps")
        position = end
    if position != room:
        raise bad("bytes follow the last tensor")
    return data, entries


def _tensors(data: bytes, entries: dict[str, _Entry]) -> dict[str, torch.Tensor]:
    """Read-only views of the checked entries' data (load only copies from them)."""
    if sys.byteorder != "little":  # pragma: no cover - safetensors stores little-endian
        return safetensors_load(data)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given buffer is not writable"
        for name, e in entries.items():
            t = (torch.frombuffer(data, dtype=e.dtype, count=e.numel, offset=e.start) if e.numel
                 else torch.empty(0, dtype=e.dtype))
            out[name] = t.reshape(e.shape)
    return out
