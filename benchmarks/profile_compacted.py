"""Where the time of a compacted CIFAR ResNet goes, next to its dense original (torch.profiler).

    python -m benchmarks.profile_compacted --model resnet20 --batch 64 --threads 1 --out DIR
    # writes DIR/profile_<model>_b<batch>[_keepmem].json and .md

Why does a compacted ResNet run only ~0.4 of its FLOPs ratio faster? For the dense model
and its compacted copy (``benchmarks/perf.py``'s ``pruned()``: ~60% of units dead) this

1. profiles ``--iters`` eval forwards of each model (``torch.profiler``, CPU activities;
   the models alternate inside one session) and groups self-CPU time into categories. Every
   profiled event is charged to the category of the top-level ATen op it runs under (a
   conv's ``aten::empty`` counts as convolution); the self time of the per-forward
   ``record_function`` (Python: ``nn.Module.__call__``, the forwards' own code) and
   top-level ops outside the table go to ``other/dispatch``. A category's time is its
   median over the forwards and the total is the sum of those, so the categories sum to it
   exactly. FLOPs per category come from the counter ``torchdam.count.count`` uses
   (``FlopCounterMode``: convolutions and matmuls);
2. lists every convolution call (shapes from forward hooks) with its channel counts, map
   size, FLOPs, profiled time (the conv op and its children) and achieved GFLOP/s;
3. times each model's forward without the profiler (``perf.interleaved``) for the real
   speedup, counts the minor page faults per forward and, independently of the models,
   times single 3x3 convs at dense and compacted channel counts (``--conv-batch``,
   default ``--batch``) to measure the GFLOP/s a narrow conv reaches.

``--wide-streams`` adds the same gates compacted with ``narrow_streams=False`` (residual
streams kept at full width, as before that option existed); ``--malloc-keep-memory`` stops
glibc from handing freed multi-MB blocks back to the OS (no page faults per large tensor);
``--onnx`` also times every model in ONNX Runtime. ``--record-shapes`` turns on the
profiler's shape recording, off by default: it made the 16-channel 32x32 convs 2-3x
slower in our runs (timings distorted; the shapes come from hooks anyway).

Shares (fractions of the total) are the robust numbers; absolute times include profiler
overhead (~1-2 us per op) and whatever else runs on the machine.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import datetime
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


#: category -> top-level ATen ops charged to it (everything else: other/dispatch).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "convolution": ("aten::conv2d", "aten::convolution", "aten::_convolution", "aten::mkldnn_convolution",
                    "aten::_slow_conv2d_forward", "aten::thnn_conv2d", "aten::_nnpack_spatial_convolution"),
    "batch_norm": ("aten::batch_norm", "aten::_batch_norm_impl_index", "aten::native_batch_norm",
                   "aten::_native_batch_norm_legit_no_training"),
    "relu/activation": ("aten::relu", "aten::relu_", "aten::clamp_min", "aten::clamp_min_"),
    "add (residual)": ("aten::add", "aten::add_"),
    "pad/index_copy/cat/zeros": ("aten::pad", "aten::constant_pad_nd", "aten::index_copy_", "aten::index_copy",
                                 "aten::new_zeros", "aten::zeros", "aten::cat", "aten::copy_", "aten::fill_",
                                 "aten::zero_", "aten::contiguous", "aten::clone"),
    "linear/pooling": ("aten::linear", "aten::addmm", "aten::mm", "aten::matmul", "aten::adaptive_avg_pool2d",
                       "aten::mean", "aten::avg_pool2d", "aten::flatten", "aten::view", "aten::reshape"),
}
OTHER = "other/dispatch"
ORDER = (*CATEGORIES, OTHER)
OP_CATEGORY = {op: cat for cat, ops in CATEGORIES.items() for op in ops}
#: FlopCounterMode op name -> category
FLOP_CATEGORY = {"convolution": "convolution", "_convolution": "convolution", "addmm": "linear/pooling",
                 "mm": "linear/pooling", "bmm": "linear/pooling"}


def load_perf():
    from benchmarks import perf

    return perf


def flops_by_category(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Per-forward FLOPs of ``model`` on ``x`` by category (the counter ``torchdam.count``
    uses; it counts convolutions and matmuls only)."""
    out = dict.fromkeys(ORDER, 0)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    for op, n in counter.get_flop_counts()["Global"].items():
        name = str(op).split(".")[1] if "." in str(op) else str(op)  # "aten.convolution" / ".default"
        out[FLOP_CATEGORY.get(name, OTHER)] += int(n)
    return out


