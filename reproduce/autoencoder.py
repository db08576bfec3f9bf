"""The paper's MNIST autoencoder (docs/METHOD.md section 3.2), and the same on Fashion-MNIST.

Encoder 784-128-64-32-50, a gate on the 50-unit bottleneck, decoder 50-32-64-128-784
(tanh out), inputs in [-1, 1], Adam, batch 512, MSE. Two gates are compared over a
lambda sweep: DAM (``MSE + lambda*beta``) and the "L1" scale baseline of the official
notebook (per-unit scale s, mask relu(s), ``MSE + lambda*mean|relu(s)|``). Each run
reports its learned width, test reconstruction MSE and the macro-F1 of a (50, 50) MLP
classifier trained on the 60k train codes and scored on the 10k test codes; PCA at the
same width is the classical reference.
"""
from __future__ import annotations

import functools
import json
import shutil
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from torchdam.attach import attach, widths
from torchdam.data import fashion_mnist_arrays, mnist_arrays
from reproduce import EXPERIMENTS
from reproduce.common import (
    RUNS_FILE, SweepLock, append_run, check_sweep, mean_std, pca, plt, progress, read_runs, save_figure, seed_list,
    table, write_json, write_results,
)
from torchdam.checkpoint import find_checkpoints
from torchdam.errors import ConfigError
from torchdam.train import Trainer, TrainConfig
from torchdam.train.loop import CHECKPOINT_DIR

BOTTLENECK = 50
GATED = "encoder.last"
METHODS = ("dam", "l1")
PAPER_LAMBDAS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 8.0, 11.0)
PAPER_EPOCHS = 100
ARRAYS = {"mnist": mnist_arrays, "fashion-mnist": fashion_mnist_arrays}


class L1Scale(nn.Module):
    """The L1 baseline gate: a learnable per-unit scale ``s`` (init 1), mask ``relu(s)``,
    penalty ``mean |relu(s)|`` (the official notebook's ``SLM`` layer with ``L1Loss``).

    ``lr_scale`` c stores ``s = c * raw``: Adam moves ``raw`` by about lr per step, so
    ``s`` moves by about c*lr, the same speed-up ``beta_lr = c*lr`` gives DAM's beta.
    """

    def __init__(self, n: int, lr_scale: float = 1.0) -> None:
        super().__init__()
        self.lr_scale = float(lr_scale)
        self.raw = nn.Parameter(torch.full((n,), 1.0 / self.lr_scale))

    @property
    def scale(self) -> Tensor:
        return self.lr_scale * self.raw

    def mask(self) -> Tensor:
        return F.relu(self.scale)

    def penalty(self) -> Tensor:
        return self.mask().abs().mean()

    def active(self) -> int:
        return int((self.mask() > 0).sum())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask()


def _mlp(sizes: list[int], last_name: str = "last") -> nn.Sequential:
    layers: list[tuple[str, nn.Module]] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        layers.append((last_name if last else f"fc{i}", nn.Linear(a, b)))
        if not last:
            layers.append((f"relu{i}", nn.ReLU()))
    return nn.Sequential(OrderedDict(layers))


def build_autoencoder(method: str, lr_scale: float = 1.0) -> nn.Sequential:
    """The paper's AE; ``method`` "dam" gates ``encoder.last`` with a DAM gate, "l1" puts an
    :class:`L1Scale` (child ``scale``) between encoder and decoder."""
    decoder = _mlp([BOTTLENECK, 32, 64, 128, 784])
    decoder.add_module("tanh", nn.Tanh())
    gate = L1Scale(BOTTLENECK, lr_scale) if method == "l1" else nn.Identity()
    model = nn.Sequential(OrderedDict(encoder=_mlp([784, 128, 64, 32, BOTTLENECK]), scale=gate, decoder=decoder))
    if method == "dam":
        attach(model, layers=(GATED,))
    return model


def bottleneck_width(model: nn.Sequential) -> int:
    if isinstance(model.scale, L1Scale):
        return model.scale.active()
    return widths(model)[GATED][0]


@torch.no_grad()
def codes(model: nn.Sequential, x: Tensor) -> Tensor:
    """The active bottleneck units (gated code, dead units dropped) for every row of ``x``."""
    model.eval()
    z = torch.cat([model.scale(model.encoder(xb)) for xb in x.split(4096)])
    if isinstance(model.scale, L1Scale):
        live = model.scale.mask() > 0
    else:
        live = model.encoder.last.dam_gate.mask() > 0
    return z[:, live]


