"""``python -m reproduce recommendation``: IGMC-DAM vs IGMC (docs/METHOD.md section 3.3).

Datasets: Douban, Flixster, YahooMusic (Monti et al. splits) and MovieLens-100K split u1.
Protocol (:data:`PROTOCOL`, the paper's): Adam 1e-3, batch 50, 100 epochs, lr x0.1 at
epoch 50, edge dropout 0.2, ARR 0.001, test RMSE of the ensemble of the checkpoints at
70/80/90/100% of training, 5 seeds; lambda 0.1 (50 for YahooMusic, whose ratings run
1..100). IGMC trains on all training ratings; IGMC-DAM replaces IGMC's dropout 0.5 after
``lin1`` with a DAM gate over its 128 units (``torchdam.attach(model, layers=("lin1",))``;
the gate is >= 0, so gating before the ReLU equals gating after it).

``run(..., quick=False)`` uses :data:`CPU_BUDGET` (what 2 CPU cores afford, stated in
``results.md``); ``protocol=True`` (``TORCHDAM_IGMC_PROTOCOL=1``) runs :data:`PROTOCOL`
unchanged. Subgraphs are extracted once per (dataset, split, sampling) and cached on disk
(:mod:`reproduce.igmc_subgraphs`).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from torchdam.atomic import write_atomic  # noqa: E402
from torchdam.attach import attach, widths  # noqa: E402
from reproduce.data.ratings import RatingData, load_ratings  # noqa: E402
from reproduce import EXPERIMENTS  # noqa: E402
from reproduce.common import format_mean_std, mean_std, save_figure  # noqa: E402
from reproduce.igmc_model import IGMC  # noqa: E402
from reproduce.igmc_subgraphs import SubgraphSet, cached_extract  # noqa: E402
from torchdam.train import DAMPolicy, TrainConfig, build_optimizer, lr_factor  # noqa: E402

DATASETS = ("douban", "flixster", "yahoo_music", "ml_100k")
LAMBDAS = {"douban": 0.1, "flixster": 0.1, "yahoo_music": 50.0, "ml_100k": 0.1}
PROTOCOL_ENV = "TORCHDAM_IGMC_PROTOCOL"
HIDDEN = 128


@dataclass(frozen=True)
class IGMCConfig:
    epochs: int = 100
    seeds: int = 5
    batch_size: int = 50
    lr: float = 1e-3
    beta_lr: float | None = None  # None: the same as lr (the paper's single Adam)
    arr: float = 0.001
    adj_dropout: float = 0.2
    max_nodes_per_hop: int | None = None
    max_train: int | None = None  # subsample the training *targets* (the graph keeps all ratings)
    max_test: int | None = None
    ensemble_at: tuple[float, ...] = (0.7, 0.8, 0.9, 1.0)
    datasets: tuple[str, ...] = DATASETS
    lambdas: dict = field(default_factory=lambda: dict(LAMBDAS))
    #: per-dataset ``{"epochs": ..., "seeds": ..., "max_nodes_per_hop": ...}`` overrides, so a
    #: CPU budget can give the small datasets the full schedule and the big ones a few epochs
    overrides: dict = field(default_factory=dict)

    def ensemble_epochs(self) -> list[int]:
        return sorted({max(1, round(f * self.epochs)) for f in self.ensemble_at})

    def for_dataset(self, name: str) -> "IGMCConfig":
        """This config with ``name``'s overrides applied (and no overrides left)."""
        return replace(self, overrides={}, **self.overrides.get(name, {}))


PROTOCOL = IGMCConfig()
#: What about 1.5 h of one CPU core affords: the paper's protocol (all training and test
#: pairs, Adam 1e-3 for the weights *and* beta, lr x0.1 at half time) with fewer epochs and
#: seeds on the large datasets, and MovieLens' 1-hop neighbourhoods capped at 30 per hop
#: (uncapped they average 276 nodes / 4,250 edges, ~7x slower per step).
CPU_BUDGET = replace(PROTOCOL, datasets=("yahoo_music", "flixster", "douban", "ml_100k"), overrides={
    "yahoo_music": {"epochs": 40, "seeds": 3},
    "flixster": {"epochs": 20, "seeds": 2},
    "douban": {"epochs": 4, "seeds": 1},
    "ml_100k": {"epochs": 5, "seeds": 1, "max_nodes_per_hop": 30},
})
QUICK = replace(PROTOCOL, epochs=2, seeds=1, max_train=100, max_test=100, max_nodes_per_hop=20, beta_lr=0.05,
                datasets=("yahoo_music", "ml_100k"))


def _subsample(n: int, cap: int | None, seed: int) -> np.ndarray:
    if cap is None or cap >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))


