"""DDP: two CPU ranks (gloo) under torchrun train one model: betas identical on every rank,
only rank 0 writes, and a crashed DDP run resumes to the uninterrupted result."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from torchdam import distributed, load

WORKER = Path(__file__).with_name("train_worker.py")


def test_helpers_are_no_ops_without_torchrun():
    assert not distributed.is_distributed() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.is_main_process() and distributed.all_ok(True) and not distributed.all_ok(False)
    assert distributed.sampler([1, 2, 3], shuffle=True) is None
    assert str(distributed.init_from_env()) in ("cpu", "cuda")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_two_ranks_train_one_model_and_resume(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKER), str(tmp_path), "--ddp"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2
    ranks = result["per_rank"]
    assert ranks[0]["betas"] == ranks[1]["betas"]  # float.hex: the same bits (Trainer also checks each epoch)
    assert ranks[0]["saves"] > 0 and ranks[1]["saves"] == 0  # only rank 0 writes checkpoints
    # crash at step 10, resumed from 3 steps into epoch 2: every rank restores its own partial
    # epoch sums, so the logged train loss/accuracy equal the uninterrupted run's too
    assert result["resumed_from"] == {"epoch": 1, "step_in_epoch": 3} and result["tallies_seen"] == [48, 48]
    assert result["resumed"] == result["full"]
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "crashed" / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_prune_command_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node 2 torchdam prune ...`: both ranks train, rank 0 alone
    compacts, writes and prints; the shipped model is what a single report describes."""
    exe = Path(sys.executable).with_name("torchdam")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
         str(exe), "prune", "--limit", "1024", "--epochs", "2", "--beta-lr", "0.5", "--lam", "1.0",
         "--latency-repeats", "2", "--no-progress", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["world_size"] == 2
    assert report["test_acc_compacted"] == report["test_acc_gated"]
    assert 0 < report["units_kept"] < report["units_total"] == 400  # lambda 1, fast beta: units died
    assert proc.stdout.count("gated units") == 1, proc.stdout  # rank 0 alone prints the report
    small = load(tmp_path / "run" / "compacted")
    assert sum(p.numel() for p in small.parameters()) == report["after"]["params"]
