"""Pruning benchmark (issue 5): DAM against dense, L0, L1-magnitude, Network Slimming and ChipNet,
and on a Vision Transformer against Torch-Pruning's own head + FFN pruning (``tp_vit``).

One command per study; every method runs on the same model, data, trainer and seeds
(:mod:`baselines`), ends in a physically smaller model, and is measured the same
way: test accuracy, params and FLOPs per sample (:func:`torchdam.count.count`), median
latency at batch 1 and 64 against the dense model (:func:`torchdam.count.latency`), and
the whole training cost (epochs including fine-tuning, wall seconds)::

    python -m benchmarks.pruning lenet300-mnist --epochs 8 --out runs/bench/lenet300
    python -m benchmarks.pruning lenet300-mnist --quick          # smoke run, < 30 s
    python -m benchmarks.pruning ablation-lenet300 --epochs 8    # DAM variants vs magnitude
    python -m benchmarks.pruning lenet300-mnist --epochs 8 --targets 0.5,0.33,0.2 \
        --methods dense dam-budget dam-budget-uniform magnitude chipnet   # matched FLOPs budgets

Writes ``results.json`` (every run), ``results.md`` (mean +- std over seeds) and
``pareto.png`` (accuracy vs FLOPs and vs params, all methods) to ``--out``.

``preresnet164-cifar10-paper`` is the DAM paper's full configuration, meant for a GPU
(``benchmarks/gpu_preresnet164.sh``); ``--quick`` never changes a study's recipe, only
the amount of data, epochs and strengths.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from torchdam.atomic import write_atomic
from torchdam.attach import attach, widths
from torchdam.budget import SCHEDULES
from baselines import BASELINES, NotApplicableError, Result, Setup
from baselines import dam as dam_baseline
from baselines import dense, slimming
from baselines.common import Trained, finetune, find_sites, finish, fit, test_accuracy
from torchdam.compact import compact
from torchdam.count import latency
from torchdam.data import load_dataset
from torchdam.train import TrainConfig

METHODS = ("dense", "dam", "l0", "magnitude", "slimming", "chipnet", "dam-budget", "dam-budget-uniform",
           "dam-budget-ft", "chipnet-flops", "tp_vit", "dam-budget-pretrained", "dam-budget-ordered")
#: methods whose strength is a FLOPs target (fraction of dense) in --targets mode: the budget
#: DAMs train to it, the others bisect their ratio (chipnet: its channel budget is mapped)
BUDGET_METHODS = ("dam-budget", "dam-budget-uniform", "dam-budget-ft", "dam-budget-pretrained", "dam-budget-ordered")
#: budget-DAM variants that start from the trained dense model (diagnostics, not the paper's method)
FROM_DENSE = ("dam-budget-pretrained", "dam-budget-ordered")
TARGET_METHODS = (*BUDGET_METHODS, "magnitude", "slimming", "chipnet", "chipnet-flops", "tp_vit")
#: strengths per method: DAM/L0 lambdas, magnitude/slimming/chipnet fractions of units removed.
#: L0's lambda multiplies the expected number of active units, so it is far smaller than
#: DAM's; its values span the measured curves of BENCHMARKS.md (about 1.5-16x fewer FLOPs).
MLP_STRENGTHS = {"dam": (0.05, 0.15, 0.5), "l0": (0.0015, 0.002, 0.003, 0.01),
                 "magnitude": (0.3, 0.5, 0.7), "slimming": (0.3, 0.5, 0.7), "chipnet": (0.3, 0.5, 0.7)}
CONV_STRENGTHS = {**MLP_STRENGTHS, "l0": (0.002, 0.004, 0.008, 0.016)}
RESNET_STRENGTHS = {**MLP_STRENGTHS, "l0": (0.0003, 0.001, 0.002, 0.003)}
#: ViT: DAM lambdas and Torch-Pruning's FLOPs-reduction targets (dense / pruned). The targets
#: are the reductions DAM reached at these lambdas (seed 0, 5 epochs; BENCHMARKS.md, rounded
#: up so Torch-Pruning gets at most DAM's FLOPs): matched FLOPs. With another recipe, pass
#: DAM's measured reductions: --strengths tp_vit=R1,R2,...
VIT_STRENGTHS = {"dam": (0.01, 0.03, 0.1, 1.0), "tp_vit": (1.33315, 1.82489, 2.37921, 2.78188)}
QUICK_LIMIT = 512
LATENCY_BATCHES = (1, 64)
ZOOM_POINTS = 30.0  # the Pareto plot leaves out collapsed runs, this many points below the best


@dataclass(frozen=True)
class Study:
    """A model, a dataset and the recipe every method is trained with."""

    model: str
    data: str
    config: TrainConfig
    strengths: dict[str, tuple[float, ...]]
    finetune_epochs: int
    augment: bool = False
    val_size: int = 5000
    description: str = ""
    #: L0's log_alpha lr (own group, no decay); None: ``baselines.l0``'s default
    l0_gate_lr: float | None = None
    #: train on only this many training images (None: all but the validation split)
    train_limit: int | None = None
    #: FLOPs targets (fractions of dense) for ``--targets`` mode; empty: strengths as usual
    targets: tuple[float, ...] = ()
    #: budget-DAM's reach_at (fraction of the steps by which the target is reached); None: the default
    reach_at: float | None = None
    #: budget-DAM's schedule and cold start (epochs before the budget starts); None: the defaults
    budget_schedule: str | None = None
    budget_cold_start: int | None = None


def _config(**kwargs) -> TrainConfig:
    return TrainConfig(progress=False, **kwargs)


# The CLI's `torchdam prune` defaults (SGD 0.05 cosine, momentum 0.9, batch 128, beta lr 0.002).
_MNIST = dict(epochs=15, lr=0.05, momentum=0.9, batch_size=128, beta_lr=0.002, schedule="cosine")
# A standard CIFAR ResNet recipe, shortened by --epochs on CPU.
_CIFAR = dict(epochs=160, lr=0.1, momentum=0.9, batch_size=128, weight_decay=1e-4, beta_lr=0.002,
              schedule="cosine")

# ViT-tiny: Adam 1e-3 cosine, no weight decay, batch 128, crop+flip; beta lr 0.02 (with Adam
# beta moves about beta_lr per step while the penalty dominates: 5 epochs of 79 steps under
# a cosine schedule let it travel about 4, i.e. down to ~-3 from its start at 1).
_VIT = dict(epochs=5, optimizer="adam", lr=1e-3, batch_size=128, weight_decay=0.0, beta_lr=0.02, schedule="cosine")

STUDIES: dict[str, Study] = {
    "lenet300-mnist": Study("lenet300", "mnist", _config(**_MNIST), MLP_STRENGTHS, finetune_epochs=5),
    "lenet5-mnist": Study("lenet5", "mnist", _config(**_MNIST), CONV_STRENGTHS, finetune_epochs=5),
    "resnet20-cifar10": Study("resnet20", "cifar10", _config(**_CIFAR), RESNET_STRENGTHS,
                              finetune_epochs=20, augment=True),
    "resnet56-cifar10": Study("resnet56", "cifar10", _config(**_CIFAR), RESNET_STRENGTHS,
                              finetune_epochs=20, augment=True),
    # A CPU-sized transformer study: a 10k-image subset of CIFAR-10, 5 epochs; Torch-Pruning
    # prunes the dense run's heads and FFN units to a FLOPs target and fine-tunes 2 epochs.
    "vit-tiny-cifar10": Study("vit-tiny", "cifar10", _config(**_VIT), VIT_STRENGTHS, finetune_epochs=2,
                              augment=True, val_size=2000, train_limit=10000,
                              description="ViT-tiny on 10k CIFAR-10 images; DAM vs Torch-Pruning heads + FFN"),
    # The DAM paper's PreResNet-164 run, unchanged: SGD 0.05, momentum 0.9, x0.1 at epochs
    # 100 and 150, weight decay 1e-3 on weights only, batch 128, 200 epochs, beta frozen
    # for 20, lambda 0.2, 45k/5k split, crop+flip. Only DAM and dense (a GPU day each).
    "preresnet164-cifar10-paper": Study(
        "preresnet164", "cifar10",
        _config(epochs=200, lr=0.05, momentum=0.9, batch_size=128, weight_decay=1e-3, beta_lr=None,
                beta_weight_decay=0.0, cold_start=20, schedule="step", milestones=(100, 150)),
        {"dam": (0.2,)}, finetune_epochs=0, augment=True,
        description="DAM paper, PreResNet-164 on CIFAR-10; CIFAR-100 is not available offline"),
}


# --------------------------------------------------------------------------- DAM variants
# Ablation of item 4: the same DAM stage, changed only where named, at lambda = strength.

def dam_then_finetune(setup: Setup, strength: float, *, dam_epochs: int, beta_lr: float | None = None,
                      name: str = "dam+ft") -> Result:
    """DAM for ``dam_epochs``, compact, then fine-tune the compacted model (its gates now
    fixed, i.e. betas frozen) for ``setup.finetune_epochs`` at the baselines' fine-tune lr.

    Fine-tuning the compacted model is the frozen-beta final phase: with beta fixed a gate
    is a constant per-unit scale, which compaction folds into the weights."""
    config = dataclasses.replace(setup.config, epochs=dam_epochs, lam=strength,
                                 beta_lr=setup.config.beta_lr if beta_lr is None else beta_lr)
    model = setup.build()
    attach(model, setup.layers, setup.exclude)
    trained = fit(model, config, setup)
    layer_widths = widths(model)
    small = compact(model, setup.examples(), min_width=setup.min_width)
    before = test_accuracy(trained.trainer, small, setup)
    tuned = finetune(small, setup)
    stages = [trained] if tuned is None else [trained, tuned]
    return finish(name, strength, small, stages, setup, layer_widths, test_acc_before_finetune=before)


def dense_result(trained: Trained, setup: Setup) -> Result:
    """The dense row, from the pretraining that magnitude pruning reuses."""
    layer_widths = {name: (s.units, s.units) for name, s in find_sites(trained.model, setup).items()}
    trained.model.eval()
    return finish("dense", 0.0, trained.model, [trained], setup, layer_widths)


# --------------------------------------------------------------------------- measuring

def latencies(model: torch.nn.Module, setup: Setup, repeats: int) -> dict[str, float]:
    sample = setup.sample()
    return {f"latency_ms_b{b}": latency(model, sample.expand(b, *sample.shape[1:]).contiguous(), repeats, warmup=10)
            for b in LATENCY_BATCHES}


@torch.inference_mode()
def paired_latency(dense_model: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor, repeats: int,
                   warmup: int = 10) -> tuple[float, float, float]:
    """Median ms of each model and the median of per-pair speedups, the two forwards of a
    pair run back to back (order alternating), so load from other processes hits both
    alike: timing them one after the other gave the dense model a speedup of 0.70-1.21
    over itself on a loaded machine."""
    dense_model.eval()
    model.eval()
    for _ in range(warmup):
        dense_model(x)
        model(x)
    dense_t, model_t = [], []
    for i in range(repeats):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            (dense_model if which == 0 else model)(x)
            (dense_t if which == 0 else model_t).append(time.perf_counter() - start)
    ratios = [d / m for d, m in zip(dense_t, model_t)]
    return 1000 * statistics.median(dense_t), 1000 * statistics.median(model_t), statistics.median(ratios)


def row(result: Result, setup: Setup, dense_model: torch.nn.Module, repeats: int, seed: int) -> dict:
    """The JSON row of one run: the result's summary plus latency against dense, timed in
    interleaved pairs (:func:`paired_latency`)."""
    out = {k: v for k, v in result.summary().items() if k not in ("betas",)}
    out["seed"] = seed
    history = result.extra.get("history") or [[]]
    if history[-1]:  # the last stage's last epoch: the final model (compaction is exact) on validation
        out["val_acc"] = history[-1][-1].get("val_acc")
    kept = sum(k for k, _ in result.widths.values())
    out["units_kept"], out["units_total"] = kept, sum(t for _, t in result.widths.values())
    sample = setup.sample()
    for b in LATENCY_BATCHES:
        x = sample.expand(b, *sample.shape[1:]).contiguous()
        dense_ms, ms, speedup = paired_latency(dense_model, result.model, x, repeats)
        out[f"latency_ms_b{b}"], out[f"dense_latency_ms_b{b}"] = ms, dense_ms
        out[f"speedup_b{b}"] = speedup
        # 1.0: latency fell as much as FLOPs did; below 1: the FLOPs saving is not realised
        out[f"speedup_over_flops_b{b}"] = speedup / result.flops_ratio
    return out


def not_applicable(method: str, strength: float, seed: int, err: Exception) -> dict:
    return {"method": method, "strength": strength, "seed": seed, "not_applicable": str(err)}


# --------------------------------------------------------------------------- running

@dataclass
class Plan:
    """What to run: ``(label, strength, runner)`` jobs per seed, dense first."""

    jobs: list[tuple[str, float, Callable[[Setup, float, Trained], Result]]] = field(default_factory=list)


def method_jobs(study: Study, methods: tuple[str, ...], quick: bool) -> Plan:
    """With ``study.targets`` every method of :data:`TARGET_METHODS` runs at each target
    (its strength is the target) and the others (dam, l0: lambda-driven, no FLOPs mode)
    are left out."""
    plan = Plan()
    for method in methods:
        if method == "dense":
            continue
        if study.targets and method not in TARGET_METHODS:
            continue
        strengths = study.targets if study.targets else study.strengths.get(method, ())
        if quick:
            strengths = strengths[len(strengths) // 2:][:1]
        runner = _runner(method, study)  # one per method: slimming's runner shares its stage across strengths
        for s in strengths:
            plan.jobs.append((method, s, runner))
    return plan


def _runner(method: str, study: Study) -> Callable[[Setup, float, Trained], Result]:
    run = BASELINES.get(method)
    budget = {key: value for key, value in (("reach_at", study.reach_at), ("schedule", study.budget_schedule),
                                            ("cold_start", study.budget_cold_start)) if value is not None}
    if method in FROM_DENSE:
        return lambda setup, s, pre: run(setup, s, pretrained=pre, **budget)
    if method in BUDGET_METHODS and budget:
        return lambda setup, s, pre: run(setup, s, **budget)
    if study.targets and method in ("magnitude", "chipnet", "chipnet-flops", "tp_vit"):
        return lambda setup, s, pre: run(setup, 0.0, pretrained=pre, target_flops=s)
    if method == "slimming" and study.targets:
        return _shared_slimming(run, by_target=True)
    if method == "l0":
        return lambda setup, s, pre: run(setup, s, gate_lr=study.l0_gate_lr)
    if method in ("magnitude", "chipnet", "tp_vit"):
        return lambda setup, s, pre: run(setup, s, pretrained=pre)
    if method == "slimming":
        return _shared_slimming(run)
    return lambda setup, s, pre: run(setup, s)


def _shared_slimming(run: Callable[..., Result], by_target: bool = False) -> Callable[[Setup, float, Trained], Result]:
    """Network Slimming's sparsity-training stage does not depend on the pruning ratio, so
    (as in the paper) one stage per seed is pruned at every ratio. Each row still counts that
    stage's epochs and seconds in its training cost."""
    stages: dict[int, Trained] = {}

    def runner(setup: Setup, strength: float, pre: Trained | None) -> Result:
        seed = setup.config.seed
        if seed not in stages:
            stages.clear()
            stages[seed] = slimming.train(setup)
        if by_target:
            return run(setup, 0.0, pretrained=stages[seed], target_flops=strength)
        return run(setup, strength, pretrained=stages[seed])
    return runner