@torch.no_grad()
def reconstruction_mse(model: nn.Module, x: Tensor) -> float:
    model.eval()
    total = sum(F.mse_loss(model(xb), xb, reduction="sum").item() for xb in x.split(4096))
    return total / x.numel()


def macro_f1(pred: Tensor, target: Tensor, classes: int = 10) -> float:
    """Unweighted mean over classes of 2PR/(P+R) (0 for a class never predicted nor present)."""
    confusion = torch.bincount(target * classes + pred, minlength=classes * classes).view(classes, classes)
    tp = confusion.diag().double()
    denom = confusion.sum(0).double() + confusion.sum(1).double()
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    return f1.mean().item()


def classifier_f1(train_z: Tensor, train_y: Tensor, test_z: Tensor, test_y: Tensor, epochs: int, seed: int) -> float | None:
    """Macro-F1 on the test codes of an MLP (50, 50) trained on the train codes (Adam 1e-3,
    batch 200, sklearn MLPClassifier's defaults); codes are standardised with train stats."""
    if train_z.shape[1] == 0:
        return None  # a dead bottleneck carries no information to classify
    mean, std = train_z.mean(0), train_z.std(0).clamp(min=1e-8)
    train_z, test_z = (train_z - mean) / std, (test_z - mean) / std
    torch.manual_seed(seed)
    clf = nn.Sequential(nn.Linear(train_z.shape[1], 50), nn.ReLU(), nn.Linear(50, 50), nn.ReLU(), nn.Linear(50, 10))
    config = TrainConfig(epochs=epochs, batch_size=200, optimizer="adam", lr=1e-3, schedule="none",
                         seed=seed, progress=False)
    Trainer(clf, config).fit(DataLoader(TensorDataset(train_z, train_y), batch_size=200, shuffle=True))
    clf.eval()
    with torch.no_grad():
        pred = clf(test_z).argmax(1)
    return macro_f1(pred, test_y)


@dataclass(frozen=True)
class Protocol:
    epochs: int
    runs: int
    lambdas: tuple[float, ...]
    classifier_epochs: int
    pca_f1_widths: tuple[int, ...]
    limit: int | None = None  #: training images used (None: all 60k)
    test_limit: int | None = None

    @property
    def gate_lr_scale(self) -> float:
        """Gate parameters (beta, s) learn PAPER_EPOCHS/epochs times faster than the weights,
        so their largest possible travel over the run (Adam: ~lr per step) is the paper's.
        1 for the paper's own 100 epochs."""
        return PAPER_EPOCHS / self.epochs

    def identity(self) -> dict:
        """What must match for runs to be pooled in one sweep folder (everything but ``runs``)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k != "runs"}


#: The paper's protocol (docs/METHOD.md section 3.2): 100 epochs, 5 runs, gate lr x1; its cost is
#: in docs/reproduction/mnist-autoencoder.md "Paper protocol".
PAPER = Protocol(epochs=PAPER_EPOCHS, runs=5, lambdas=PAPER_LAMBDAS, classifier_epochs=5,
                 pca_f1_widths=(2, 4, 8, 16, 32))
#: What our first reduced run did (2 shared CPU cores): 6 epochs, 2 runs, gate lr x16.7.
SHORT = replace(PAPER, epochs=6, runs=2)
QUICK = Protocol(epochs=2, runs=1, lambdas=(0.1, 5.0), classifier_epochs=2, pca_f1_widths=(4,),
                 limit=2000, test_limit=1000)
#: ``--protocol`` choices; "short" is the default, "quick" what ``--quick`` selects.
PROTOCOLS = {"short": SHORT, "paper": PAPER, "quick": QUICK}
DEFAULT_PROTOCOL = "short"
PCA_FILE = "pca.json"
TRAIN_DIR = "train"  #: per-run Trainer folders (epoch log, checkpoints while the run trains)


def load_images(data: str, protocol: Protocol) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Flattened images scaled to [-1, 1] (the notebook's Normalize(0.5, 0.5)) and labels."""
    a = ARRAYS[data]()
    def prep(images: np.ndarray, labels: np.ndarray, limit: int | None) -> tuple[Tensor, Tensor]:
        x = torch.tensor(images[:limit], dtype=torch.float32).reshape(-1, 784).div_(127.5).sub_(1.0)
        return x, torch.from_numpy(labels[:limit].astype(np.int64))
    return (*prep(a["train_images"], a["train_labels"], protocol.limit),
            *prep(a["test_images"], a["test_labels"], protocol.test_limit))


