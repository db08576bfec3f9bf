"""Count what actually runs: parameters, FLOPs (by the ops executed) and latency.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts the matmuls and
convolutions that really execute (2 FLOPs per multiply-add), so a gated model is counted
at full width (its gates skip nothing) and a compacted one at its real width.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from torchdam.compact import as_tuple, unwrap
from torchdam.gates import DAMGate


def count(model: nn.Module, example_inputs) -> dict[str, int]:
    """``{"params": int, "flops": int}`` for one forward of ``model`` on ``example_inputs``.

    Params exclude DAM gates' betas (one scalar per gated layer, training-only state).

    Example:
        >>> count(nn.Linear(10, 5), torch.randn(1, 10))
        {'params': 55, 'flops': 100}
    """
    model = unwrap(model)
    gate_params = {id(p) for m in model.modules() if isinstance(m, DAMGate) for p in m.parameters()}
    params = sum(p.numel() for p in model.parameters() if id(p) not in gate_params)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*as_tuple(example_inputs))
    finally:
        model.train(was_training)
    return {"params": int(params), "flops": int(counter.get_total_flops())}


def latency(model: nn.Module, example_inputs, repeats: int = 30, warmup: int = 5) -> float:
    """Median wall time of one eval-mode forward, in milliseconds."""
    inputs = as_tuple(example_inputs)
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                start = time.perf_counter()
                model(*inputs)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return 1000.0 * statistics.median(times)


def profile(model: nn.Module, sample: torch.Tensor, batch_sizes=(1, 64), repeats: int = 30) -> dict:
    """Params, FLOPs (per sample) and median latency at each batch size.

    ``sample`` is one input of batch size 1; it is repeated to make each batch.
    """
    stats = count(model, sample)
    for b in batch_sizes:
        stats[f"latency_ms_b{b}"] = latency(model, sample.expand(b, *sample.shape[1:]).contiguous(), repeats)
    return stats