def ablation_jobs(study: Study, epochs: int, quick: bool) -> Plan:
    """Item 4: DAM variants at the CLI's lambda (0.15), magnitude matched to each one's width
    afterwards (see :func:`run_study`)."""
    lam = 0.15
    tail = 1 if quick else 3
    plan = Plan()
    plan.jobs += [
        ("dam", lam, lambda setup, s, pre: dam_baseline.run(setup, s)),
        ("dam beta_lr=0.01", lam, lambda setup, s, pre: _relabel(
            dam_baseline.run(dataclasses.replace(setup, config=dataclasses.replace(setup.config, beta_lr=0.01)), s),
            "dam beta_lr=0.01")),
        (f"dam {epochs - tail}ep + frozen-beta {tail}ep", lam, lambda setup, s, pre: dam_then_finetune(
            dataclasses.replace(setup, finetune_epochs=tail), s, dam_epochs=epochs - tail,
            name=f"dam {epochs - tail}ep + frozen-beta {tail}ep")),
        ("dam + ft", lam, lambda setup, s, pre: dam_then_finetune(setup, s, dam_epochs=epochs,
                                                                   name="dam + ft")),
        ("dam beta_lr=0.01 + ft", lam, lambda setup, s, pre: dam_then_finetune(
            setup, s, dam_epochs=epochs, beta_lr=0.01, name="dam beta_lr=0.01 + ft")),
    ]
    return plan


