"""Data-parallel DAM training on ``torch.distributed`` (DDP), set up from torchrun.

:class:`torchdam.Trainer` uses these helpers itself: when a process group with more than
one rank is up it wraps the model in ``DistributedDataParallel``, sums the epoch's loss and
accuracy over ranks, checks after every epoch that every rank holds the same betas (so
the same masks), and lets only rank 0 write checkpoints, logs and reports. A script only
has to start the group and shard its data:

    device = torchdam.distributed.init_from_env()        # gloo on CPU, nccl on GPU
    sampler = torchdam.distributed.sampler(train_set, shuffle=True, seed=0)
    loader = DataLoader(train_set, batch_size=64, sampler=sampler, shuffle=sampler is None)
    Trainer(model, config, out_dir="run", device=device).fit(loader)

and run as ``torchrun --nproc_per_node 2 script.py``. Without torchrun's environment every
helper is a no-op and training is single-process.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, DistributedSampler

from torchdam.errors import DistributedError

__all__ = ["all_ok", "barrier", "check_same", "gather_rows", "init_from_env", "is_distributed",
           "is_main_process", "rank", "sampler", "shutdown", "sum_across", "world_size", "wrap"]


def is_distributed() -> bool:
    """A process group with more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes files and prints."""
    return rank() == 0


def init_from_env(backend: str | None = None) -> torch.device:
    """Start the process group torchrun describes (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT`` in the environment) and return this rank's
    device: ``cuda:LOCAL_RANK`` with nccl when CUDA is there, else the CPU with gloo.
    Outside torchrun it starts nothing and returns the default device."""
    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return torch.device("cuda" if cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
        except (RuntimeError, ValueError) as err:
            raise DistributedError(f"cannot start the process group ({err}); launch with torchrun") from None
    return device


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DDP when distributed, else itself. DDP starts by broadcasting rank 0's
    weights and betas, so every rank begins from the same model."""
    if not is_distributed() or isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def sampler(dataset: Dataset, shuffle: bool, seed: int = 0) -> DistributedSampler | None:
    """This rank's shard of ``dataset`` (``None`` when not distributed). The Trainer calls
    ``set_epoch`` on it, so each epoch's order is a function of ``seed`` and the epoch,
    which is what makes resume exact."""
    if not is_distributed():
        return None
    return DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=False)


def sum_across(*values: Tensor) -> list[Tensor]:
    """Sum each tensor over ranks (one collective for all of them)."""
    if not is_distributed():
        return list(values)
    flat = torch.stack([v.detach().double().reshape(()) for v in values])
    dist.all_reduce(flat)
    return [flat[i].to(v.dtype) for i, v in enumerate(values)]


def gather_rows(row: Tensor) -> Tensor:
    """Every rank's ``row`` (same shape and dtype on each), stacked in rank order:
    ``(world_size, *row.shape)``, on every rank. Not distributed: ``row[None]``."""
    if not is_distributed():
        return row.unsqueeze(0)
    mine = row.detach().to(_device()).contiguous()
    gathered = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(gathered, mine)
    return torch.stack(gathered)


def all_ok(ok: bool) -> bool:
    """True on every rank iff ``ok`` is true on every rank (so all ranks raise together)."""
    if not is_distributed():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def check_same(tensors: dict[str, Tensor]) -> None:
    """Raise :class:`DistributedError` naming the first entry whose value differs between
    ranks (the betas, whose masks must agree for the ranks to train one model)."""
    if not is_distributed() or not tensors:
        return
    mine = torch.cat([t.detach().reshape(-1).double() for t in tensors.values()]).to(_device())
    gathered = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(gathered, mine)
    offsets, start = {}, 0
    for name, t in tensors.items():
        offsets[name] = slice(start, start + t.numel())
        start += t.numel()
    for other_rank, other in enumerate(gathered):
        if torch.equal(other, gathered[0]):
            continue
        name = next(n for n, s in offsets.items() if not torch.equal(other[s], gathered[0][s]))
        raise DistributedError(f"gate {name!r} differs between rank 0 and rank {other_rank}; "
                               "the ranks no longer train the same model")


def shutdown() -> None:
    """Wait for every rank, then close the process group (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