def build_subgraphs(data: RatingData, cfg: IGMCConfig, progress: bool) -> tuple[SubgraphSet, SubgraphSet, dict]:
    """Train/test subgraph sets (from the cache when possible) and extraction timings."""
    graph = dict(users=data.train_users, items=data.train_items, types=data.rating_type(data.train_ratings),
                 num_users=data.num_users, num_items=data.num_items, max_nodes_per_hop=cfg.max_nodes_per_hop)
    sets, profile = [], {}
    for split, cap in (("train", cfg.max_train), ("test", cfg.max_test)):
        u, v, r = (getattr(data, f"{split}_{k}") for k in ("users", "items", "ratings"))
        keep = _subsample(len(u), cap, seed=1)
        start = time.perf_counter()
        subgraphs, hit = cached_extract({"dataset": data.name, "split": split}, progress=progress, **graph,
                                        target_users=u[keep], target_items=v[keep], targets=r[keep])
        seconds = time.perf_counter() - start
        sets.append(subgraphs)
        profile[split] = {"pairs": len(keep), "seconds": round(seconds, 3), "from_cache": hit,
                          "us_per_subgraph": round(1e6 * seconds / max(1, len(keep)), 1),
                          "mean_nodes": float((subgraphs.num_users + subgraphs.num_items).mean()),
                          "mean_edges": float(np.diff(subgraphs.edge_ptr).mean())}
    return sets[0], sets[1], profile


@torch.no_grad()
def predict(model: IGMC, subgraphs: SubgraphSet, batch_size: int = 500) -> np.ndarray:
    model.eval()
    device = model.lin1.weight.device
    out = [model(subgraphs.batch(np.arange(i, min(i + batch_size, len(subgraphs)))).to(device)).cpu().numpy()
           for i in range(0, len(subgraphs), batch_size)]
    model.train()
    return np.concatenate(out)


def rmse(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.sqrt(np.mean((pred - target) ** 2)))