def _relabel(result: Result, name: str) -> Result:
    result.method = name
    return result


def run_study(name: str, study: Study, seeds: int, epochs: int | None, quick: bool, methods: tuple[str, ...],
              out: Path, device: str, ablation: bool = False, progress: bool = True, first_seed: int = 0) -> list[dict]:
    epochs = epochs or (1 if quick else study.config.epochs)
    finetune_epochs = 1 if quick else min(study.finetune_epochs, epochs)
    repeats = 5 if quick else 30
    config = dataclasses.replace(study.config, epochs=epochs,
                                 cold_start=min(study.config.cold_start, epochs - 1 if epochs > 1 else 0),
                                 milestones=tuple(m for m in study.config.milestones if m < epochs))
    splits = load_dataset(study.data, val_size=1000 if quick else study.val_size,
                          limit=QUICK_LIMIT if quick else study.train_limit, augment=study.augment)
    if ablation:
        config = dataclasses.replace(config, epochs=max(epochs, 2))
        plan = ablation_jobs(study, config.epochs, quick)
    else:
        plan = method_jobs(study, methods, quick)
    rows: list[dict] = []
    total = seeds * (1 + len(plan.jobs) + (len(plan.jobs) if ablation else 0))
    bar = tqdm(total=total, desc=name, disable=not progress)
    for seed in range(first_seed, first_seed + seeds):
        setup = Setup(study.model, splits, dataclasses.replace(config, seed=seed),
                      finetune_epochs=finetune_epochs, device=device)
        bar.set_postfix_str(f"seed {seed} dense")
        # Without dense, magnitude, chipnet or tp_vit in the run the dense model is only a latency
        # reference (latency does not depend on the weights), so it is not trained.
        train_dense = ablation or any(m in methods for m in ("dense", "magnitude", "chipnet", "chipnet-flops", "tp_vit",
                                                             *FROM_DENSE))
        pre = dense.train(setup) if train_dense else None
        dense_model = pre.model.eval() if pre is not None else setup.build().eval()
        latencies(dense_model, setup, repeats)  # warm the allocator and thread pool first
        if pre is not None:
            rows.append(row(dense_result(pre, setup), setup, dense_model, repeats, seed))
        bar.update()
        for label, strength, runner in plan.jobs:
            bar.set_postfix_str(f"seed {seed} {label} {strength:g}")
            try:
                result = runner(setup, strength, pre)
            except NotApplicableError as err:
                rows.append(not_applicable(label, strength, seed, err))
            else:
                rows.append(row(result, setup, dense_model, repeats, seed))
                if ablation:  # magnitude + fine-tune at the same per-layer width fraction
                    ratio = 1 - rows[-1]["units_kept"] / rows[-1]["units_total"]
                    bar.update()
                    mag = BASELINES.get("magnitude")(setup, ratio, pretrained=pre)
                    rows.append({**row(mag, setup, dense_model, repeats, seed), "method": "magnitude (matched)",
                                 "matched_to": label})
            bar.update()
            _write(out, name, study, setup, rows, seeds, quick)
    bar.close()
    _write(out, name, study, setup, rows, seeds, quick)
    return rows


