"""The main job: train a zoo model with DAM gates, compact it, and measure both.

This is what ``torchdam prune`` runs; the CLI only parses options and prints. Every
number in the returned report is measured here, on the model that actually runs.
"""
from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from torchdam import distributed, serialize
from torchdam.atomic import write_atomic
from torchdam.attach import attach, detach, warn_dead_layers, widths
from torchdam.budget import nothing_removed_message
from torchdam.compact import compact
from torchdam.count import count
from torchdam.data import DATASETS, load_dataset
from torchdam.errors import CheckpointError, ConfigError, TorchDAMError
from torchdam.models import MODELS, build_model
from torchdam.train import CHECKPOINT_DIR, TrainConfig, Trainer

LAYER_TYPES: dict[str, type] = {"linear": nn.Linear, "conv": nn.Conv2d}


@dataclass
class PruneJob:
    """What to prune and how; ``train`` holds every optimisation option."""

    model: str = "lenet300"
    data: str = "mnist"
    train: TrainConfig = field(default_factory=TrainConfig)
    gate: str = "relu_tanh"
    layers: tuple[str, ...] = ("linear", "conv")
    exclude: tuple[str, ...] = ()
    val_size: int = 5000
    limit: int | None = None
    min_width: int = 1
    latency_repeats: int = 30
    # "last": ship the final epoch. DAM narrows the model while it trains, so the best
    # validation accuracy tends to fall on an early, wider epoch; "best" ships that one.
    checkpoint: str = "last"
    out_dir: Path = Path("runs/prune")
    #: Continue the killed or interrupted run whose output folder is ``out_dir``.
    resume: bool = False

    def validate(self) -> None:
        """Fail on a bad name before any data is read or any epoch is spent."""
        MODELS.get(self.model)
        DATASETS.get(self.data)
        if self.checkpoint not in ("last", "best"):
            raise ConfigError(f"checkpoint must be 'last' or 'best', got {self.checkpoint!r}")
        unknown = [t for t in self.layers if t not in LAYER_TYPES and not any(c in t for c in ".*?[")]
        if unknown:
            raise ConfigError(f"unknown layer selector(s) {unknown}: use {', '.join(LAYER_TYPES)} or module-name globs")
        if self.resume and not (Path(self.out_dir) / CHECKPOINT_DIR).is_dir():
            raise CheckpointError(f"{Path(self.out_dir) / CHECKPOINT_DIR}: nothing to resume; "
                                  "pass the output folder of an earlier run")


