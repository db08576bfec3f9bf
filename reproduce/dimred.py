"""Dimensionality reduction on synthetic data (docs/METHOD.md section 3.1).

Data of known intrinsic dimension k is pushed into d=100 dimensions by a random map
(linear, a random ELU MLP, or a random quadratic layer); an autoencoder with a DAM gate on
its 50-unit bottleneck, trained full-batch with Adam on MSE + lambda*beta, should keep
exactly k units. PCA's explained-variance elbow is the classical reference.
"""
from __future__ import annotations

from collections import OrderedDict
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchdam.attach import attach
from reproduce import EXPERIMENTS
from reproduce.common import (
    RUNS_FILE, SweepLock, append_run, components_for, fmt, mean_std, open_sweep, pca, pca_elbow, plt, progress,
    read_runs, resolve_protocol, save_figure, seed_list, table, write_results,
)
from torchdam.errors import ConfigError
from torchdam.train import Trainer, TrainConfig

D = 100  #: ambient dimension
BOTTLENECK = 50
GATED = "encoder.last"  #: qualified name of the bottleneck Linear that carries the gate
TRAJECTORY_POINTS = 200  #: width-trajectory samples kept per run in results.json


class Quadratic(nn.Module):
    """``(W1 x) * (W2 x) + W1 x + b``: the paper's quadratic-kernel layer."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(n_in, n_out, bias=False)
        self.w2 = nn.Linear(n_in, n_out, bias=False)
        self.bias = nn.Parameter(torch.empty(n_out).uniform_(-n_in**-0.5, n_in**-0.5))

    def forward(self, x: Tensor) -> Tensor:
        h = self.w1(x)
        return h * self.w2(x) + h + self.bias


def _mlp(sizes: list[int], act: Callable[[], nn.Module]) -> nn.Sequential:
    """Linear layers with ``act`` between them (none after the last, which is named ``last``)."""
    layers: list[tuple[str, nn.Module]] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        layers.append(("last" if last else f"fc{i}", nn.Linear(a, b)))
        if not last:
            layers.append((f"act{i}", act()))
    return nn.Sequential(OrderedDict(layers))


def _autoencoder(encoder: nn.Sequential, decoder: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(encoder=encoder, decoder=decoder))


@dataclass(frozen=True)
class Case:
    """One synthetic setup of docs/METHOD.md section 3.1."""

    k: int
    steps: int
    lr: float
    lam: float
    generator: Callable[[], nn.Module]
    model: Callable[[], nn.Sequential]
    weight_decay: float = 0.0
    beta_init: float | None = None  # None: the gate's default (1.0 for relu_tanh)


CASES: dict[str, Case] = {
    "linear": Case(
        k=10, steps=2000, lr=0.01, lam=0.01, weight_decay=1e-6,
        generator=lambda: nn.Linear(10, D, bias=False),
        model=lambda: _autoencoder(_mlp([D, BOTTLENECK], nn.Identity), nn.Linear(BOTTLENECK, D)),
    ),
    "mlp-kernel": Case(
        k=20, steps=10000, lr=1e-3, lam=0.1,
        generator=lambda: _mlp([20, 128, D], nn.ELU),
        model=lambda: _autoencoder(_mlp([D, 256, 256, BOTTLENECK], nn.ELU), _mlp([BOTTLENECK, 128, D], nn.ELU)),
    ),
    "quadratic-kernel": Case(
        k=20, steps=5000, lr=0.01, lam=0.01, beta_init=5.0,
        generator=lambda: Quadratic(20, D),
        model=lambda: _autoencoder(_mlp([D, 256, 256, BOTTLENECK], nn.LeakyReLU), Quadratic(BOTTLENECK, D)),
    ),
}
PAPER_N = 5000  #: training points per seed in docs/METHOD.md section 3.1
N_TEST = 1000  #: held-out points from the same map, for a test reconstruction error


@dataclass(frozen=True)
class Protocol:
    """Training points and full-batch Adam steps per case, and seeds per case; everything
    else (k, maps, models, lr, lambda) is the case's own (:data:`CASES`)."""

    n: dict[str, int]
    steps: dict[str, int]
    seeds: int


#: The paper's: every case on PAPER_N points with its own steps, 5 seeds (docs/METHOD.md 3.1).
PAPER = Protocol(n={name: PAPER_N for name in CASES}, steps={name: c.steps for name, c in CASES.items()}, seeds=5)
#: Our first run and the default (docs/reproduction/dimensionality-reduction.md): the linear
#: case exactly as the paper; the nonlinear cases (10000 / 5000 full-batch steps through
#: 256-wide MLPs, minutes per seed on 2 shared CPU cores at N=5000) on 1000 points.
SHORT = replace(PAPER, n={**PAPER.n, "mlp-kernel": 1000, "quadratic-kernel": 1000})
QUICK = Protocol(n={name: 500 for name in CASES}, steps={"linear": 300, "mlp-kernel": 60, "quadratic-kernel": 60},
                 seeds=1)
#: ``--protocol`` choices; "short" is the default, "quick" what ``--quick`` selects.
PROTOCOLS = {"short": SHORT, "paper": PAPER, "quick": QUICK}
DEFAULT_PROTOCOL = "short"