def run_key(method: str, lam: float, seed: int) -> tuple[str, float, int]:
    return method, float(lam), int(seed)


def run_name(method: str, lam: float, seed: int) -> str:
    return f"{method}-lam{lam:g}-seed{seed}"


def train_one(method: str, lam: float, seed: int, protocol: Protocol, data: tuple[Tensor, ...],
              run_dir: Path | None = None) -> dict:
    """One training run and its measurements. With ``run_dir``, the Trainer checkpoints
    every epoch there and a run killed part-way continues from its last finished epoch
    (ending exactly as an uninterrupted run would)."""
    start = time.perf_counter()
    train_x, train_y, test_x, test_y = data
    torch.manual_seed(seed)
    model = build_autoencoder(method, protocol.gate_lr_scale)
    if method == "l1":
        def loss_fn(out: Tensor, target: Tensor) -> Tensor:
            return F.mse_loss(out, target) + lam * model.scale.penalty()
        config_lam, beta_lr = 0.0, None
    else:
        loss_fn, config_lam, beta_lr = F.mse_loss, lam, 1e-3 * protocol.gate_lr_scale
    config = TrainConfig(epochs=protocol.epochs, batch_size=512, optimizer="adam", lr=1e-3, beta_lr=beta_lr,
                         lam=config_lam, schedule="none", seed=seed, progress=False)
    loader = DataLoader(TensorDataset(train_x, train_x), batch_size=512, shuffle=True)
    resume = run_dir if run_dir is not None and find_checkpoints(Path(run_dir) / CHECKPOINT_DIR) else None
    trainer = Trainer(model, config, loss_fn=loss_fn, out_dir=run_dir)
    trainer.fit(loader, resume=resume)
    width = bottleneck_width(model)
    f1 = classifier_f1(codes(model, train_x), train_y, codes(model, test_x), test_y, protocol.classifier_epochs, seed)
    gate = model.scale.scale.tolist() if method == "l1" else model.encoder.last.dam_gate.beta.item()
    return {"method": method, "lambda": lam, "seed": seed, "width": width,
            "test_mse": reconstruction_mse(model, test_x), "macro_f1": f1,
            "gate": gate, "epochs": protocol.epochs, "resumed": resume is not None,
            "seconds": round(time.perf_counter() - start, 1)}


def pca_reference(data: tuple[Tensor, ...], protocol: Protocol, seed: int = 0) -> dict:
    """PCA test MSE for every width 1..50 and classifier macro-F1 at a few widths."""
    train_x, train_y, test_x, test_y = data
    mean, components, _ = pca(train_x)
    centered_test = test_x.double() - mean
    mse = {}
    for w in range(1, BOTTLENECK + 1):
        basis = components[:w]
        recon = centered_test @ basis.T @ basis
        mse[w] = ((recon - centered_test) ** 2).mean().item()
    f1 = {}
    for w in protocol.pca_f1_widths:
        basis = components[:w].float()
        z_train, z_test = (train_x - mean.float()) @ basis.T, (test_x - mean.float()) @ basis.T
        f1[w] = classifier_f1(z_train, train_y, z_test, test_y, protocol.classifier_epochs, seed)
    return {"test_mse": mse, "macro_f1": f1}


def _lambdas(runs: list[dict], protocol: Protocol) -> list[float]:
    """The sweep's lambdas that have at least one run, in the protocol's order."""
    done = {r["lambda"] for r in runs}
    return [lam for lam in protocol.lambdas if lam in done] + sorted(done - set(protocol.lambdas))


def _per_lambda(runs: list[dict], lambdas: list[float]) -> list[dict]:
    rows = []
    for method in METHODS:
        for lam in lambdas:
            rs = [r for r in runs if r["method"] == method and r["lambda"] == lam]
            rows.append({"method": method, "lambda": lam, "runs": len(rs),
                         "width": mean_std(r["width"] for r in rs),
                         "test_mse": mean_std(r["test_mse"] for r in rs),
                         "macro_f1": mean_std(r["macro_f1"] for r in rs)})
    return rows


