"""What a training checkpoint must hold, and how a resume is checked against it.

:class:`torchdam.train.Trainer` writes one dict per checkpoint (see ``Trainer._save_state``);
:func:`check_state` refuses any other shape, so a forged or foreign checkpoint with a valid
header and checksum is a :class:`CheckpointError` naming the file and the fault rather
than a traceback, and :func:`differences` lists how a resume's identity differs from the
checkpoint's.
"""
from __future__ import annotations

from pathlib import Path

from torch import Tensor

from torchdam.errors import CheckpointError

STATE_FORMAT = "torchdam-train"


def is_plain(value: object) -> bool:
    """Only values a checkpoint can hold and ``weights_only`` loading reads back."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


def differences(saved: dict, current: dict, prefix: str = "", limit: int = 6) -> list[str]:
    """``"key: old -> new"`` for the entries that differ, plain values before nested dicts
    (compared key by key), at most ``limit`` of them."""
    def show(v: object) -> str:
        if isinstance(v, dict):
            return "{...}"
        if isinstance(v, str) and len(v) == 64:  # a sha256
            return repr(v[:12] + "...")
        return repr(v)

    plain, nested = [], []
    for key in sorted(set(saved) | set(current), key=str):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            nested += differences(a, b, f"{prefix}{key}.", limit)
        elif a != b:
            plain.append(f"{prefix}{key}: {show(a)} -> {show(b)}")
    return (plain + nested)[:limit]


_NUMBER = (int, float)
#: checkpoint key -> what it must hold (``None`` allowed where listed); see :func:`check_state`
_SCHEMA: dict[str, tuple] = {
    "format": (str,), "config": (dict,), "identity": (dict,), "epoch": (int,), "step_in_epoch": (int,),
    "global_step": (int,), "model": (dict,), "optimizer": (dict,), "scheduler": (dict,), "rng": (dict,),
    "epoch_rng": (dict, type(None)), "tally": (dict, type(None)), "tallies": (list, type(None)),
    "best": (dict,), "records": (list,),
}


def check_state(state: dict, path: Path) -> None:
    """:class:`CheckpointError` naming ``path`` and the fault unless ``state`` has the
    shape ``Trainer._save_state`` writes: a checkpoint with a valid header and checksum
    can still be forged or written by another program."""
    def bad(reason: str) -> CheckpointError:
        return CheckpointError(f"{path}: malformed training checkpoint: {reason}; resume from another "
                               "checkpoint or start again")

    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a torchdam training checkpoint")
    if "identity" not in state:
        raise CheckpointError(f"{path}: written by an older torchdam that did not record the run's identity "
                              "(data, gates), so resuming it cannot be checked; start the run again")
    for key, kinds in _SCHEMA.items():
        if key not in state:
            raise bad(f"{key!r} is missing")
        value = state[key]
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise bad(f"{key!r} is a {type(value).__name__}, expected {' or '.join(k.__name__ for k in kinds)}")
    if min(state["epoch"], state["step_in_epoch"], state["global_step"]) < 0:
        raise bad("a negative epoch or step")
    if state["step_in_epoch"] > state["global_step"]:
        raise bad("more steps in the epoch than in the run")
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state["model"].items()):
        raise bad("'model' is not a state dict of tensors")
    if not all(isinstance(r, dict) for r in state["records"]) or len(state["records"]) != state["epoch"]:
        raise bad(f"'records' must hold one dict per finished epoch ({state['epoch']})")
    best = state["best"]
    if set(best) != {"acc", "loss", "epoch"} or not all(
            best[k] is None or isinstance(best[k], _NUMBER) and not isinstance(best[k], bool) for k in best):
        raise bad("'best' must hold acc, loss and epoch (numbers or None)")
    rng = state["rng"]
    if not isinstance(rng.get("torch"), Tensor) or not isinstance(rng.get("numpy"), dict) or "python" not in rng:
        raise bad("'rng' lacks the torch, numpy or python RNG state")
    tallies = state["tallies"] if state["tallies"] is not None else [state["tally"]]
    for tally in tallies:
        if tally is None:
            continue
        if not (isinstance(tally, dict) and isinstance(tally.get("loss"), Tensor)
                and isinstance(tally.get("correct"), Tensor) and isinstance(tally.get("seen"), int)
                and isinstance(tally.get("classifies"), bool)):
            raise bad("an epoch tally lacks loss, correct, seen or classifies")
    if state["step_in_epoch"] > 0 and (state["epoch_rng"] is None or state["tally"] is None):
        raise bad("a mid-epoch checkpoint without its epoch's RNG state or running sums")
    if state["tallies"] is not None and len(state["tallies"]) != state["identity"].get("world_size"):
        raise bad("one epoch tally per process expected")