def make_data(case: Case, seed: int, n: int) -> tuple[Tensor, Tensor]:
    """``(train, test)`` points: z ~ N(0, I_k) through the seed's random generator map."""
    torch.manual_seed(seed)
    generator = case.generator()
    with torch.no_grad():
        x = generator(torch.randn(n + N_TEST, case.k))
    return x[:n].contiguous(), x[n:].contiguous()


def run_case(name: str, case: Case, seed: int, n: int, steps: int) -> dict:
    """Train one seed; return the learned width, errors, trajectory and PCA reference."""
    start = time.perf_counter()
    train_x, test_x = make_data(case, seed, n)
    torch.manual_seed(seed + 1000)  # model init independent of the data draw
    model = case.model()
    attach(model, layers=(GATED,), beta_init=case.beta_init)
    config = TrainConfig(epochs=steps, batch_size=n, optimizer="adam", lr=case.lr, beta_lr=None,  # beta at lr
                         weight_decay=case.weight_decay, lam=case.lam, schedule="none",
                         seed=seed, progress=False)
    trainer = Trainer(model, config, loss_fn=F.mse_loss)
    # Full batch: one batch per "epoch", so the trainer's per-epoch log is per step.
    records = trainer.fit([(train_x, train_x)])
    width_key = f"width/{GATED}"
    stride = max(1, steps // TRAJECTORY_POINTS)
    trajectory = [(r["epoch"], r[width_key]) for r in records[::stride]]
    if trajectory[-1][0] != steps:
        trajectory.append((steps, records[-1][width_key]))
    train_mse = trainer.evaluate([(train_x, train_x)])["loss"]
    test_mse = trainer.evaluate([(test_x, test_x)])["loss"]
    _, _, variances = pca(train_x)
    return {
        "case": name, "seed": seed, "k": case.k, "n_train": n, "steps": steps,
        "width": records[-1][width_key],
        "beta": records[-1][f"beta/{GATED}"],
        "train_mse": train_mse, "test_mse": test_mse,
        "relative_test_mse": test_mse / test_x.var(0).mean().item(),
        "pca_elbow": pca_elbow(variances, BOTTLENECK),
        "pca_99": components_for(variances, 0.99),
        "pca_variances": variances[:BOTTLENECK].tolist(),
        "trajectory": trajectory,
        "seconds": round(time.perf_counter() - start, 1),
    }


def _plot_trajectories(runs: list[dict], path: Path) -> None:
    names = list(dict.fromkeys(r["case"] for r in runs))
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.3), squeeze=False)
    for ax, name in zip(axes[0], names):
        case_runs = [r for r in runs if r["case"] == name]
        for r in case_runs:
            steps, widths = zip(*r["trajectory"])
            ax.plot(steps, widths, lw=1.2, label=f"seed {r['seed']}")
        ax.axhline(case_runs[0]["k"], color="k", ls="--", lw=1, label=f"true k={case_runs[0]['k']}")
        ax.set(title=name, xlabel="Adam step (full batch)", ylabel="active bottleneck units", ylim=(0, BOTTLENECK + 1))
        ax.legend(fontsize="x-small")
    save_figure(fig, path)


def _plot_pca(runs: list[dict], path: Path) -> None:
    names = list(dict.fromkeys(r["case"] for r in runs))
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.3), squeeze=False)
    for ax, name in zip(axes[0], names):
        case_runs = [r for r in runs if r["case"] == name]
        for r in case_runs:
            v = torch.tensor(r["pca_variances"]).clamp(min=1e-16)
            ax.semilogy(range(1, len(v) + 1), (v / v.sum()).tolist(), lw=1, marker=".", ms=3)
        ax.axvline(case_runs[0]["k"], color="k", ls="--", lw=1, label=f"true k={case_runs[0]['k']}")
        ax.set(title=f"{name}: PCA spectrum", xlabel="component", ylabel="explained variance ratio")
        ax.legend(fontsize="x-small")
    save_figure(fig, path)


def _markdown(runs: list[dict], summary: dict, protocol_name: str, protocol: Protocol, expected: int) -> str:
    rows = []
    for name, s in summary.items():
        case_runs = [r for r in runs if r["case"] == name]
        rows.append([
            name, s["k"], s["n_train"], len(case_runs), ", ".join(str(r["width"]) for r in case_runs) or "-",
            f"{s['exact']}/{len(case_runs)}", fmt([r["test_mse"] for r in case_runs], 2, "e"),
            fmt([r["relative_test_mse"] for r in case_runs], 2, "e"),
            ", ".join(str(r["pca_elbow"]) for r in case_runs) or "-",
            ", ".join(str(r["pca_99"]) for r in case_runs) or "-",
        ])
    head = "## Dimensionality reduction (synthetic, docs/METHOD.md section 3.1)" + (
        " -- QUICK smoke run, not a result" if protocol_name == "quick" else "")
    ns = ", ".join(f"{name} {s['n_train']}" for name, s in summary.items())
    steps = ", ".join(f"{name} {protocol.steps[name]}" for name in summary)
    status = (f"**Partial: {len(runs)} of {expected} runs done**; the seeds per case are in the table."
              if len(runs) < expected else f"Complete: {len(runs)} runs.")
    return "\n".join([
        head, "",
        f"Protocol {protocol_name!r}: training points N per case: {ns} (paper: {PAPER_N}); full-batch Adam "
        f"steps: {steps}; up to {protocol.seeds} seed(s) per case. " + status, "",
        table(["case", "true k", "N", "seeds", "DAM width per seed", "exact k", "test MSE", "test MSE / var(x)",
               "PCA elbow per seed", "PCA 99% var per seed"], rows),
        "", f"{N_TEST} held-out points for the test MSE.",
        "Widths are active DAM units (gate > 0) after the last step; mean +- sample std over seeds.",
        "Plots: width_trajectory.png (width per step), pca_spectrum.png.",
    ])


