"""Subprocess entry for tests/test_resume.py and tests/test_distributed.py: a tiny DAM run.

    python tests/train_worker.py OUT [--resume] [--pause-at K]     # one process
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train_worker.py OUT --ddp

Writes OUT/result.json (rank 0): final betas as float.hex (so equality is bit-equality),
widths, per-epoch records without timings, and a digest of every tensor of the model.
``--pause-at K`` prints PAUSED and sleeps at the K-th training step (before its backward),
so the parent can SIGKILL it there. ``--ddp`` trains a full run, a run that crashes on
every rank at step 10 (the last checkpoint, at step 9, is 3 steps into epoch 2: each rank
resumes its own partial epoch sums), and a resume of the crashed one, and also records per
rank the final betas and how many checkpoints that rank wrote.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchdam
import torchdam.train.loop as train_module
from torchdam import distributed
from torchdam.checkpoint import load_checkpoint

CONFIG = dict(epochs=3, batch_size=16, lr=0.05, lam=0.5, beta_lr=0.05, cold_start=1,
              checkpoint_every=3, progress=False)


class Crash(Exception):
    pass


def model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 32), nn.ReLU(),
                        nn.Linear(32, 2))
    torchdam.attach(net)
    return net


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(192, 20, generator=g)
    return TensorDataset(x, (x @ torch.randn(20, generator=g) > 0).long())


def loss_with(pause_at: int | None = None, crash_at: int | None = None):
    steps = [0]

    def loss_fn(out, y):
        if torch.is_grad_enabled():
            steps[0] += 1
            if steps[0] == pause_at:
                print("PAUSED", flush=True)
                time.sleep(600)
            if steps[0] == crash_at:
                raise Crash
        return F.cross_entropy(out, y)

    return loss_fn


def train(out: Path, device, resume: bool = False, **loss_kw):
    ds = data()
    shard = distributed.sampler(ds, shuffle=True, seed=0)
    loader = DataLoader(ds, batch_size=16, sampler=shard, shuffle=shard is None)
    net = model()
    trainer = torchdam.Trainer(net, torchdam.TrainConfig(**CONFIG), loss_fn=loss_with(**loss_kw),
                               out_dir=out, device=device)
    records = trainer.fit(loader, DataLoader(ds, batch_size=64), resume=out if resume else None)
    return net, records


def summary(net: nn.Module, records: list[dict]) -> dict:
    digest = hashlib.sha256()
    for key, t in sorted(net.state_dict().items()):
        digest.update(key.encode() + t.detach().cpu().contiguous().numpy().tobytes())
    return {"betas": {n: g.beta.item().hex() for n, g in torchdam.named_gates(net)},
            "widths": {n: list(w) for n, w in torchdam.widths(net).items()},
            "records": [{k: v for k, v in r.items() if k != "seconds"} for r in records],
            "state": digest.hexdigest()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--pause-at", type=int)
    parser.add_argument("--ddp", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if not args.ddp:
        net, records = train(args.out, "cpu", resume=args.resume, pause_at=args.pause_at)
        (args.out / "result.json").write_text(json.dumps(summary(net, records)))
        return

    device = distributed.init_from_env()
    saves = [0]
    real_save = train_module.save_checkpoint

    def counting_save(*a, **kw):
        saves[0] += 1
        return real_save(*a, **kw)

    train_module.save_checkpoint = counting_save
    full_net, full_records = train(args.out / "full", device)
    try:
        train(args.out / "crashed", device, crash_at=10)
        sys.exit("the crash did not happen")
    except Crash:
        pass
    crash_checkpoint = load_checkpoint(args.out / "crashed" / "checkpoints" / "ckpt-last.pt")
    resumed_net, resumed_records = train(args.out / "crashed", device, resume=True)
    per_rank = [None] * distributed.world_size()
    dist.all_gather_object(per_rank, {"rank": distributed.rank(), "saves": saves[0],
                                      "betas": summary(resumed_net, resumed_records)["betas"]})
    if distributed.is_main_process():
        (args.out / "result.json").write_text(json.dumps({
            "world_size": distributed.world_size(), "full": summary(full_net, full_records),
            "resumed": summary(resumed_net, resumed_records), "per_rank": per_rank,
            "resumed_from": {k: crash_checkpoint[k] for k in ("epoch", "step_in_epoch")},
            "tallies_seen": [t["seen"] for t in crash_checkpoint["tallies"]]}))
    distributed.shutdown()
    # Leave without interpreter finalization: Gloo's worker threads can still hold tensors then,
    # and destroying them as the interpreter tears down aborts the process now and then
    # ("terminate called without an active exception", SIGABRT; pytorch/pytorch#179291), after
    # everything this worker reports is written. Seen once in ~10 CI runs, 2026-11-30.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
