"""What ``--round-to N`` does to a compacted model's real latency (issue "Say the size you
want", item 5), measured to choose the default.

    python -m benchmarks.round_to [--models resnet20 lenet5] [--targets 0.5 0.33] [--round-to 1 2 4 8 16]
                                  [--patterns 4] [--threads 1] [--quick] [--out DIR]

For each model and FLOPs target, ``--patterns`` width patterns are drawn (every gate's live
fraction uniform in [0.2, 1], seeded), and each is fitted to the target by
:meth:`torchdam.Budget.snap` once per ``round_to`` value (the snap a budget run ends with:
integer live counts, multiples of N, as close to the target as possible from below). The
gated model is compacted (:func:`torchdam.compact`) and its FLOPs counted. Every rounded
model is timed against the ``round_to=1`` model of the same pattern in interleaved pairs
(:func:`torchdam.count.paired_latency`: median of per-pair ratios, with quartiles), at batch
1 and 64, in eager PyTorch on CPU, so the row reads "how much faster (ratio > 1) or slower
the rounded widths run, at what FLOPs". No training is needed for timing: weights are the
initial ones, BatchNorm statistics random.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

import torchdam as dam
from torchdam.atomic import write_atomic
from torchdam.budget import TOLERANCE, Budget
from torchdam.count import paired_latency
from torchdam.models import build_model

#: model -> (constructor keywords, one input sample's shape)
MODELS: dict[str, tuple[dict, tuple[int, ...]]] = {
    "resnet20": ({"num_classes": 10}, (3, 32, 32)),
    "resnet56": ({"num_classes": 10}, (3, 32, 32)),
    "lenet5": ({"num_classes": 10, "in_channels": 1}, (1, 28, 28)),
    "vit-tiny": ({"num_classes": 10, "image_size": 32}, (3, 32, 32)),
}


def gated(name: str, seed: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """A freshly initialised gated model with random BatchNorm statistics, and a sample."""
    kwargs, shape = MODELS[name]
    torch.manual_seed(seed)
    model = build_model(name, **kwargs)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    dam.attach(model)
    return model.eval(), torch.randn(1, *shape)


def rounded(name: str, target: float, round_to: int, pattern: int) -> tuple[torch.nn.Module, dict]:
    """The model of ``pattern`` fitted to ``target`` with ``round_to``, compacted."""
    model, x = gated(name, seed=0)
    budget = Budget(flops=target, round_to=round_to).bind(model, x, total_steps=1)
    g = torch.Generator().manual_seed(pattern)
    n = torch.tensor([gate.n for _, gate in dam.named_gates(model)], dtype=torch.float64)
    live = budget.snap(start=n * (0.2 + 0.8 * torch.rand(len(n), generator=g, dtype=torch.float64)))
    small = dam.compact(model, x.expand(4, *x.shape[1:]))
    flops = dam.count(small, x)["flops"] / dam.count(build_model(name, **MODELS[name][0]), x)["flops"]
    multiples = sum(v % round_to == 0 for v in live.values())
    return small, {"live": live, "widths": {k: gate.n for k, gate in dam.named_gates(model)}, "reached_flops": flops, "multiples": multiples, "gates": len(live),
                   "unreachable": budget.unreachable}


def measure(models: list[str], targets: list[float], round_tos: list[int], patterns: int,
            batch_sizes: tuple[int, ...], blocks: int, seconds: float) -> list[dict]:
    rows = []
    jobs = [(m, t, p) for m in models for t in targets for p in range(patterns)]
    for name, target, pattern in tqdm(jobs, desc="round_to", disable=None):
        base, base_info = rounded(name, target, 1, pattern)
        x = torch.randn(1, *MODELS[name][1])
        for r in round_tos:
            if r == 1:
                continue
            small, info = rounded(name, target, r, pattern)
            _, _, speedup = paired_latency(base, small, x, batch_sizes=batch_sizes, blocks=blocks, seconds=seconds)
            rows.append({"model": name, "target": target, "pattern": pattern, "round_to": r,
                         "flops_round_to_1": base_info["reached_flops"], "flops": info["reached_flops"],
                         "multiples": f"{info['multiples']}/{info['gates']}", "unreachable": info["unreachable"],
                         "live": info["live"], "widths": info["widths"],
                         **{f"speedup_b{b}": speedup[f"b{b}"] for b in batch_sizes}})
    return rows


def summarize(rows: list[dict], batch_sizes: tuple[int, ...]) -> list[dict]:
    """Per model, target and round_to: how many patterns met the target within +-3% (and how
    many could not reach it), the median FLOPs reached, and the median over patterns of the
    speed-up against round_to=1 (with its min and max)."""
    out = []
    for key in dict.fromkeys((r["model"], r["target"], r["round_to"]) for r in rows):
        group = [r for r in rows if (r["model"], r["target"], r["round_to"]) == key]
        t = key[1]
        out.append({"model": key[0], "target": t, "round_to": key[2], "runs": len(group),
                    "unreachable": sum(r["unreachable"] for r in group),
                    "within": sum(t * (1 - TOLERANCE) <= r["flops"] <= t * (1 + TOLERANCE) for r in group),
                    "within_round_to_1": sum(t * (1 - TOLERANCE) <= r["flops_round_to_1"] <= t * (1 + TOLERANCE)
                                             for r in group),
                    "flops": statistics.median(r["flops"] for r in group),
                    "flops_round_to_1": statistics.median(r["flops_round_to_1"] for r in group),
                    **{f"b{b}": statistics.median(r[f"speedup_b{b}"]["median"] for r in group) for b in batch_sizes},
                    **{f"b{b}_min": min(r[f"speedup_b{b}"]["median"] for r in group) for b in batch_sizes},
                    **{f"b{b}_max": max(r[f"speedup_b{b}"]["median"] for r in group) for b in batch_sizes}})
    return out


def markdown(summary: list[dict], meta: dict) -> str:
    bs = meta["batch_sizes"]
    lines = [f"# round_to: latency of the rounded compacted model against round_to=1 ({meta['when']})", "",
             f"{meta['machine']}; torch {meta['torch']}, {meta['threads']} thread(s); {meta['patterns']} width "
             "pattern(s) per target. Speed-up = round_to=1 time / rounded time (> 1: the rounded model is "
             "faster), median over the patterns of each pair's median ratio (min..max over them). "
             "Within +-3%: patterns whose compacted FLOPs landed within 3% of the target (rounded / round_to=1).",
             "",
             "| model | target | round_to | within +-3% | unreachable | FLOPs (rounded) | FLOPs (round_to=1) | "
             + " | ".join(f"speed-up b{b}" for b in bs) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(bs)]
    for s in summary:
        cells = [f"{s[f'b{b}']:.3f} ({s[f'b{b}_min']:.2f}..{s[f'b{b}_max']:.2f})" for b in bs]
        lines.append(f"| {s['model']} | {100 * s['target']:.0f}% | {s['round_to']} | {s['within']}/{s['runs']} "
                     f"({s['within_round_to_1']}/{s['runs']}) | {s['unreachable']} | {100 * s['flops']:.1f}% | "
                     f"{100 * s['flops_round_to_1']:.1f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.round_to", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "lenet5"], choices=list(MODELS))
    parser.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.33])
    parser.add_argument("--round-to", nargs="+", type=int, default=[1, 2, 4, 8, 16], dest="round_tos")
    parser.add_argument("--patterns", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/round_to"))
    args = parser.parse_args(argv)
    if any(r < 1 for r in args.round_tos) or args.patterns < 1 or args.threads < 1:
        parser.error("--round-to values, --patterns and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    batch_sizes, blocks, seconds = ((1,), 4, 0.002) if args.quick else ((1, 64), 30, 0.02)
    if args.quick:
        args.models, args.targets, args.round_tos, args.patterns = ["lenet5"], [0.5], [1, 4], 1
    rows = measure(args.models, args.targets, args.round_tos, args.patterns, batch_sizes, blocks, seconds)
    meta = {"when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__, "threads": args.threads, "targets": args.targets,
            "patterns": args.patterns, "batch_sizes": list(batch_sizes), "quick": args.quick}
    summary = summarize(rows, batch_sizes)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "round_to.json", json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1),
                 "the round_to results")
    text = markdown(summary, meta)
    write_atomic(args.out / "round_to.md", text, "the round_to results")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