def conv_calls(model: nn.Module, x: torch.Tensor) -> list[dict]:
    """Every Conv2d call of one forward, in execution order, with its shapes and FLOPs."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[dict] = []

    def hook(module: nn.Conv2d, args, output) -> None:
        inp = args[0]
        kh, kw = module.kernel_size
        flops = 2 * output.numel() * (module.in_channels // module.groups) * kh * kw
        calls.append({"layer": names[module], "in": module.in_channels, "out": module.out_channels,
                      "kernel": f"{kh}x{kw}", "stride": module.stride[0],
                      "in_hw": list(inp.shape[2:]), "out_hw": list(output.shape[2:]), "flops": int(flops)})

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def _marker(key: str) -> str:
    return f"## forward {key} ##"


def _top(event, markers: set[str]):
    """(marker event, top-level op) that ``event`` runs under; the op is None for a marker."""
    if event.name in markers:
        return event, None
    while event.cpu_parent is not None and event.cpu_parent.name not in markers:
        event = event.cpu_parent
    return event.cpu_parent, event


def profile_models(models: dict[str, nn.Module], x: torch.Tensor, iters: int, warmup: int,
                   record_shapes: bool = False) -> dict[str, dict]:
    """Profiled self-CPU time per category (us per forward) and the top-level conv events of
    each model. The models' forwards alternate inside one profiling session (A B B A ...),
    so profiler warm-up and load from other processes hit them alike. Each category's time
    is its median over the forwards (robust to a forward preempted by another process) and
    the total is the sum of those medians, so the categories sum to it exactly."""
    from torch.profiler import ProfilerActivity, profile, record_function

    keys = list(models)
    with torch.inference_mode():
        for _ in range(warmup):
            for m in models.values():
                m(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=record_shapes) as prof:
            for i in range(iters):
                for key in keys if i % 2 == 0 else keys[::-1]:
                    with record_function(_marker(key)):
                        models[key](x)
    markers = {_marker(k): k for k in keys}
    forwards: dict[int, dict] = {}  # id(marker event) -> per-forward tallies

    def tally(marker) -> dict:
        if id(marker) not in forwards:
            forwards[id(marker)] = {"key": markers[marker.name], "cat": dict.fromkeys(ORDER, 0.0), "python": 0.0,
                                    "wall": marker.cpu_time_total, "tops": [], "other": collections.Counter()}
        return forwards[id(marker)]

    for ev in prof.events():
        marker, top = _top(ev, set(markers))
        if marker is None:  # outside any forward (profiler bookkeeping)
            continue
        t = tally(marker)
        if top is None:
            t["python"] += ev.self_cpu_time_total
            t["cat"][OTHER] += ev.self_cpu_time_total
            continue
        if top is ev:
            t["tops"].append(ev)
        cat = OP_CATEGORY.get(top.name, OTHER)
        t["cat"][cat] += ev.self_cpu_time_total
        if cat == OTHER:
            t["other"][top.name] += ev.self_cpu_time_total
    out = {}
    for key in keys:
        runs = sorted((f for f in forwards.values() if f["key"] == key), key=lambda f: f["tops"][0].time_range.start)
        if len(runs) != iters:
            raise RuntimeError(f"found {len(runs)} profiled forwards of {key}, expected {iters}")
        cats = {c: statistics.median(f["cat"][c] for f in runs) for c in ORDER}
        other: collections.Counter = sum((f["other"] for f in runs), collections.Counter())
        out[key] = {
            "iters": iters,
            "total_us": sum(cats.values()),
            "categories_us": cats,
            "forward_median_us": statistics.median(f["wall"] for f in runs),
            "forward_mean_us": statistics.fmean(sum(f["cat"].values()) for f in runs),
            "python_us": statistics.median(f["python"] for f in runs),
            "other_ops_us": {k: round(v / iters, 2) for k, v in other.most_common(8)},
            "top_level_ops_per_forward": statistics.median(len(f["tops"]) for f in runs),
            "_conv_tops": [[ev for ev in f["tops"] if ev.name == "aten::conv2d"] for f in runs],
        }
    return out


def attach_conv_times(calls: list[dict], conv_tops: list[list], iters: int) -> list[dict]:
    """Adds each conv call's median profiled time (the conv op with its children) and GFLOP/s."""
    if any(len(tops) != len(calls) for tops in conv_tops):
        raise RuntimeError(f"profiled convs per forward {[len(t) for t in conv_tops]} != {len(calls)} conv calls")
    for k, call in enumerate(calls):
        call["us"] = statistics.median(tops[k].cpu_time_total for tops in conv_tops)
        call["gflops"] = call["flops"] / (call["us"] * 1e3) if call["us"] > 0 else float("nan")
    return calls