def _equal_width(runs: list[dict], pca_ref: dict) -> list[dict]:
    """For every learned width >= 1: both methods' runs that ended there, and PCA at that width.
    Dead bottlenecks (width 0) are left out: they reconstruct the mean image whatever the gate."""
    rows = []
    for w in sorted({r["width"] for r in runs if r["width"] > 0}):
        row = {"width": w}
        for method in METHODS:
            rs = [r for r in runs if r["method"] == method and r["width"] == w]
            row[method] = {"runs": len(rs), "lambdas": sorted({r["lambda"] for r in rs}),
                           "test_mse": mean_std(r["test_mse"] for r in rs),
                           "macro_f1": mean_std(r["macro_f1"] for r in rs)}
        row["pca"] = {"test_mse": pca_ref["test_mse"][w], "macro_f1": pca_ref["macro_f1"].get(w)}
        rows.append(row)
    return rows


def _smaller_width_verdict(per_lambda: list[dict], protocol: Protocol) -> dict:
    """DAM's vs L1's mean width at every lambda where both have runs (a partial sweep
    compares what it has and names the lambdas still missing)."""
    by = {(r["method"], r["lambda"]): r["width"][0] for r in per_lambda if r["runs"]}
    lambdas = [lam for lam in dict.fromkeys(r["lambda"] for r in per_lambda)
               if all((m, lam) in by for m in METHODS)]
    missing = [lam for lam in protocol.lambdas if lam not in lambdas]
    smaller = [lam for lam in lambdas if by[("dam", lam)] < by[("l1", lam)]]
    # A dead bottleneck is "smaller" but useless; say where that is what made DAM smaller.
    dead = [lam for lam in lambdas if by[("dam", lam)] == 0]
    summary = (f"DAM's mean width is smaller than L1's at {len(smaller)} of {len(lambdas)} lambdas "
               f"({', '.join(f'{lam:g}' for lam in smaller) or 'none'}); DAM's bottleneck died in every "
               f"run at {', '.join(f'{lam:g}' for lam in dead) or 'no lambda'}")
    if missing:
        summary += f"; not yet run for both methods: lambda {', '.join(f'{lam:g}' for lam in missing)}"
    return {"lambdas": lambdas, "missing": missing, "dam_smaller_at": smaller, "dam_dead_at": dead,
            "confirmed": bool(lambdas) and not missing and len(smaller) == len(lambdas), "summary": summary}