def train_igmc(train: SubgraphSet, test: SubgraphSet, num_relations: int, dam: bool, lam: float,
               seed: int, cfg: IGMCConfig, progress: bool = True) -> dict:
    """One IGMC or IGMC-DAM run; returns test RMSEs, learned width and per-epoch history."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = IGMC(num_relations, adj_dropout=cfg.adj_dropout, dropout=0.0 if dam else 0.5, hidden=HIDDEN).to(device)
    if dam:
        attach(model, layers=("lin1",))
    tc = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer="adam", lr=cfg.lr,
                     beta_lr=cfg.beta_lr, lam=lam, schedule="step", milestones=(cfg.epochs // 2,),
                     seed=seed, progress=progress)
    optimizer = build_optimizer(model, tc)  # beta (if gated) in its own group: beta_lr, no decay
    policy = DAMPolicy.from_config(tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(tc, e))
    snapshots, history = [], []
    for epoch in tqdm(range(cfg.epochs), desc=f"{'IGMC-DAM' if dam else 'IGMC'} seed {seed}", leave=False,
                      disable=None if progress else True):
        order, total, seen = rng.permutation(len(train)), 0.0, 0
        for i in range(0, len(order), cfg.batch_size):
            batch = train.batch(order[i:i + cfg.batch_size]).to(device, non_blocking=True)
            mse = F.mse_loss(model(batch), batch.y)
            loss = mse + cfg.arr * model.adjacent_rating_penalty()
            if dam:
                loss = loss + policy.penalty(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            policy.after_backward(model, epoch)
            optimizer.step()
            total, seen = total + mse.detach() * len(batch.y), seen + len(batch.y)
        scheduler.step()
        record = {"epoch": epoch + 1, "train_mse": float(total) / seen}
        if dam:
            record["width"], _ = widths(model)["lin1"]
            record["beta"] = model.lin1.dam_gate.beta.item()
        history.append(record)
        if epoch + 1 in cfg.ensemble_epochs():
            snapshots.append(predict(model, test))
    return {"rmse_ensemble": rmse(np.mean(snapshots, 0), test.targets), "rmse_last": rmse(snapshots[-1], test.targets),
            "width": history[-1]["width"] if dam else HIDDEN, "history": history}


def _plots(out_dir: Path, results: dict) -> list[str]:
    names = list(results["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        for run in results["datasets"][name]["runs"]["IGMC-DAM"]:
            ax.plot([h["epoch"] for h in run["history"]], [h["width"] for h in run["history"]], alpha=0.8)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylim(0, HIDDEN + 4)
    axes[0][0].set_ylabel(f"DAM width (of {HIDDEN})")
    save_figure(fig, out_dir / "igmc_width.png", dpi=90)
    fig, ax = plt.subplots(figsize=(5.5, 3.0))
    for k, model in enumerate(("IGMC", "IGMC-DAM")):
        base = [results["datasets"][n]["summary"]["IGMC"]["rmse_mean"] for n in names]
        vals = [results["datasets"][n]["summary"][model]["rmse_mean"] / b for n, b in zip(names, base)]
        errs = [results["datasets"][n]["summary"][model]["rmse_std"] / b for n, b in zip(names, base)]
        ax.bar(np.arange(len(names)) + 0.38 * k, vals, 0.38, yerr=errs, label=model)
    ax.set_xticks(np.arange(len(names)) + 0.19, names)
    ax.set_ylabel("test RMSE / IGMC's")
    ax.set_ylim(0.8, 1.1)
    ax.legend()
    save_figure(fig, out_dir / "igmc_rmse.png", dpi=90)
    return ["igmc_width.png", "igmc_rmse.png"]


def _markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [
        "# Recommendation: IGMC vs IGMC-DAM (test RMSE of the ensemble of checkpoints, mean +- std over seeds)", "",
        f"{results['budget']}: batch {cfg['batch_size']}, Adam lr {cfg['lr']} (x0.1 at half time), "
        f"train targets <= {cfg['max_train'] or 'all'}, test pairs <= {cfg['max_test'] or 'all'}, "
        f"beta lr {cfg['beta_lr'] or cfg['lr']}; epochs, seeds and per-hop cap per dataset below.", "",
        "| dataset | train / test pairs | epochs | seeds | ensemble epochs | nodes/hop cap | lambda | IGMC RMSE | "
        "IGMC-DAM RMSE | DAM width (of 128) | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["datasets"].items():
        s = r["summary"]
        lines.append(
            f"| {name} | {r['subgraphs']['train']['pairs']} / {r['subgraphs']['test']['pairs']} | {r['epochs']} | "
            f"{r['seeds']} | {r['ensemble_epochs']} | {r['max_nodes_per_hop'] or 'none'} | {r['lambda']} | "
            f"{s['IGMC']['rmse']} | {s['IGMC-DAM']['rmse']} | {s['IGMC-DAM']['width']} | {r['seconds']:.0f} |")
    lines += ["", "Subgraph extraction (1-hop, vectorised numpy; cached on disk):", "",
              "| dataset | split | pairs | seconds | us / subgraph | from cache | mean nodes | mean edges |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in results["datasets"].items():
        for split, p in r["subgraphs"].items():
            lines.append(f"| {name} | {split} | {p['pairs']} | {p['seconds']} | {p['us_per_subgraph']} | "
                         f"{p['from_cache']} | {p['mean_nodes']:.1f} | {p['mean_edges']:.1f} |")
    lines += ["", "Plots: " + ", ".join(f"![{p}]({p})" for p in results["plots"]), ""]
    return "\n".join(lines)


@EXPERIMENTS.register("recommendation")
def run(out_dir: Path, quick: bool = False, seeds: int | None = None, protocol: bool | None = None) -> dict:
    """IGMC vs IGMC-DAM on every dataset; writes results.json, results.md, igmc_*.png."""
    protocol = os.environ.get(PROTOCOL_ENV) == "1" if protocol is None else protocol
    cfg = QUICK if quick else PROTOCOL if protocol else CPU_BUDGET
    if seeds is not None:
        cfg = replace(cfg, seeds=seeds, overrides={k: {**v, "seeds": seeds} for k, v in cfg.overrides.items()})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"experiment": "recommendation", "budget": "quick" if quick else "protocol" if protocol else "cpu budget",
               "config": {k: v for k, v in asdict(cfg).items() if k != "lambdas"},
               "datasets": {}}
    for name in tqdm(cfg.datasets, desc="datasets", disable=None):
        start = time.perf_counter()
        data = load_ratings(name)
        dcfg = cfg.for_dataset(name)
        train, test, profile = build_subgraphs(data, dcfg, progress=not quick)
        runs = {m: [train_igmc(train, test, len(data.rating_values), m == "IGMC-DAM", dcfg.lambdas[name], seed,
                               dcfg, progress=not quick) for seed in range(dcfg.seeds)]
                for m in ("IGMC", "IGMC-DAM")}
        summary = {m: {"rmse": format_mean_std([r["rmse_ensemble"] for r in rs]),
                       "rmse_mean": float(np.mean([r["rmse_ensemble"] for r in rs])),
                       "rmse_std": mean_std([r["rmse_ensemble"] for r in rs])[1],
                       "rmse_last_epoch": format_mean_std([r["rmse_last"] for r in rs]),
                       "width": format_mean_std([r["width"] for r in rs], "{:.1f}")} for m, rs in runs.items()}
        results["datasets"][name] = {"lambda": dcfg.lambdas[name], "rating_levels": len(data.rating_values),
                                     "epochs": dcfg.epochs, "seeds": dcfg.seeds,
                                     "ensemble_epochs": dcfg.ensemble_epochs(),
                                     "max_nodes_per_hop": dcfg.max_nodes_per_hop,
                                     "subgraphs": profile, "runs": runs, "summary": summary,
                                     "seconds": time.perf_counter() - start}
        _write(out_dir, results)  # after every dataset: a long run keeps what it finished
    return results


def _write(out_dir: Path, results: dict) -> None:
    results["plots"] = _plots(out_dir, results)
    write_atomic(out_dir / "results.json", json.dumps(results, indent=1), "the results")
    write_atomic(out_dir / "results.md", _markdown(results), "the results")