def conv_microbench(batch: int, blocks: int, seconds: float, interleaved) -> list[dict]:
    """Achieved GFLOP/s of one 3x3 conv (stride 1, padding 1, no bias) per (in, out, map size):
    the dense ResNet-20 widths against typical compacted ones."""
    shapes = [(16, 16, 32), (16, 6, 32), (6, 6, 32), (7, 7, 32), (4, 4, 32),
              (32, 32, 16), (32, 14, 16), (14, 14, 16), (15, 15, 16),
              (64, 64, 8), (64, 27, 8), (27, 27, 8), (31, 31, 8)]
    gen = torch.Generator().manual_seed(0)
    fns, meta = {}, {}
    for cin, cout, hw in shapes:
        conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False).eval()
        x = torch.randn(batch, cin, hw, hw, generator=gen)
        key = f"{cin}->{cout}@{hw}"
        fns[key] = lambda conv=conv, x=x: conv(x)
        meta[key] = {"in": cin, "out": cout, "hw": hw, "flops": 2 * batch * cout * hw * hw * cin * 9}
    with torch.inference_mode():
        times = interleaved(fns, blocks, seconds)
    rows = []
    for key, m in meta.items():
        t = statistics.median(times[key])
        rows.append({**m, "batch": batch, "us": t * 1e6, "gflops": m["flops"] / t / 1e9})
    return rows


def onnx_times(perf, models: dict[str, nn.Module], x: torch.Tensor, args: argparse.Namespace) -> dict[str, dict]:
    """Each model exported to ONNX and run by ONNX Runtime (``--threads`` threads), timed
    interleaved: median ms and speedup over the dense export."""
    import contextlib
    import io
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        sample = x[:1].expand(2, *x.shape[1:])
        onnx = {k: perf.OnnxModel(m, sample, Path(tmp) / f"{k}.onnx", threads=args.threads) for k, m in models.items()}
        times = perf.interleaved({k: (lambda m=m: m(x)) for k, m in onnx.items()}, args.blocks, args.seconds)
    return {k: {"ms": 1000 * statistics.median(times[k]), "speedup": perf.ratio(times, "dense", k)} for k in onnx}


def faults_per_forward(model: nn.Module, x: torch.Tensor, n: int = 5) -> dict[str, float]:
    """Minor page faults and kernel (sys) CPU ms per forward: fresh pages the allocator maps
    for each large tensor (glibc returns freed multi-MB blocks to the OS)."""
    with torch.inference_mode():
        model(x)
        before = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(n):
            model(x)
        after = resource.getrusage(resource.RUSAGE_SELF)
    return {"minor_faults": (after.ru_minflt - before.ru_minflt) / n,
            "sys_ms": 1000 * (after.ru_stime - before.ru_stime) / n}