def _plots(runs: list[dict], per_lambda: list[dict], pca_ref: dict, title: str, out_dir: Path) -> None:
    colors = {"dam": "tab:blue", "l1": "tab:orange"}
    labels = {"dam": "DAM", "l1": "L1 scale"}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in METHODS:
        rows = [r for r in per_lambda if r["method"] == method and r["runs"]]
        ax.errorbar([r["lambda"] for r in rows], [r["width"][0] for r in rows], yerr=[r["width"][1] for r in rows],
                    marker="o", capsize=3, color=colors[method], label=labels[method])
    ax.set(xscale="log", xlabel="lambda", ylabel="bottleneck width (mean +- std)", title=f"{title}: width vs lambda")
    ax.legend()
    save_figure(fig, out_dir / "width_vs_lambda.png")
    for key, ylabel, name in (("test_mse", "test reconstruction MSE", "mse_vs_width.png"),
                              ("macro_f1", "macro-F1 of MLP(50,50) on codes", "f1_vs_width.png")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method in METHODS:
            rs = [r for r in runs if r["method"] == method and r[key] is not None]
            ax.scatter([r["width"] for r in rs], [r[key] for r in rs], s=18, color=colors[method], label=labels[method])
        ref = {int(w): v for w, v in pca_ref[key].items() if v is not None}
        ax.plot(sorted(ref), [ref[w] for w in sorted(ref)], "k--", lw=1, label="PCA, same width")
        ax.set(xlabel="bottleneck width", ylabel=ylabel, title=f"{title}: {ylabel.split(' of')[0]} vs width")
        ax.legend()
        save_figure(fig, out_dir / name)


def _cell(ms: tuple, digits: int) -> str:
    return "-" if ms[0] is None else f"{ms[0]:.{digits}f} +- {ms[1]:.{digits}f}"


def _markdown(title: str, protocol_name: str, protocol: Protocol, runs: list[dict], per_lambda: list[dict],
              equal: list[dict], verdict: dict, expected: int) -> str:
    lambdas = list(dict.fromkeys(r["lambda"] for r in per_lambda))
    by = {(r["method"], r["lambda"]): r for r in per_lambda}
    rows = [[lam] + [by[(m, lam)]["runs"] for m in METHODS]
            + [_cell(by[(m, lam)][key], d) for key, d in (("width", 1), ("test_mse", 4), ("macro_f1", 3))
               for m in METHODS] for lam in lambdas]
    eq_rows = [[row["width"]] + [row[m]["runs"] for m in METHODS]
               + [_cell(row[m]["test_mse"], 4) for m in METHODS] + [_cell(row[m]["macro_f1"], 3) for m in METHODS]
               + [f"{row['pca']['test_mse']:.4f}", "-" if row["pca"]["macro_f1"] is None else f"{row['pca']['macro_f1']:.3f}"]
               for row in equal]
    dead = {m: sum(r["width"] == 0 for r in runs if r["method"] == m) for m in METHODS}
    head = f"## {title} autoencoder: DAM vs L1 scale (docs/METHOD.md section 3.2)" + (
        " -- QUICK smoke run, not a result" if protocol_name == "quick" else "")
    seeds = sorted({r["seed"] for r in runs})
    status = (f"**Partial: {len(runs)} of {expected} runs done** (seeds {', '.join(map(str, seeds))}); "
              "the counts per cell are in the table." if len(runs) < expected
              else f"Complete: {len(runs)} runs.")
    return "\n".join([
        head, "",
        f"Protocol {protocol_name!r}: {protocol.epochs} epochs, up to {protocol.runs} run(s) per (method, lambda), "
        f"Adam lr 1e-3 (gate parameters x{protocol.gate_lr_scale:g}), batch 512; mean +- sample std over runs. "
        + status, "",
        "### Per lambda", "",
        table(["lambda", "runs DAM", "runs L1", "width DAM", "width L1", "test MSE DAM", "test MSE L1",
               "macro-F1 DAM", "macro-F1 L1"], rows),
        "", "### At equal width (runs grouped by the width they learned)", "",
        table(["width", "DAM runs", "L1 runs", "test MSE DAM", "test MSE L1", "macro-F1 DAM", "macro-F1 L1",
               "PCA test MSE", "PCA macro-F1"], eq_rows),
        "", f"Runs whose bottleneck died (width 0, left out above): DAM {dead['dam']}, L1 {dead['l1']}.",
        "", f"Smaller width at equal lambda: {verdict['summary']} (confirmed at every lambda: {verdict['confirmed']}).",
        "", "Plots: width_vs_lambda.png, mse_vs_width.png, f1_vs_width.png.",
    ])


# ---------------------------------------------------------------- the resumable sweep

def run_record_key(run: dict) -> tuple[str, float, int]:
    """A ``runs.jsonl`` record's run (:func:`reproduce.common.read_runs`)."""
    return run_key(run["method"], run["lambda"], run["seed"])


def _pca_cached(out_dir: Path, arrays: tuple[Tensor, ...], protocol: Protocol, identity: dict) -> dict:
    """PCA reference, computed once per sweep folder (``pca.json``): its classifier F1s cost
    a few minutes of the full data."""
    path = out_dir / PCA_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("sweep") == identity:
            return {key: {int(w): v for w, v in saved[key].items()} for key in ("test_mse", "macro_f1")}
    ref = pca_reference(arrays, protocol)
    write_json(path, {"sweep": identity, **ref})
    return ref


def sweep_jobs(protocol: Protocol, seeds: list[int]) -> list[tuple[str, float, int]]:
    """Seed-major: every lambda of seed 0 (both methods) first, then seed 1, ... so a sweep
    stopped early has complete lambda sweeps for its first seeds."""
    return [(m, lam, s) for s in seeds for lam in protocol.lambdas for m in METHODS]


def run_autoencoder(data: str, out_dir: Path, quick: bool = False, seeds: int | None = None,
                    protocol: str | None = None, report_only: bool = False) -> dict:
    """The lambda sweep for both gates on ``data`` ("mnist" or "fashion-mnist").

    Every finished (method, lambda, seed) run is appended to ``out_dir/runs.jsonl``; started
    again, the sweep trains only the runs missing there (and a run killed part-way continues
    from its last epoch's checkpoint under ``out_dir/train/``). The tables, plots and
    ``results.json`` are built from ``runs.jsonl`` at the end, or at any time with
    ``report_only`` (nothing is trained then)."""
    out_dir = Path(out_dir)
    name = protocol or ("quick" if quick else DEFAULT_PROTOCOL)
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r} for {data}-autoencoder; choose one of: {', '.join(PROTOCOLS)}")
    if quick and name != "quick":
        raise ConfigError(f"--quick is the protocol 'quick'; it cannot be combined with --protocol {name}")
    chosen = PROTOCOLS[name]
    seed_ids = seed_list(seeds, chosen.runs, name == "quick")
    chosen = replace(chosen, runs=len(seed_ids))
    identity = {"experiment": f"{data}-autoencoder", "data": data, "protocol": name, **chosen.identity()}
    if report_only and not (out_dir / RUNS_FILE).is_file():
        raise ConfigError(f"{out_dir / RUNS_FILE}: no runs to report yet")
    out_dir.mkdir(parents=True, exist_ok=True)
    check_sweep(out_dir, identity)
    arrays = load_images(data, chosen)
    if not report_only:
        with SweepLock(out_dir):
            done = {run_record_key(r) for r in read_runs(out_dir, run_record_key)}
            jobs = [job for job in sweep_jobs(chosen, seed_ids) if run_key(*job) not in done]
            total = len(sweep_jobs(chosen, seed_ids))
            for n, (m, lam, s) in enumerate(progress(jobs, f"{data}-autoencoder"), start=total - len(jobs) + 1):
                run_dir = out_dir / TRAIN_DIR / run_name(m, lam, s)
                run = train_one(m, lam, s, chosen, arrays, run_dir=run_dir)
                append_run(out_dir, run)
                shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)  # keep the epoch log only
                print(f"[{n}/{total}] {data} {run_name(m, lam, s)}: width {run['width']}, test MSE "
                      f"{run['test_mse']:.4f}, macro-F1 {run['macro_f1']}, {run.get('seconds', '?')} s", flush=True)
    return report(data, out_dir, name, chosen, arrays, identity,
                  expected=len(sweep_jobs(chosen, seed_ids)))


