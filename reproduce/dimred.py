"""Dimensionality reduction on synthetic data (docs/METHOD.md section 3.1).

Data of known intrinsic dimension k is pushed into d=100 dimensions by a random map
(linear, a random ELU MLP, or a random quadratic layer); an autoencoder with a DAM gate on
its 50-unit bottleneck, trained full-batch with Adam on MSE + lambda*beta, should keep
exactly k units. PCA's explained-variance elbow is the classical reference.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchdam.attach import attach
from reproduce import EXPERIMENTS
from reproduce.common import (
    components_for, fmt, mean_std, pca, pca_elbow, plt, progress, save_figure, seed_list, table,
    write_results,
)
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
#: Our default run (docs/reproduction/dimensionality-reduction.md): the linear case exactly
#: as the paper; the nonlinear cases (10000 / 5000 full-batch steps through 256-wide MLPs)
#: cost minutes per seed on 2 shared CPU cores, so they run on fewer points.
DEFAULT_N = {"linear": PAPER_N, "mlp-kernel": 1000, "quadratic-kernel": 1000}
DEFAULT_SEEDS = {"linear": 5, "mlp-kernel": 5, "quadratic-kernel": 5}
QUICK = {"n": 500, "steps": {"linear": 300, "mlp-kernel": 60, "quadratic-kernel": 60}}


def make_data(case: Case, seed: int, n: int) -> tuple[Tensor, Tensor]:
    """``(train, test)`` points: z ~ N(0, I_k) through the seed's random generator map."""
    torch.manual_seed(seed)
    generator = case.generator()
    with torch.no_grad():
        x = generator(torch.randn(n + N_TEST, case.k))
    return x[:n].contiguous(), x[n:].contiguous()


def run_case(name: str, case: Case, seed: int, n: int, steps: int) -> dict:
    """Train one seed; return the learned width, errors, trajectory and PCA reference."""
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
        "case": name, "seed": seed, "k": case.k,
        "width": records[-1][width_key],
        "beta": records[-1][f"beta/{GATED}"],
        "train_mse": train_mse, "test_mse": test_mse,
        "relative_test_mse": test_mse / test_x.var(0).mean().item(),
        "pca_elbow": pca_elbow(variances, BOTTLENECK),
        "pca_99": components_for(variances, 0.99),
        "pca_variances": variances[:BOTTLENECK].tolist(),
        "trajectory": trajectory,
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


def _markdown(runs: list[dict], summary: dict, quick: bool) -> str:
    rows = []
    for name, s in summary.items():
        case_runs = [r for r in runs if r["case"] == name]
        rows.append([
            name, s["k"], len(case_runs), ", ".join(str(r["width"]) for r in case_runs),
            f"{s['exact']}/{len(case_runs)}", fmt([r["test_mse"] for r in case_runs], 2, "e"),
            fmt([r["relative_test_mse"] for r in case_runs], 2, "e"),
            ", ".join(str(r["pca_elbow"]) for r in case_runs), ", ".join(str(r["pca_99"]) for r in case_runs),
        ])
    head = "## Dimensionality reduction (synthetic, docs/METHOD.md section 3.1)" + (" -- QUICK smoke run, not a result" if quick else "")
    ns = ", ".join(f"{name} {s['n_train']}" for name, s in summary.items())
    return "\n".join([
        head, "",
        table(["case", "true k", "seeds", "DAM width per seed", "exact k", "test MSE", "test MSE / var(x)",
               "PCA elbow per seed", "PCA 99% var per seed"], rows),
        "", f"Training points: {ns} (paper: {PAPER_N}); {N_TEST} held-out points for the test MSE.",
        "Widths are active DAM units (gate > 0) after the last step; mean +- sample std over seeds.",
        "Plots: width_trajectory.png (width per step), pca_spectrum.png.",
    ])


@EXPERIMENTS.register("dimensionality-reduction")
def run(out_dir: Path, quick: bool = False, seeds: int | None = None) -> dict:
    """All three synthetic cases; writes results.json, results.md and two plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = {name: QUICK["n"] if quick else DEFAULT_N[name] for name in CASES}
    jobs = [(name, seed) for name in CASES for seed in seed_list(seeds, DEFAULT_SEEDS[name], quick)]
    runs = []
    for name, seed in progress(jobs, "dimensionality-reduction"):
        steps = QUICK["steps"][name] if quick else CASES[name].steps
        runs.append(run_case(name, CASES[name], seed, n[name], steps))
    summary = {}
    for name, case in CASES.items():
        case_runs = [r for r in runs if r["case"] == name]
        summary[name] = {
            "k": case.k, "seeds": len(case_runs), "n_train": n[name],
            "widths": [r["width"] for r in case_runs],
            "exact": sum(r["width"] == case.k for r in case_runs),
            "width_mean_std": mean_std(r["width"] for r in case_runs),
            "test_mse_mean_std": mean_std(r["test_mse"] for r in case_runs),
        }
    _plot_trajectories(runs, out_dir / "width_trajectory.png")
    _plot_pca(runs, out_dir / "pca_spectrum.png")
    protocol = {name: {"k": c.k, "n_train": n[name], "steps": QUICK["steps"][name] if quick else c.steps, "lr": c.lr,
                       "lambda": c.lam, "weight_decay": c.weight_decay, "beta_init": c.beta_init}
                for name, c in CASES.items()}
    results = {"experiment": "dimensionality-reduction", "quick": quick, "n_test": N_TEST,
               "protocol": protocol, "summary": summary, "runs": runs}
    return write_results(out_dir, results, _markdown(runs, summary, quick))
