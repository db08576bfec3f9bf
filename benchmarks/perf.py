"""Performance of torchdam itself, as ratios measured side by side in one run (issue 5, item 3).

    python -m benchmarks.perf [--quick] [--out DIR]      # writes DIR/perf.json and DIR/perf.md

1. **Gate overhead**: train-step time (forward, backward, SGD step; batch 128) of a model
   with DAM gates on every Linear/Conv2d over the same model without them.
2. **Compacted speed vs FLOPs**: a model gated so that 50-70% of each layer's units are dead
   (betas set, random BatchNorm statistics; no training is needed for timing), compacted;
   its speedup over the dense, gate-free model in eager PyTorch (batch 1 and 64) and in
   ONNX Runtime after ``torch.onnx.export``, divided by its FLOPs reduction. ONNX outputs
   are checked against PyTorch's (``max|diff| <= 1e-4 * max(1, max|output|)``).
3. **torch.compile**: a gated model trains compiled (losses match eager) and a compacted
   model runs compiled (outputs match eager).

Every A/B pair is timed interleaved (blocks alternate A, B, B, A, ...) and reported as the
median of per-block ratios, so load from other processes hits both sides alike.
``--quick`` (LeNet-300-100 only, ``aot_eager`` instead of inductor) is the smoke test.
Exits with status 1 if a correctness check fails.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import torchdam as dam
from torchdam.atomic import write_atomic
from torchdam.count import OnnxModel, count, interleaved
from torchdam.models import build_model

SHAPES = {"resnet20": (3, 32, 32), "resnet56": (3, 32, 32), "lenet300": (1, 28, 28), "lenet5": (1, 28, 28)}
LAYERS = (nn.Linear, nn.Conv2d)
ONNX_RTOL = 1e-4
TARGET_OVERHEAD = 1.03
TARGET_EFFICIENCY = 0.85


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over blocks of ``num / den`` (paired blocks ran next to each other)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def ms(times: list[float]) -> float:
    return round(1000.0 * statistics.median(times), 4)


def randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    """BatchNorm statistics and affine as after training, without training."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0.0, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            m.weight.data.uniform_(0.5, 1.0, generator=gen)
            m.bias.data.normal_(0.0, 0.1, generator=gen)


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 0.01) -> Callable[[], torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def gate_overhead(name: str, blocks: int, seconds: float, batch: int = 128, backend: str | None = None) -> dict:
    """Train-step time with gates / without; ``backend``: both models under
    ``torch.compile(backend=..., fullgraph=True)`` instead of eager."""
    torch.manual_seed(0)
    plain = build_model(name)
    gated = copy.deepcopy(plain)
    dam.attach(gated, layers=LAYERS)
    if backend is not None:
        torch._dynamo.reset()
        plain, gated = (torch.compile(m, backend=backend, fullgraph=True) for m in (plain, gated))
    x, y = torch.randn(batch, *SHAPES[name]), torch.randint(0, 10, (batch,))
    times = interleaved({"plain": train_step(plain, x, y), "gated": train_step(gated, x, y)}, blocks, seconds)
    r = ratio(times, "gated", "plain")
    return {"model": name, "batch": batch, "mode": "eager" if backend is None else f"compiled ({backend})",
            "plain_ms": ms(times["plain"]), "gated_ms": ms(times["gated"]),
            "ratio": round(r, 4), "meets_target": r <= TARGET_OVERHEAD}


def pruned(name: str, seed: int = 0, **compact_kwargs) -> tuple[nn.Module, nn.Module, dict]:
    """(dense gate-free model, its compacted copy, widths) with 50-70% of units dead;
    ``compact_kwargs`` go to :func:`torchdam.compact`."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dense = build_model(name)
    randomise_bn(dense, gen)
    gated = copy.deepcopy(dense)
    with torch.no_grad():
        for gate in dam.attach(gated, layers=LAYERS).values():
            dead = 0.5 + 0.2 * torch.rand((), generator=gen).item()
            gate.beta.fill_(-gate.k * dead)
    example = torch.randn(2, *SHAPES[name], generator=gen)
    small = dam.compact(gated, example, **compact_kwargs)
    return dense.eval(), small.eval(), dam.widths(gated)


def onnx_check(model: OnnxModel, reference: nn.Module, x: torch.Tensor) -> dict:
    with torch.no_grad():
        ref = reference(x)
    diff = float((model(x) - ref).abs().max())
    tol = ONNX_RTOL * max(1.0, float(ref.abs().max()))
    return {"max_abs_diff": diff, "tolerance": tol, "equal": diff <= tol}


def compacted_speed(name: str, blocks: int, seconds: float, batches: tuple[int, ...], workdir: Path) -> dict:
    dense, small, widths = pruned(name)
    sample = torch.randn(1, *SHAPES[name])
    before, after = count(dense, sample), count(small, sample)
    flops_ratio = before["flops"] / after["flops"]
    live = sum(a for a, _ in widths.values())
    total = sum(t for _, t in widths.values())
    result = {"model": name, "units_dead": round(1 - live / total, 3), "params": [before["params"], after["params"]],
              "flops": [before["flops"], after["flops"]], "flops_ratio": round(flops_ratio, 3), "runs": []}
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter reports progress on stdout
        onnx = {"dense": OnnxModel(dense, sample.expand(2, *sample.shape[1:]), workdir / f"{name}_dense.onnx"),
                "small": OnnxModel(small, sample.expand(2, *sample.shape[1:]), workdir / f"{name}_small.onnx")}
    result["onnx_check"] = {k: onnx_check(onnx[k], m, torch.randn(5, *SHAPES[name]))
                            for k, m in (("dense", dense), ("small", small))}
    for batch in batches:
        x = torch.randn(batch, *SHAPES[name])
        for runtime, pair in (("eager", {"dense": dense, "small": small}), ("onnxruntime", onnx)):
            with torch.inference_mode():
                times = interleaved({k: (lambda m=m: m(x)) for k, m in pair.items()}, blocks, seconds)
            speedup = ratio(times, "dense", "small")
            result["runs"].append({
                "runtime": runtime, "batch": batch, "dense_ms": ms(times["dense"]), "small_ms": ms(times["small"]),
                "speedup": round(speedup, 3), "efficiency": round(speedup / flops_ratio, 3),
                "meets_target": speedup >= TARGET_EFFICIENCY * flops_ratio})
    return result


def compile_checks(backend: str, train_model: str, infer_models: tuple[str, ...], steps: int = 5) -> dict:
    """Compiled vs eager: losses of a gated model over ``steps`` SGD steps from the same
    initial state, and outputs of compacted models."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_model(train_model)
    dam.attach(eager, layers=LAYERS)
    for gate in dam.named_gates(eager):
        gate[1].beta.data.fill_(-1.0)
    compiled_model = copy.deepcopy(eager)
    x, y = torch.randn(128, *SHAPES[train_model]), torch.randint(0, 10, (128,))
    eager_step = train_step(eager, x, y, lr=0.05)
    eager_losses = [float(eager_step()) for _ in range(steps)]
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)
    compiled_step = train_step(compiled, x, y, lr=0.05)
    start = time.perf_counter()
    first = float(compiled_step())
    compile_s = time.perf_counter() - start
    compiled_losses = [first] + [float(compiled_step()) for _ in range(steps - 1)]
    diff = max(abs(a - b) for a, b in zip(eager_losses, compiled_losses))
    train = {"model": train_model, "backend": backend, "steps": steps, "eager_losses": eager_losses,
             "compiled_losses": compiled_losses, "max_loss_diff": diff, "first_step_s": round(compile_s, 2),
             "loss_decreased": compiled_losses[-1] < compiled_losses[0],
             "equal": diff <= 1e-4 * max(1.0, abs(eager_losses[0]))}
    infer = []
    for name in infer_models:
        _, small, _ = pruned(name)
        x = torch.randn(8, *SHAPES[name])
        start = time.perf_counter()
        with torch.no_grad():
            out = torch.compile(small, backend=backend, fullgraph=True)(x)
            ref = small(x)
        diff = float((out - ref).abs().max())
        infer.append({"model": name, "backend": backend, "first_call_s": round(time.perf_counter() - start, 2),
                      "max_abs_diff": diff, "equal": diff <= 1e-4 * max(1.0, float(ref.abs().max()))})
    return {"train_gated": train, "compacted": infer}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def markdown(results: dict) -> str:
    lines = [f"# torchdam performance ({results['mode']})", "", f"Command: `{results['command']}`  ",
             f"Machine: {results['machine']}; torch {results['torch']}, onnxruntime {results['onnxruntime']}, "
             f"{results['threads']} threads; {results['date']}", "",
             f"## Gate overhead: train step with gates / without (target <= {TARGET_OVERHEAD})", "",
             "| model | batch | mode | plain ms | gated ms | ratio |", "|---|---|---|---|---|---|"]
    for r in results["gate_overhead"]:
        lines.append(f"| {r['model']} | {r['batch']} | {r['mode']} | {r['plain_ms']:.3f} | {r['gated_ms']:.3f} | "
                     f"{r['ratio']:.3f} |")
    lines += ["", f"## Compacted model: speedup / FLOPs ratio (target >= {TARGET_EFFICIENCY})", "",
              "| model | units dead | FLOPs ratio | runtime | batch | dense ms | compacted ms | speedup | efficiency |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in results["compacted"]:
        for r in c["runs"]:
            lines.append(f"| {c['model']} | {c['units_dead']:.0%} | {c['flops_ratio']:.2f}x | {r['runtime']} | "
                         f"{r['batch']} | {r['dense_ms']:.3f} | {r['small_ms']:.3f} | {r['speedup']:.2f}x | "
                         f"{r['efficiency']:.2f} |")
    lines += ["", "ONNX Runtime vs PyTorch outputs (max abs diff / tolerance):", ""]
    for c in results["compacted"]:
        for k, v in c["onnx_check"].items():
            lines.append(f"- {c['model']} {k}: {v['max_abs_diff']:.2e} / {v['tolerance']:.2e} "
                         f"({'equal' if v['equal'] else 'DIFFERENT'})")
    t = results["compile"]["train_gated"]
    lines += ["", "## torch.compile", "",
              f"- gated {t['model']} trains compiled ({t['backend']}, fullgraph): {t['steps']} SGD steps, "
              f"losses {t['compiled_losses'][0]:.4f} -> {t['compiled_losses'][-1]:.4f}, max diff to eager "
              f"{t['max_loss_diff']:.2e} ({'equal' if t['equal'] else 'DIFFERENT'}); first step (compile) "
              f"{t['first_step_s']} s"]
    for c in results["compile"]["compacted"]:
        lines.append(f"- compacted {c['model']} runs compiled ({c['backend']}, fullgraph): max diff to eager "
                     f"{c['max_abs_diff']:.2e} ({'equal' if c['equal'] else 'DIFFERENT'}); first call "
                     f"{c['first_call_s']} s")
    return "\n".join(lines) + "\n"


def failed_checks(results: dict) -> list[str]:
    failed = [f"ONNX {c['model']} {k}" for c in results["compacted"] for k, v in c["onnx_check"].items()
              if not v["equal"]]
    comp = results["compile"]
    failed += [f"compile train {comp['train_gated']['model']}"] if not comp["train_gated"]["equal"] else []
    failed += [f"compile {c['model']}" for c in comp["compacted"] if not c["equal"]]
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="LeNet-300-100 only, short timings (< 20 s)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="directory for perf.json/perf.md")
    args = parser.parse_args(argv)
    import onnxruntime

    if args.quick:
        overhead_models, compact_models, blocks, seconds = ("lenet300",), ("lenet300",), 5, 0.02
        backend, infer_models = "aot_eager", ("lenet300",)
    else:
        overhead_models, compact_models = ("resnet56", "lenet300"), ("resnet20", "resnet56", "lenet300", "lenet5")
        blocks, seconds, backend, infer_models = 11, 0.25, "inductor", ("lenet5", "resnet20")
    results = {
        "mode": "quick" if args.quick else "full",
        "command": " ".join(["python", "-m", "benchmarks.perf", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{cpu_name()} ({platform.machine()}), {torch.get_num_threads()} threads",
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "threads": torch.get_num_threads(),
        "date": datetime.date.today().isoformat(),
    }
    start = time.perf_counter()
    results["gate_overhead"] = [gate_overhead(m, blocks, seconds) for m in overhead_models]
    # the MLP's eager overhead is per-op dispatch (docs/PERF.md); compiled, the gate fuses
    results["gate_overhead"].append(gate_overhead("lenet300", blocks, seconds, backend=backend))
    with tempfile.TemporaryDirectory() as tmp:
        results["compacted"] = [compacted_speed(m, blocks, seconds, (1, 64), Path(tmp)) for m in compact_models]
    results["compile"] = compile_checks(backend, "lenet300", infer_models)
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["failed_checks"] = failed_checks(results)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "perf.json", json.dumps(results, indent=1), "the results")
    write_atomic(args.out / "perf.md", markdown(results), "the results")
    print(markdown(results))
    if results["failed_checks"]:
        print("FAILED: " + ", ".join(results["failed_checks"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