def report(data: str, out_dir: Path, protocol_name: str, protocol: Protocol, arrays: tuple[Tensor, ...],
           identity: dict, expected: int) -> dict:
    """Tables, plots and results.json from the runs in ``runs.jsonl`` (all or some of them)."""
    lambdas = list(protocol.lambdas)
    runs = sorted(read_runs(out_dir, run_record_key), key=lambda r: (  # the sweep's own (seed-major) order
        r["seed"], lambdas.index(r["lambda"]) if r["lambda"] in lambdas else len(lambdas), r["lambda"],
        METHODS.index(r["method"])))
    if not runs:
        raise ConfigError(f"{out_dir / RUNS_FILE}: no runs to report yet")
    pca_ref = _pca_cached(out_dir, arrays, protocol, identity)
    per_lambda = _per_lambda(runs, _lambdas(runs, protocol))
    equal = _equal_width(runs, pca_ref)
    verdict = _smaller_width_verdict(per_lambda, protocol)
    title = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}[data]
    _plots(runs, per_lambda, pca_ref, title, out_dir)
    results = {"experiment": f"{data}-autoencoder", "data": data, "quick": protocol_name == "quick",
               "protocol_name": protocol_name,
               "protocol": {**protocol.__dict__, "gate_lr_scale": protocol.gate_lr_scale,
                            "n_train": len(arrays[0]), "n_test": len(arrays[2])},
               "complete": len(runs) >= expected, "runs_done": len(runs), "runs_expected": expected,
               "per_lambda": per_lambda, "equal_width": equal, "smaller_width_at_equal_lambda": verdict,
               "pca": pca_ref, "runs": runs}
    return write_results(out_dir, results, _markdown(title, protocol_name, protocol, runs, per_lambda, equal,
                                                     verdict, expected))


EXPERIMENTS.register("mnist-autoencoder")(functools.partial(run_autoencoder, "mnist"))
EXPERIMENTS.register("fashion-mnist-autoencoder")(functools.partial(run_autoencoder, "fashion-mnist"))