# --------------------------------------------------------------------------- reporting

def _meta(name: str, study: Study, setup: Setup, seeds: int, quick: bool) -> dict:
    return {"study": name, "model": study.model, "data": setup.splits.display_name,
            "train_images": len(setup.splits.train), "config": dataclasses.asdict(setup.config) | {"seed": None},
            "finetune_epochs": setup.finetune_epochs, "seeds": seeds, "quick": quick, "device": setup.device,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}


def _write(out: Path, name: str, study: Study, setup: Setup, rows: list[dict], seeds: int, quick: bool) -> None:
    write_results(out, _meta(name, study, setup, seeds, quick), rows)


def write_results(out: Path, meta: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.json", json.dumps({"meta": meta, "runs": rows}, indent=1, default=str), "the results")
    write_atomic(out / "results.md", markdown(meta, rows), "the results")
    pareto_plot(rows, out / "pareto.png", f"{meta['study']} ({meta['data']}, {meta['config']['epochs']} epochs)")


def _stat(values: list[float], fmt: str, scale: float = 1.0) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "n/a"
    if len(set(values)) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} +- {format(statistics.stdev(values), fmt)}"


COLUMNS = [  # header, key, format, scale
    ("test acc %", "test_acc", ".2f", 100.0),
    ("units kept", "units_kept", ".0f", 1.0),
    ("params", "params", ",.0f", 1.0),
    ("FLOPs/sample", "flops", ",.0f", 1.0),
    ("FLOPs reduction", "flops_ratio", ".2f", 1.0),
    ("speedup b1", "speedup_b1", ".2f", 1.0),
    ("speedup b64", "speedup_b64", ".2f", 1.0),
    ("speedup/FLOPs-red. b1", "speedup_over_flops_b1", ".2f", 1.0),
    ("speedup/FLOPs-red. b64", "speedup_over_flops_b64", ".2f", 1.0),
    ("epochs", "epochs_total", ".0f", 1.0),
    ("train s", "seconds_total", ".1f", 1.0),
]