def malloc_keep_memory() -> bool:
    """glibc only: stop malloc from returning freed memory to the OS (trim) and from serving
    blocks up to 32 MiB with fresh mmaps, as ``MALLOC_TRIM_THRESHOLD_``/``MALLOC_MMAP_THRESHOLD_``
    would. True if both settings took."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    malloc = malloc_keep_memory() if args.malloc_keep_memory else False
    perf = load_perf()
    dense, small, widths = perf.pruned(args.model)
    models = {"dense": dense, "compacted": small}
    if args.wide_streams:  # the same gates compacted as before stream narrowing
        models["compacted_wide"] = perf.pruned(args.model, narrow_streams=False)[1]
    shape = perf.SHAPES[args.model]
    x = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(1))
    live = sum(a for a, _ in widths.values())
    units = sum(t for _, t in widths.values())
    results: dict = {
        "command": " ".join(["python", "-m", "benchmarks.profile_compacted", *args.argv]),
        "model": args.model, "batch": args.batch, "threads": torch.get_num_threads(), "iters": args.iters,
        "machine": f"{perf.cpu_name()} ({platform.machine()})", "torch": torch.__version__,
        "date": datetime.date.today().isoformat(), "units_dead": round(1 - live / units, 3),
        "loadavg": list(_loadavg()), "malloc_keep_memory": malloc, "record_shapes": args.record_shapes,
        "models": {},
    }
    start = time.perf_counter()
    profiles = profile_models(models, x, args.iters, args.warmup, args.record_shapes)
    for key, model in models.items():
        flops = flops_by_category(model, x)
        prof = profiles[key]
        calls = attach_conv_times(conv_calls(model, x), prof.pop("_conv_tops"), args.iters)
        total = prof["total_us"]
        results["models"][key] = {
            **prof,
            "shares": {k: v / total for k, v in prof["categories_us"].items()},
            "flops": flops, "flops_total": sum(flops.values()), "convs": calls,
            "per_forward": faults_per_forward(model, x),
        }
    with torch.inference_mode():
        times = perf.interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, args.blocks, args.seconds)
    d = results["models"]["dense"]
    for key, m in results["models"].items():
        m["wall_ms"] = 1000 * statistics.median(times[key])
        m["flops_ratio"] = d["flops_total"] / m["flops_total"]
        m["speedup"] = perf.ratio(times, "dense", key)
        m["efficiency"] = m["speedup"] / m["flops_ratio"]
        m["profiled_speedup"] = d["total_us"] / m["total_us"]
        m["category_speedup"] = {
            k: (d["categories_us"][k] / m["categories_us"][k]) if min(d["categories_us"][k], m["categories_us"][k]) > 0
            else None for k in ORDER}
    if args.wide_streams:
        results["narrow_vs_wide_speedup"] = perf.ratio(times, "compacted_wide", "compacted")
    if args.onnx:
        results["onnxruntime"] = onnx_times(perf, models, x, args)
    conv_batch = args.batch if args.conv_batch is None else args.conv_batch
    results["conv_microbench"] = (conv_microbench(conv_batch, args.blocks, args.seconds / 4, perf.interleaved)
                                  if conv_batch > 0 else [])
    results["seconds"] = round(time.perf_counter() - start, 1)
    return results


def _loadavg() -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ()


def markdown(r: dict) -> str:
    ms = r["models"]
    keys = list(ms)
    lines = [f"# Profile: {r['model']} dense vs compacted, batch {r['batch']}", "",
             f"Command: `{r['command']}`  ",
             f"Machine: {r['machine']}, torch {r['torch']}, {r['threads']} thread(s); {r['date']}; "
             f"load average at start {', '.join(f'{v:.2f}' for v in r['loadavg'])}; allocator "
             f"{'told to keep freed memory (--malloc-keep-memory)' if r['malloc_keep_memory'] else 'default'}; "
             f"record_shapes {r['record_shapes']}; units dead {r['units_dead']:.0%}", "",
             "## Wall time (no profiler, interleaved, median) and FLOPs", "",
             "| model | ms | speedup | FLOPs ratio | efficiency | profiled speedup | top-level ops | "
             "minor page faults | sys ms |", "|---|---|---|---|---|---|---|---|---|"]
    for k in keys:
        m = ms[k]
        lines.append(f"| {k} | {m['wall_ms']:.3f} | {m['speedup']:.2f}x | {m['flops_ratio']:.2f}x | "
                     f"{m['efficiency']:.2f} | {m['profiled_speedup']:.2f}x | {m['top_level_ops_per_forward']:.0f} | "
                     f"{m['per_forward']['minor_faults']:.0f} | {m['per_forward']['sys_ms']:.1f} |")
    if "onnxruntime" in r:
        lines += ["", "ONNX Runtime (interleaved, median ms / speedup over dense / efficiency): " + ", ".join(
            f"{k} {v['ms']:.3f} / {v['speedup']:.2f}x / {v['speedup'] / ms[k]['flops_ratio']:.2f}"
            for k, v in r["onnxruntime"].items()) + "."]
    if "narrow_vs_wide_speedup" in r:
        lines += ["", f"compacted (narrowed streams) vs compacted_wide (full-width streams): "
                  f"{r['narrow_vs_wide_speedup']:.2f}x faster (median of interleaved blocks)."]
    lines += ["", "## Self-CPU time by category (us per forward, profiled; share of the model's total; "
              "speedup over dense)", "",
              "| category | " + " | ".join(f"{k} us | {k} share" + (" | speedup" if k != "dense" else "") for k in keys)
              + " | " + " | ".join(f"{k} MFLOP" for k in keys) + " |",
              "|---" * (1 + 3 * len(keys) - 1 + len(keys)) + "|"]
    for c in (*ORDER, "total"):
        cells = []
        for k in keys:
            m = ms[k]
            us = m["total_us"] if c == "total" else m["categories_us"][c]
            share = 1.0 if c == "total" else m["shares"][c]
            cells += [f"{us:.1f}", f"{share:.1%}"]
            if k != "dense":
                sp = m["profiled_speedup"] if c == "total" else m["category_speedup"][c]
                cells.append("-" if sp is None else f"{sp:.2f}x")
        cells += [f"{(m['flops_total'] if c == 'total' else m['flops'][c]) / 1e6:.3f}" for m in ms.values()]
        name = "**total**" if c == "total" else c
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Python (module calls, forward code; part of other/dispatch), us per forward: "
              + ", ".join(f"{k} {m['python_us']:.1f}" for k, m in ms.items()) + ".", "",
              "## Convolutions (profiled: conv op incl. children, median over forwards)", "",
              "| layer | map | " + " | ".join(f"{k} in->out | {k} MFLOP | {k} us | {k} GFLOP/s" for k in keys) + " |",
              "|---|---|" + "---|" * (4 * len(keys))]
    for calls in zip(*(ms[k]["convs"] for k in keys), strict=True):
        a = calls[0]
        cells = [f"{c['in']}->{c['out']} | {c['flops'] / 1e6:.2f} | {c['us']:.1f} | {c['gflops']:.2f}" for c in calls]
        lines.append(f"| {a['layer']} | {a['in_hw'][0]}->{a['out_hw'][0]} | " + " | ".join(cells) + " |")
    cells = []
    for k in keys:
        convs = ms[k]["convs"]
        flops, us = sum(c["flops"] for c in convs), sum(c["us"] for c in convs)
        cells.append(f" | {flops / 1e6:.2f} | {us:.1f} | {flops / us / 1e3:.2f}")
    lines.append("| **all convs** | |" + " |".join(cells) + " |")
    if r["conv_microbench"]:
        lines += ["", f"## Single 3x3 conv, batch {r['conv_microbench'][0]['batch']} (no profiler, interleaved)", "",
                  "| in->out | map | MFLOP | us | GFLOP/s |", "|---|---|---|---|---|"]
        for m in r["conv_microbench"]:
            lines.append(f"| {m['in']}->{m['out']} | {m['hw']}x{m['hw']} | {m['flops'] / 1e6:.1f} | "
                         f"{m['us']:.1f} | {m['gflops']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("resnet20", "resnet56"), default="resnet20")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=20, help="profiled forwards per model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=7, help="interleaved timing blocks")
    parser.add_argument("--seconds", type=float, default=0.2, help="seconds per timing block")
    parser.add_argument("--conv-batch", type=int, default=None,
                        help="batch of the single-conv benchmark (default: --batch); 0 skips it")
    parser.add_argument("--record-shapes", action="store_true",
                        help="profile with record_shapes=True (shapes come from hooks anyway; it slows some convs)")
    parser.add_argument("--onnx", action="store_true", help="also time each model in ONNX Runtime")
    parser.add_argument("--malloc-keep-memory", action="store_true",
                        help="glibc: keep freed memory instead of returning it to the OS (no page faults per tensor)")
    parser.add_argument("--wide-streams", action="store_true",
                        help="also profile the model compacted with narrow_streams=False (before/after)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args(argv)
    args.argv = argv
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"profile_{args.model}_b{args.batch}{'_keepmem' if args.malloc_keep_memory else ''}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    text = markdown(results)
    stem.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