def _check_writable(out: Path) -> None:
    """Fail before any epoch is spent if the results could not be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise ConfigError(f"output folder {out} is not writable ({err.strerror or err}); "
                          "choose another --out") from None


def _selectors(names: tuple[str, ...]) -> tuple:
    return tuple(LAYER_TYPES.get(n, n) for n in names)


def _interleaved(fns: dict, blocks: int, seconds: float) -> dict[str, list[float]]:
    """Seconds per call of each function in ``blocks`` blocks of about ``seconds`` each,
    the order alternating between blocks (as ``benchmarks/perf.py``), so that load on a
    shared machine hits both sides of every pair alike."""
    calls = {}
    for name, fn in fns.items():
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        calls[name] = max(1, round(seconds / max(time.perf_counter() - start, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for b in range(blocks):
        for name in names if b % 2 == 0 else names[::-1]:
            fn, n = fns[name], calls[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - start) / n)
    return times


def paired_latency(dense: nn.Module, small: nn.Module, sample: torch.Tensor, batch_sizes=(1, 64),
                   blocks: int = 30, seconds: float = 0.01) -> tuple[dict, dict, dict]:
    """Median ms per forward of ``dense`` and ``small`` at each batch size, timed in
    interleaved pairs of blocks, and the speed-up: the median of the per-pair ratios with
    their quartiles (the spread)."""
    before, after, speedup = {}, {}, {}
    dense.eval(), small.eval()
    for b in batch_sizes:
        x = sample.expand(b, *sample.shape[1:]).contiguous()
        with torch.inference_mode():
            times = _interleaved({"dense": lambda: dense(x), "small": lambda: small(x)}, blocks, seconds)
        ratios = sorted(d / s for d, s in zip(times["dense"], times["small"], strict=True))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        before[f"latency_ms_b{b}"] = 1000.0 * statistics.median(times["dense"])
        after[f"latency_ms_b{b}"] = 1000.0 * statistics.median(times["small"])
        speedup[f"b{b}"] = {"median": statistics.median(ratios), "p25": q[0], "p75": q[2], "pairs": len(ratios)}
    return before, after, speedup


def run(job: PruneJob) -> dict | None:
    """Train single-stage, compact, evaluate and measure; writes everything to ``out_dir``.

    Returns the report dict (also written as ``report.json``).
    Under torchrun every rank trains its shard (``batch_size`` is per rank) and only rank
    0 compacts, measures and writes; the other ranks return ``None``."""
    job.validate()
    out = Path(job.out_dir)
    if distributed.is_main_process():
        _check_writable(out)
    device = distributed.init_from_env()
    torch.manual_seed(job.train.seed)
    splits = load_dataset(job.data, val_size=job.val_size, seed=job.train.seed, limit=job.limit)
    channels, size = splits.input_shape[0], splits.input_shape[-1]
    model = build_model(job.model, in_channels=channels, num_classes=splits.num_classes, image_size=size)
    attach(model, layers=_selectors(job.layers), exclude=_selectors(job.exclude), gate=job.gate)
    shard = distributed.sampler(splits.train, shuffle=True, seed=job.train.seed)
    train = DataLoader(splits.train, batch_size=job.train.batch_size, sampler=shard, shuffle=shard is None)
    trainer = Trainer(model, job.train, out_dir=out, device=device)
    with warnings.catch_warnings():  # the job says it in the CLI's own words, as its last line
        warnings.filterwarnings("ignore", message="no unit was removed")
        trainer.fit(train, DataLoader(splits.val, batch_size=1000), resume=out if job.resume else None)
    main, world_size = distributed.is_main_process(), distributed.world_size()
    distributed.shutdown()  # compaction and measurement run on rank 0 alone
    if not main:
        return None
    if job.checkpoint == "best":
        trainer.restore_best()
    model.to("cpu")
    evaluator = Trainer(model, job.train)
    loader = lambda ds: DataLoader(ds, batch_size=1000)
    warn_dead_layers(model)

    test = loader(splits.test)
    sample = splits.test.tensors[0][:1]
    small = compact(model, splits.val.tensors[0][:8], min_width=job.min_width)
    gated_eval, small_eval = evaluator.evaluate(test), evaluator.evaluate(test, model=small)
    if gated_eval["acc"] != small_eval["acc"]:
        raise TorchDAMError(f"compacted accuracy {small_eval['acc']} differs from gated {gated_eval['acc']}")
    dense = detach(copy.deepcopy(model))  # the model without gates: what a user had before
    before, after = count(model, sample), count(small, sample)
    timed_before, timed_after, speedup = paired_latency(dense, small, sample, blocks=job.latency_repeats)
    before.update(timed_before)
    after.update(timed_after)
    layer_widths = widths(model)
    report = {
        "model": job.model,
        "data": job.data,
        "epochs": job.train.epochs,
        "checkpoint": job.checkpoint,
        "best_epoch": trainer.best_epoch,
        "best_val_acc": trainer.best_val_acc,
        "final_val_acc": trainer.records[-1].get("val_acc"),
        "test_acc_gated": gated_eval["acc"],
        "test_acc_compacted": small_eval["acc"],
        "widths": {k: list(v) for k, v in layer_widths.items()},
        "units_kept": sum(a for a, _ in layer_widths.values()),
        "units_total": sum(t for _, t in layer_widths.values()),
        "before": before,
        "after": after,
        "config": {**asdict(job.train), "gate": job.gate, "model": job.model, "data": job.data},
        "train_seconds": sum(r["seconds"] for r in trainer.records),
        "world_size": world_size,
        "speedup": speedup,
    }
    budget = trainer.budget
    if budget is not None:
        reached = after[budget.metric] / before[budget.metric]
        report["budget"] = budget.summary(reached)
        report["message"] = budget.message(reached)
    else:
        report["message"] = nothing_removed_message(model, cli=True)
    # the gated model that was compacted, so its predictions can be checked against the reload
    gated_state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    write_atomic(out / "gated.safetensors", lambda tmp: save_file(gated_state, str(tmp)), "the gated model")
    serialize.save(small, out / "compacted", metadata={
        "model": job.model, "data": job.data, "widths": report["widths"],
        "input_shape": list(sample.shape), "test_acc": small_eval["acc"]})
    write_atomic(out / "report.json", json.dumps(report, indent=1, default=str), "the report")
    from torchdam.cli import report as report_module  # matplotlib is only needed here

    report_module.plot_widths(layer_widths, out / "widths.png")
    report_module.plot_history(trainer.records, out / "history.png", budget=report.get("budget"))
    write_atomic(out / "report.md", report_module.format_report(report), "the report")
    return report