def groups(rows: list[dict]) -> dict[tuple[str, float | None], list[dict]]:
    """Rows of one method at one strength, over seeds; a matched baseline's strength differs
    per seed (it follows its DAM run's width), so it is grouped by what it matches."""
    out: dict[tuple[str, float | None], list[dict]] = {}
    for r in rows:
        if "matched_to" in r:
            out.setdefault((f"{r['method']} (vs {r['matched_to']})", None), []).append(r)
        elif r.get("target_flops") is not None and not r["method"].startswith("dam-budget"):
            out.setdefault((f"{r['method']} (to FLOPs)", round(r["strength"], 6)), []).append(r)
        else:
            out.setdefault((r["method"], round(r["strength"], 6)), []).append(r)
    return out


def markdown(meta: dict, rows: list[dict]) -> str:
    cfg = meta["config"]
    lines = [
        f"## {meta['study']}: {meta['model']} on {meta['data']}",
        "",
        f"{cfg['epochs']} epochs, {cfg['optimizer']} lr {cfg['lr']} ({cfg['schedule']}), batch {cfg['batch_size']}, "
        f"weight decay {cfg['weight_decay']}, beta lr {cfg['beta_lr']}; fine-tune {meta['finetune_epochs']} epochs "
        f"(magnitude, slimming, chipnet, tp_vit; chipnet also runs its pruning stage for as many); {meta['train_images']} training images; seeds: {meta['seeds']}"
        f"{' (QUICK smoke run: numbers mean nothing)' if meta['quick'] else ''}. "
        "Strength: lambda for dam/l0, fraction of units removed for magnitude/slimming/chipnet, "
        "FLOPs reduction target for tp_vit. "
        "FLOPs target (fraction of dense) for dam-budget and for any method marked (to FLOPs). "
        "Speedups are dense latency / method latency (median over interleaved pairs of forwards); "
        "speedup/FLOPs-red. = 1 when latency falls as much as FLOPs.",
        "",
        "| method | strength | " + " | ".join(c[0] for c in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for (method, strength), runs in groups(rows).items():
        if "not_applicable" in runs[0]:
            lines.append(f"| {method} | {strength:g} | " + " | ".join("n/a" for _ in COLUMNS) + " |")
            continue
        cells = [_stat([r.get(key) for r in runs], fmt, scale) for _, key, fmt, scale in COLUMNS]
        lines.append(f"| {method} | {_stat([r['strength'] for r in runs], '.3g')} | " + " | ".join(cells) + " |")
    notes = sorted({f"- {r['method']}: {r['not_applicable']}" for r in rows if "not_applicable" in r})
    if notes:
        lines += ["", "Not applicable:", *notes]
    lines += target_tables(rows)
    return "\n".join(lines) + "\n"


TARGET_COLUMNS = [  # header, key, format, scale
    ("reached FLOPs %", "reached_flops", ".1f", 100.0),
    ("test acc %", "test_acc", ".2f", 100.0),
    ("val acc %", "val_acc", ".2f", 100.0),
    ("units kept", "units_kept", ".0f", 1.0),
    ("epochs", "epochs_total", ".0f", 1.0),
    ("train s", "seconds_total", ".1f", 1.0),
]


def target_tables(rows: list[dict]) -> list[str]:
    """One table per FLOPs target (rows with ``target_flops``), the dense row on top; the
    reached fraction is the compacted model's FLOPs over the dense model's."""
    targets = sorted({round(r["target_flops"], 6) for r in rows if r.get("target_flops") is not None},
                     reverse=True)
    dense_rows = [r for r in rows if r["method"] == "dense" and "not_applicable" not in r]
    lines = []
    for t in targets:
        lines += ["", f"### FLOPs target {100 * t:.0f}% of dense (1/{1 / t:.3g})", "",
                  "| method | " + " | ".join(c[0] for c in TARGET_COLUMNS) + " | seeds |",
                  "|---|" + "---|" * (len(TARGET_COLUMNS) + 1)]
        at = [r for r in rows if r.get("target_flops") is not None and round(r["target_flops"], 6) == t]
        for method, runs in [("dense", dense_rows)] + list(groups(at).items()):
            name = method[0] if isinstance(method, tuple) else method
            if not runs:
                continue
            if "not_applicable" in runs[0]:
                lines.append(f"| {name} | " + " | ".join("n/a" for _ in TARGET_COLUMNS) + " | |")
                continue
            runs = [{**r, "reached_flops": r.get("reached_flops", 1 / r["flops_ratio"])} for r in runs]
            cells = [_stat([r.get(key) for r in runs], fmt, scale) for _, key, fmt, scale in TARGET_COLUMNS]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(runs)} |")
    return lines


def pareto_plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    by_method: dict[str, list[tuple[float, float, float]]] = {}
    for (method, _), runs in groups(rows).items():
        runs = [r for r in runs if "not_applicable" not in r and r.get("test_acc") is not None]
        if runs:
            by_method.setdefault(method, []).append(tuple(statistics.mean(r[k] for r in runs)
                                                          for k in ("flops", "params", "test_acc")))
    for method, points in by_method.items():
        points.sort()
        for ax, i in ((axes[0], 0), (axes[1], 1)):
            ax.plot([p[i] for p in points], [100 * p[2] for p in points], "o-" if len(points) > 1 else "o",
                    label=method)
    # Zoom on the useful band: a collapsed run (e.g. L0 at 18%) would squash every curve.
    accs = [100 * p[2] for points in by_method.values() for p in points]
    floor = max(accs) - ZOOM_POINTS if accs else 0
    hidden = sum(a < floor for a in accs)
    for ax, what in zip(axes, ("FLOPs per sample", "parameters")):
        if hidden:
            shown = [a for a in accs if a >= floor]
            pad = 0.05 * (max(shown) - min(shown) or 1.0)
            ax.set_ylim(min(shown) - pad, max(shown) + pad)
            ax.text(0.02, 0.02, f"{hidden} point(s) below {floor:.1f}% not shown", transform=ax.transAxes,
                    fontsize=8, color="gray")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short decades
        ax.set_xlabel(what + " (compacted model, log)")
        ax.set_ylabel("test accuracy %")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI

ABLATIONS = {"ablation-lenet300": "lenet300-mnist"}


def parse_source(item: str) -> tuple[Path, frozenset[str] | None]:
    """``"DIR"`` -> every row of DIR; ``"DIR:dense,dam"`` -> only those methods' rows (to
    leave out rows a later change of a method superseded)."""
    path, sep, methods = item.rpartition(":")
    if not sep or not methods or not set(methods.split(",")) <= set(METHODS):
        return Path(item), None
    return Path(path), frozenset(methods.split(","))


def merge(sources: list[str], out: Path) -> None:
    """One table and Pareto plot from several runs of the same study (e.g. a method added
    later with ``--methods dense chipnet``); ``DIR:m1,m2`` takes only those methods from
    DIR. A (method, strength, seed) row already taken from an earlier source is skipped;
    the runs must share the study, epochs and seeds' recipe, which is checked (the dense
    rows of a deterministic recipe are then identical)."""
    metas, rows, seen = [], [], set()
    for source, methods in map(parse_source, sources):
        data = json.loads((source / "results.json").read_text())
        metas.append(data["meta"])
        for r in data["runs"]:
            key = (r["method"], r.get("strength"), r.get("seed"), r.get("matched_to"), r.get("target_flops"))
            if key not in seen and (methods is None or r["method"] in methods):
                seen.add(key)
                rows.append(r)
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (order.get(r["method"], len(order)), r["method"], r.get("strength") or 0, r.get("seed") or 0))
    first = metas[0]
    for meta in metas[1:]:
        for key in ("study", "config", "finetune_epochs", "train_images"):
            if meta[key] != first[key]:
                raise SystemExit(f"cannot merge: {key} differs between runs ({meta[key]!r} vs {first[key]!r})")
    seeds = {r.get("seed") for r in rows} - {None}
    write_results(out, {**first, "seeds": len(seeds) or max(m["seeds"] for m in metas),
                        "command": " ; ".join(m["command"] for m in metas), "merged_from": list(sources)},
                  rows)