def key_of(run: dict) -> tuple[str, int]:
    """A recorded run's key in the sweep: (case, seed)."""
    return str(run["case"]), int(run["seed"])


def sweep_jobs(seeds: list[int]) -> list[tuple[str, int]]:
    """Case-major: every seed of the linear case, then the MLP kernel, then the quadratic one."""
    return [(name, seed) for name in CASES for seed in seeds]


def protocol_settings(protocol: Protocol) -> dict:
    """Per case, everything a run depends on; it is the sweep's identity (with the protocol's name)."""
    return {name: {"k": c.k, "n_train": protocol.n[name], "steps": protocol.steps[name], "lr": c.lr,
                   "lambda": c.lam, "weight_decay": c.weight_decay, "beta_init": c.beta_init}
            for name, c in CASES.items()}


@EXPERIMENTS.register("dimensionality-reduction")
def run(out_dir: Path, quick: bool = False, seeds: int | None = None, protocol: str | None = None,
        report_only: bool = False) -> dict:
    """All three synthetic cases; writes results.json, results.md and two plots.

    A resumable sweep like the autoencoders': every finished (case, seed) run is appended to
    ``out_dir/runs.jsonl``; started again, only the runs missing there train, and the
    results are always built from ``runs.jsonl`` (``report_only``: nothing is trained). A
    run is not checkpointed part-way: the longest (the paper protocol's MLP kernel, N=5000)
    is minutes of one core, so a kill loses at most that one seed."""
    out_dir = Path(out_dir)
    name = resolve_protocol("dimensionality-reduction", protocol, quick, PROTOCOLS, DEFAULT_PROTOCOL)
    chosen = PROTOCOLS[name]
    seed_ids = seed_list(seeds, chosen.seeds, name == "quick")
    chosen = replace(chosen, seeds=len(seed_ids))
    identity = {"experiment": "dimensionality-reduction", "protocol": name, "cases": protocol_settings(chosen)}
    open_sweep(out_dir, identity, report_only)
    jobs = sweep_jobs(seed_ids)
    if not report_only:
        with SweepLock(out_dir):
            done = {key_of(r) for r in read_runs(out_dir, key_of)}
            todo = [job for job in jobs if job not in done]
            for n, (case, seed) in enumerate(progress(todo, "dimensionality-reduction"),
                                             start=len(jobs) - len(todo) + 1):
                r = run_case(case, CASES[case], seed, chosen.n[case], chosen.steps[case])
                append_run(out_dir, r)
                print(f"[{n}/{len(jobs)}] {case} seed {seed} (N={chosen.n[case]}): width {r['width']} "
                      f"(k={r['k']}), test MSE {r['test_mse']:.2e}, {r['seconds']} s", flush=True)
    return report(out_dir, name, chosen, expected=len(jobs))


def report(out_dir: Path, protocol_name: str, protocol: Protocol, expected: int) -> dict:
    """Tables, plots and results.json from the runs in ``runs.jsonl`` (all or some of them)."""
    order = list(CASES)
    runs = sorted(read_runs(out_dir, key_of), key=lambda r: (order.index(r["case"]), r["seed"]))
    if not runs:
        raise ConfigError(f"{out_dir / RUNS_FILE}: no runs to report yet")
    summary = {}
    for name, case in CASES.items():
        case_runs = [r for r in runs if r["case"] == name]
        summary[name] = {
            "k": case.k, "seeds": len(case_runs), "n_train": protocol.n[name],
            "widths": [r["width"] for r in case_runs],
            "exact": sum(r["width"] == case.k for r in case_runs),
            "width_mean_std": mean_std(r["width"] for r in case_runs),
            "test_mse_mean_std": mean_std(r["test_mse"] for r in case_runs),
        }
    _plot_trajectories(runs, out_dir / "width_trajectory.png")
    _plot_pca(runs, out_dir / "pca_spectrum.png")
    results = {"experiment": "dimensionality-reduction", "quick": protocol_name == "quick",
               "protocol_name": protocol_name, "n_test": N_TEST, "protocol": protocol_settings(protocol),
               "complete": len(runs) >= expected, "runs_done": len(runs), "runs_expected": expected,
               "summary": summary, "runs": runs}
    return write_results(out_dir, results, _markdown(runs, summary, protocol_name, protocol, expected))