def parse_strengths(items: list[str], parser: argparse.ArgumentParser) -> dict[str, tuple[float, ...]]:
    """``["l0=0.003,0.01"]`` -> ``{"l0": (0.003, 0.01)}``; a bad item is a usage error."""
    out = {}
    for item in items:
        method, _, values = item.partition("=")
        try:
            if method not in METHODS or method == "dense" or not values:
                raise ValueError
            out[method] = tuple(float(v) for v in values.split(","))
        except ValueError:
            parser.error(f"--strengths wants METHOD=S1,S2,... with METHOD one of "
                         f"{', '.join(m for m in METHODS if m != 'dense')}; got {item!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=[*STUDIES, *ABLATIONS])
    parser.add_argument("--merge", nargs="+", default=None, metavar="DIR[:METHODS]",
                        help="instead of running: merge these runs' results.json into --out; "
                             "DIR:dense,dam takes only those methods' rows from DIR")
    parser.add_argument("--quick", action="store_true", help="smoke run: 512 images, 1 epoch, 1 strength/method")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds run are first-seed .. first-seed+seeds-1 (add seeds to an earlier run, then --merge)")
    parser.add_argument("--epochs", type=int, default=None, help="main-stage epochs (default: the study's)")
    parser.add_argument("--finetune-epochs", type=int, default=None)
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    parser.add_argument("--beta-lr", type=float, default=None,
                        help="DAM beta learning rate (default: the study's). Beta's travel grows with "
                             "lr x steps, so a run with far fewer steps than the study's needs a larger one")
    parser.add_argument("--l0-gate-lr", type=float, default=None,
                        help="L0's log_alpha lr, in its own group without weight decay (default: the study's)")
    parser.add_argument("--strengths", nargs="+", default=[], metavar="METHOD=S1,S2,...",
                        help="override a method's strengths, e.g. l0=0.003,0.01,0.02")
    parser.add_argument("--targets", default=None, metavar="T1,T2,...",
                        help="FLOPs targets (fractions of dense, e.g. 0.5,0.33,0.2): dam-budget(-uniform, -ft) train "
                             "to each, magnitude/slimming bisect their ratio and chipnet maps its channel budget "
                             "so the compacted FLOPs land within -3%%..+3%% (never above); dam and l0 are left out")
    parser.add_argument("--reach-at", type=float, default=None,
                        help="dam-budget(-uniform, -ft): fraction of the steps by which the target is reached "
                             "(default: torchdam.Budget's 0.65); rows are labelled with it")
    parser.add_argument("--budget-schedule", choices=SCHEDULES, default=None,
                        help="dam-budget(-uniform, -ft): how the target falls to its value (default: "
                             "torchdam.Budget's cubic); rows are labelled with it")
    parser.add_argument("--budget-cold-start", type=int, default=None, metavar="EPOCHS",
                        help="dam-budget(-uniform, -ft): epochs of plain training before the budget starts "
                             "(default: the study's cold_start); rows are labelled with it")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.merge:
        if args.out is None:
            parser.error("--merge needs --out")
        merge(args.merge, args.out)
        print((args.out / "results.md").read_text())
        return 0
    ablation = args.study in ABLATIONS
    study = STUDIES[ABLATIONS.get(args.study, args.study)]
    if args.finetune_epochs is not None:
        study = dataclasses.replace(study, finetune_epochs=args.finetune_epochs)
    if args.beta_lr is not None:
        study = dataclasses.replace(study, config=dataclasses.replace(study.config, beta_lr=args.beta_lr))
    if args.l0_gate_lr is not None:
        study = dataclasses.replace(study, l0_gate_lr=args.l0_gate_lr)
    if args.strengths:
        study = dataclasses.replace(study, strengths={**study.strengths, **parse_strengths(args.strengths, parser)})
    if args.reach_at is not None:
        if not 0 < args.reach_at <= 1:
            parser.error(f"--reach-at must be in (0, 1], got {args.reach_at}")
        study = dataclasses.replace(study, reach_at=args.reach_at)
    if args.budget_cold_start is not None and args.budget_cold_start < 0:
        parser.error(f"--budget-cold-start must be >= 0, got {args.budget_cold_start}")
    study = dataclasses.replace(study, budget_schedule=args.budget_schedule, budget_cold_start=args.budget_cold_start)
    if args.targets is not None:
        try:
            targets = tuple(float(t) for t in args.targets.split(","))
            if not all(0 < t <= 1 for t in targets):
                raise ValueError
        except ValueError:
            parser.error(f"--targets wants fractions in (0, 1] separated by commas, e.g. 0.5,0.33,0.2; got {args.targets!r}")
        study = dataclasses.replace(study, targets=targets)
    methods = tuple(args.methods) if args.methods else tuple(
        m for m in METHODS if m == "dense" or (m in TARGET_METHODS if study.targets else m in study.strengths))
    out = args.out or Path("runs/bench") / (args.study + ("-quick" if args.quick else ""))
    start = time.perf_counter()
    if args.seeds < 1 or args.first_seed < 0:
        parser.error("--seeds must be >= 1 and --first-seed >= 0")
    run_study(args.study, study, args.seeds, args.epochs, args.quick, methods, out, args.device, first_seed=args.first_seed,
              ablation=ablation, progress=not args.no_progress)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.json, results.md, pareto.png in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
