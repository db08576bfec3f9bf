"""``python -m reproduce recommendation``: IGMC-DAM vs IGMC (docs/METHOD.md section 3.3).

Datasets: Douban, Flixster, YahooMusic (Monti et al. splits) and MovieLens-100K split u1.
The paper's protocol (:data:`PAPER`): Adam 1e-3, batch 50, 100 epochs, lr x0.1 at epoch 50,
edge dropout 0.2, ARR 0.001, test RMSE of the ensemble of the checkpoints at 70/80/90/100% of
training, 5 seeds; lambda 0.1 (50 for YahooMusic, whose ratings run 1..100). IGMC trains on
all training ratings; IGMC-DAM replaces IGMC's dropout 0.5 after ``lin1`` with a DAM gate
over its 128 units (``torchdam.attach(model, layers=("lin1",))``; the gate is >= 0, so
gating before the ReLU equals gating after it).

``--protocol`` picks one of :data:`PROTOCOLS`: "cpu-budget" (the default,
:data:`CPU_BUDGET`), "longer" (:data:`LONGER`), "paper" (:data:`PAPER`) or "quick"
(``--quick``). Subgraphs are extracted once per (dataset, split, sampling) and cached on
disk (:mod:`reproduce.igmc_subgraphs`).

The sweep is resumable, like the autoencoders': every (dataset, method, seed) run is
checkpointed at the end of every epoch under ``OUT/train/`` (:func:`train_igmc`) and, once
finished, appended to ``OUT/runs.jsonl``. Started again with the same command, finished runs
are skipped and a run cut part-way continues from its last finished epoch, ending exactly
as an uninterrupted run. ``OUT/sweep.json`` names the protocol, so a folder of another
protocol is refused; ``--report-only`` writes ``results.md``/``results.json`` and the plots
from ``runs.jsonl`` at any time, naming the runs still missing.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from reproduce import EXPERIMENTS
from reproduce.common import (
    RUNS_FILE, SweepLock, append_run, check_sweep, format_mean_std, mean_std, plt, read_runs, save_figure, table,
    write_results,
)
from reproduce.data.ratings import RatingData, load_ratings
from reproduce.igmc_model import IGMC
from reproduce.igmc_subgraphs import SubgraphSet, cached_extract
from torchdam.attach import attach, widths
from torchdam.checkpoint import (
    find_checkpoints, fingerprint, get_rng_state, load_latest, save_checkpoint, set_rng_state,
)
from torchdam.errors import CheckpointError, ConfigError
from torchdam.train import DAMPolicy, TrainConfig, build_optimizer, lr_factor
from torchdam.train.state import differences

DATASETS = ("douban", "flixster", "yahoo_music", "ml_100k")
LAMBDAS = {"douban": 0.1, "flixster": 0.1, "yahoo_music": 50.0, "ml_100k": 0.1}
METHODS = ("IGMC", "IGMC-DAM")
HIDDEN = 128
TRAIN_DIR = "train"  #: per-run folders holding a run's checkpoints while it trains
CHECKPOINT_DIR = "checkpoints"
RUN_STATE_FORMAT = "torchdam-igmc-run"
#: The environment switch that once selected the paper's protocol; ``--protocol paper`` replaced it.
OLD_PROTOCOL_ENV = "TORCHDAM_IGMC_PROTOCOL"


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

    def with_seeds(self, seeds: int) -> "IGMCConfig":
        """This config with ``seeds`` seeds on every dataset (``--seeds``)."""
        return replace(self, seeds=seeds, overrides={k: {**v, "seeds": seeds} for k, v in self.overrides.items()})

    def identity(self) -> dict:
        """What must match for runs to be pooled in one folder: everything but the seeds
        (more seeds may be added to a folder later)."""
        plain = asdict(self)
        plain.pop("seeds")
        plain["overrides"] = {k: {o: v for o, v in ov.items() if o != "seeds"} for k, ov in self.overrides.items()}
        return json.loads(json.dumps(plain))


#: The paper's protocol, unchanged.
PAPER = IGMCConfig()
#: What ~1.5 h of one CPU core afforded for the first run (docs/reproduction/recommendation.md):
#: the paper's protocol (all training and test pairs, Adam 1e-3 for the weights *and* beta,
#: lr x0.1 at half time) with fewer epochs and seeds on the large datasets, and MovieLens'
#: 1-hop neighbourhoods capped at 30 per hop (uncapped they make a step several times slower).
CPU_BUDGET = replace(PAPER, datasets=("yahoo_music", "flixster", "douban", "ml_100k"), overrides={
    "yahoo_music": {"epochs": 40, "seeds": 3},
    "flixster": {"epochs": 20, "seeds": 2},
    "douban": {"epochs": 4, "seeds": 1},
    "ml_100k": {"epochs": 5, "seeds": 1, "max_nodes_per_hop": 30},
})
#: Issue 13's longer run, for the two datasets the CPU budget gave a tenth of IGMC's schedule:
#: Douban and MovieLens-100K, 20 epochs (ensemble at epochs 14/16/18/20, lr x0.1 after epoch
#: 10), 2 seeds, otherwise the paper's protocol (lambda, beta lr = lr); MovieLens keeps the CPU
#: budget's cap of 30 nodes per hop.
LONGER = replace(PAPER, epochs=20, seeds=2, datasets=("douban", "ml_100k"),
                 overrides={"ml_100k": {"max_nodes_per_hop": 30}})
QUICK = replace(PAPER, epochs=2, seeds=1, max_train=100, max_test=100, max_nodes_per_hop=20, beta_lr=0.05,
                datasets=("yahoo_music", "ml_100k"))
#: ``--protocol`` choices; "cpu-budget" is the default, "quick" what ``--quick`` selects.
PROTOCOLS = {"cpu-budget": CPU_BUDGET, "longer": LONGER, "paper": PAPER, "quick": QUICK}
DEFAULT_PROTOCOL = "cpu-budget"


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


def load_dataset(name: str, cfg: IGMCConfig, progress: bool) -> tuple[int, SubgraphSet, SubgraphSet, dict]:
    """``(rating levels, train subgraphs, test subgraphs, extraction profile)`` of ``name``."""
    data = load_ratings(name)
    return (len(data.rating_values), *build_subgraphs(data, cfg, progress))


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


def _train_epoch(model: IGMC, train: SubgraphSet, order: np.ndarray, optimizer: torch.optim.Optimizer,
                 policy: DAMPolicy, cfg: IGMCConfig, dam: bool, epoch: int, device: torch.device) -> float:
    """One pass over ``train`` in ``order``; returns the epoch's mean training MSE."""
    total, seen = 0.0, 0
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
    return float(total) / seen


def _data_identity(train: SubgraphSet, test: SubgraphSet) -> str:
    """A fingerprint of every array of both subgraph sets: a resume on other data is refused."""
    return fingerprint(torch.from_numpy(getattr(s, k)) for s in (train, test) for k in s.__dataclass_fields__)


def _run_config(cfg: IGMCConfig) -> dict:
    """The options one run depends on (not the sweep's seeds, datasets or lambda table)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()
            if k not in ("seeds", "datasets", "lambdas", "overrides")}


#: checkpoint key -> the type it must hold (:func:`_check_run_state`)
_RUN_STATE = {"format": str, "identity": dict, "epoch": int, "model": dict, "optimizer": dict, "scheduler": dict,
              "rng": dict, "shuffle_rng": str, "history": list, "snapshots": list, "seconds": float}


def _check_run_state(state: dict, path: Path) -> None:
    """:class:`CheckpointError` unless ``state`` has the shape :func:`train_igmc` writes
    (a checkpoint that loads can still be another program's)."""
    if state.get("format") != RUN_STATE_FORMAT:
        raise CheckpointError(f"{path}: not an IGMC run checkpoint")
    for key, kind in _RUN_STATE.items():
        if not isinstance(state.get(key), kind):
            raise CheckpointError(f"{path}: malformed IGMC run checkpoint: {key!r} missing or not a {kind.__name__}")
    if len(state["history"]) != state["epoch"]:
        raise CheckpointError(f"{path}: malformed IGMC run checkpoint: {len(state['history'])} history records "
                              f"for {state['epoch']} finished epochs")


def train_igmc(train: SubgraphSet, test: SubgraphSet, num_relations: int, dam: bool, lam: float,
               seed: int, cfg: IGMCConfig, progress: bool = True, run_dir: Path | None = None) -> dict:
    """One IGMC or IGMC-DAM run; returns test RMSEs (checkpoint ensemble and last epoch),
    learned width, per-epoch history, training seconds and whether it was resumed.

    With ``run_dir``, the whole training state is checkpointed to ``run_dir/checkpoints/``
    (:func:`torchdam.checkpoint.save_checkpoint`: atomic, verified on read, loaded with
    ``weights_only``) at the end of every epoch, and a call on a folder holding a checkpoint
    continues from its last finished epoch. The state holds everything the remaining epochs
    draw on (weights, Adam moments, lr-schedule position, torch/numpy/python RNG states and
    the shuffling generator) plus the history and the ensemble's test predictions so far, so
    the resumed run ends exactly as an uninterrupted one. A checkpoint of another run
    (method, lambda, seed, config or data) is refused."""
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
    snapshots: list[np.ndarray] = []
    history: list[dict] = []
    first_epoch, seconds_before = 0, 0.0
    checkpoints = Path(run_dir) / CHECKPOINT_DIR if run_dir is not None else None
    identity = {"method": METHODS[int(dam)], "lambda": float(lam), "seed": seed, "num_relations": num_relations,
                "config": _run_config(cfg), "data": _data_identity(train, test)}
    resumed = checkpoints is not None and bool(find_checkpoints(checkpoints))
    if resumed:
        state, path = load_latest(checkpoints, validate=_check_run_state)
        diffs = differences(state["identity"], identity)
        if diffs:
            raise ConfigError(f"{path}: a checkpoint of another run ({'; '.join(diffs)}); delete {run_dir} "
                              "to train this run from the start")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng.bit_generator.state = json.loads(state["shuffle_rng"])
        set_rng_state(state["rng"])
        first_epoch, seconds_before = state["epoch"], state["seconds"]
        history = list(state["history"])
        snapshots = [t.numpy() for t in state["snapshots"]]
    session_start = time.perf_counter()
    for epoch in tqdm(range(first_epoch, cfg.epochs), desc=f"{METHODS[int(dam)]} seed {seed}", leave=False,
                      initial=first_epoch, total=cfg.epochs, disable=None if progress else True):
        epoch_start = time.perf_counter()
        train_mse = _train_epoch(model, train, rng.permutation(len(train)), optimizer, policy, cfg, dam, epoch,
                                 device)
        scheduler.step()
        record = {"epoch": epoch + 1, "train_mse": train_mse}
        if dam:
            record["width"], _ = widths(model)["lin1"]
            record["beta"] = model.lin1.dam_gate.beta.item()
        if epoch + 1 in cfg.ensemble_epochs():
            snapshots.append(predict(model, test))
        record["seconds"] = round(time.perf_counter() - epoch_start, 1)
        history.append(record)
        if progress:  # a line per epoch for a background run's log (its progress bar is off there)
            print(f"  {METHODS[int(dam)]} seed {seed} epoch {epoch + 1}/{cfg.epochs}: train MSE {train_mse:.4f}"
                  + (f", width {record['width']}" if dam else "") + f", {record['seconds']} s", flush=True)
        if checkpoints is not None:
            save_checkpoint({"format": RUN_STATE_FORMAT, "identity": identity, "epoch": epoch + 1,
                             "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "rng": get_rng_state(),
                             "shuffle_rng": json.dumps(rng.bit_generator.state), "history": history,
                             "snapshots": [torch.from_numpy(s) for s in snapshots],
                             "seconds": seconds_before + time.perf_counter() - session_start}, checkpoints)
    return {"rmse_ensemble": rmse(np.mean(snapshots, 0), test.targets), "rmse_last": rmse(snapshots[-1], test.targets),
            "width": history[-1]["width"] if dam else HIDDEN, "history": history,
            "seconds": round(seconds_before + time.perf_counter() - session_start, 1), "resumed": resumed}


# ---------------------------------------------------------------- the resumable sweep

def sweep_jobs(cfg: IGMCConfig) -> list[tuple[str, str, int]]:
    """``(dataset, method, seed)`` runs, seed-major: both methods on every dataset for seed 0,
    then seed 1, ... so a sweep stopped early leaves complete IGMC / IGMC-DAM pairs."""
    seeds = {name: cfg.for_dataset(name).seeds for name in cfg.datasets}
    return [(name, method, seed) for seed in range(max(seeds.values()))
            for name in cfg.datasets if seed < seeds[name] for method in METHODS]


def run_record_key(run: dict) -> tuple[str, str, int]:
    """A ``runs.jsonl`` record's run (:func:`reproduce.common.read_runs`)."""
    return run["dataset"], run["method"], int(run["seed"])


def run_name(dataset: str, method: str, seed: int) -> str:
    return f"{dataset}-{method}-seed{seed}"


def _command(name: str, seeds: int | None) -> str:
    flags = "--quick" if name == "quick" else f"--protocol {name}"
    return f"python -m reproduce recommendation {flags}" + (f" --seeds {seeds}" if seeds is not None else "")


@EXPERIMENTS.register("recommendation")
def run(out_dir: Path, quick: bool = False, seeds: int | None = None, protocol: str | None = None,
        report_only: bool = False) -> dict:
    """IGMC vs IGMC-DAM under protocol ``protocol`` (:data:`PROTOCOLS`); trains the runs not
    yet in ``out_dir/runs.jsonl`` (none with ``report_only``), then writes results.json,
    results.md and igmc_*.png from all the runs recorded there."""
    if os.environ.get(OLD_PROTOCOL_ENV):
        raise ConfigError(f"{OLD_PROTOCOL_ENV} is no longer read; ask for the paper's protocol with --protocol paper")
    name = protocol or ("quick" if quick else DEFAULT_PROTOCOL)
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r} for recommendation; choose one of: {', '.join(PROTOCOLS)}")
    if quick and name != "quick":
        raise ConfigError(f"--quick is the protocol 'quick'; it cannot be combined with --protocol {name}")
    if seeds is not None and seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    cfg = PROTOCOLS[name] if seeds is None else PROTOCOLS[name].with_seeds(seeds)
    out_dir = Path(out_dir)
    if report_only and not (out_dir / RUNS_FILE).is_file():
        raise ConfigError(f"{out_dir / RUNS_FILE}: no runs to report yet")
    out_dir.mkdir(parents=True, exist_ok=True)
    check_sweep(out_dir, {"experiment": "recommendation", "protocol": name, **cfg.identity()})
    if not report_only:
        with SweepLock(out_dir):
            _train_missing(out_dir, cfg, progress=name != "quick")
    return report(out_dir, name, cfg, _command(name, seeds))


def _train_missing(out_dir: Path, cfg: IGMCConfig, progress: bool) -> None:
    """Train the sweep's runs missing from ``runs.jsonl``, in :func:`sweep_jobs` order; a run
    cut part-way before continues from its checkpoint."""
    jobs = sweep_jobs(cfg)
    done = {run_record_key(r) for r in read_runs(out_dir, run_record_key)}
    todo = [job for job in jobs if job not in done]
    loaded: tuple | None = None  # (dataset, levels, train, test, profile): one dataset in memory at a time
    for n, (dataset, method, seed) in enumerate(todo, start=len(jobs) - len(todo) + 1):
        dcfg = cfg.for_dataset(dataset)
        if loaded is None or loaded[0] != dataset:
            loaded = None  # let the previous dataset go before the next one loads
            loaded = (dataset, *load_dataset(dataset, dcfg, progress))
        _, levels, train, test, profile = loaded
        run_dir = out_dir / TRAIN_DIR / run_name(dataset, method, seed)
        result = train_igmc(train, test, levels, method == "IGMC-DAM", dcfg.lambdas[dataset], seed, dcfg,
                            progress=progress, run_dir=run_dir)
        append_run(out_dir, {"dataset": dataset, "method": method, "seed": seed, **result,
                             "lambda": dcfg.lambdas[dataset], "rating_levels": levels, "epochs": dcfg.epochs,
                             "ensemble_epochs": dcfg.ensemble_epochs(), "max_nodes_per_hop": dcfg.max_nodes_per_hop,
                             "subgraphs": profile})
        shutil.rmtree(run_dir, ignore_errors=True)  # recorded in runs.jsonl: its checkpoints are done with
        print(f"[{n}/{len(jobs)}] {run_name(dataset, method, seed)}: test RMSE (ensemble) "
              f"{result['rmse_ensemble']:.4f}, width {result['width']}, {result['seconds']} s"
              + (" (resumed)" if result["resumed"] else ""), flush=True)


def report(out_dir: Path, name: str, cfg: IGMCConfig, command: str) -> dict:
    """Tables, plots and results.json from the runs in ``runs.jsonl`` (all or some of them)."""
    jobs = sweep_jobs(cfg)
    position = {job: i for i, job in enumerate(jobs)}
    runs = sorted(read_runs(out_dir, run_record_key), key=lambda r: position.get(run_record_key(r), len(jobs)))
    if not runs:
        raise ConfigError(f"{out_dir / RUNS_FILE}: no runs to report yet")
    recorded = {run_record_key(r) for r in runs}
    missing = [job for job in jobs if job not in recorded]
    datasets = {}
    for dataset in dict.fromkeys([*cfg.datasets, *(r["dataset"] for r in runs)]):
        rs = [r for r in runs if r["dataset"] == dataset]
        if not rs:
            continue
        dcfg = cfg.for_dataset(dataset)
        by = {m: [r for r in rs if r["method"] == m] for m in METHODS}
        summary = {m: {"runs": len(by[m]), "rmse": format_mean_std(r["rmse_ensemble"] for r in by[m]),
                       "rmse_mean": mean_std(r["rmse_ensemble"] for r in by[m])[0],
                       "rmse_std": mean_std(r["rmse_ensemble"] for r in by[m])[1],
                       "rmse_last_epoch": format_mean_std(r["rmse_last"] for r in by[m]),
                       "width": format_mean_std((r["width"] for r in by[m]), "{:.1f}")} for m in METHODS}
        datasets[dataset] = {"lambda": rs[0]["lambda"], "rating_levels": rs[0]["rating_levels"],
                             "epochs": rs[0]["epochs"], "seeds": dcfg.seeds,
                             "ensemble_epochs": rs[0]["ensemble_epochs"],
                             "max_nodes_per_hop": rs[0]["max_nodes_per_hop"], "subgraphs": rs[0]["subgraphs"],
                             "runs": by, "summary": summary, "seconds": sum(r["seconds"] for r in rs)}
    results = {"experiment": "recommendation", "protocol_name": name, "command": command,
               "config": {k: v for k, v in asdict(cfg).items() if k != "lambdas"},
               "complete": not missing, "runs_done": len(runs), "runs_expected": len(jobs),
               "missing": [run_name(*job) for job in missing], "datasets": datasets}
    results["plots"] = _plots(out_dir, results)
    return write_results(out_dir, results, _markdown(results))


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
    plots = ["igmc_width.png"]
    paired = [n for n in names if all(results["datasets"][n]["summary"][m]["runs"] for m in METHODS)]
    if paired:  # RMSE relative to IGMC's needs both methods
        fig, ax = plt.subplots(figsize=(5.5, 3.0))
        for k, model in enumerate(METHODS):
            summary = [results["datasets"][n]["summary"] for n in paired]
            base = [s["IGMC"]["rmse_mean"] for s in summary]
            ax.bar(np.arange(len(paired)) + 0.38 * k, [s[model]["rmse_mean"] / b for s, b in zip(summary, base)],
                   0.38, yerr=[s[model]["rmse_std"] / b for s, b in zip(summary, base)], label=model)
        ax.set_xticks(np.arange(len(paired)) + 0.19, paired)
        ax.set_ylabel("test RMSE / IGMC's")
        ax.set_ylim(0.8, 1.1)
        ax.legend()
        save_figure(fig, out_dir / "igmc_rmse.png", dpi=90)
        plots.append("igmc_rmse.png")
    return plots


def _markdown(results: dict) -> str:
    cfg, name = results["config"], results["protocol_name"]
    status = (f"Complete: {results['runs_done']} runs." if results["complete"] else
              f"**Partial: {results['runs_done']} of {results['runs_expected']} runs done**; not yet run: "
              + ", ".join(results["missing"]) + ".")
    rows = []
    for dataset, r in results["datasets"].items():
        s = r["summary"]
        rows.append([dataset, f"{r['subgraphs']['train']['pairs']} / {r['subgraphs']['test']['pairs']}", r["epochs"],
                     f"{s['IGMC']['runs']} / {s['IGMC-DAM']['runs']} of {r['seeds']}", r["ensemble_epochs"],
                     r["max_nodes_per_hop"] or "none", r["lambda"], s["IGMC"]["rmse"], s["IGMC-DAM"]["rmse"],
                     s["IGMC"]["rmse_last_epoch"], s["IGMC-DAM"]["rmse_last_epoch"], s["IGMC-DAM"]["width"],
                     f"{r['seconds']:.0f}"])
    per_run = [[dataset, run["seed"], method, f"{run['rmse_ensemble']:.4f}", f"{run['rmse_last']:.4f}", run["width"],
                f"{run['seconds']:.0f}", run["resumed"]]
               for dataset, r in results["datasets"].items() for method in METHODS for run in r["runs"][method]]
    extraction = [[dataset, split, p["pairs"], p["seconds"], p["us_per_subgraph"], p["from_cache"],
                   f"{p['mean_nodes']:.1f}", f"{p['mean_edges']:.1f}"]
                  for dataset, r in results["datasets"].items() for split, p in r["subgraphs"].items()]
    return "\n".join([
        "# Recommendation: IGMC vs IGMC-DAM (test RMSE of the ensemble of checkpoints, mean +- std over seeds)"
        + (" -- QUICK smoke run, not a result" if name == "quick" else ""), "",
        f"Protocol {name!r} (`{results['command']}`): batch {cfg['batch_size']}, Adam lr {cfg['lr']} "
        f"(x0.1 at half time), train targets <= {cfg['max_train'] or 'all'}, test pairs <= "
        f"{cfg['max_test'] or 'all'}, beta lr {cfg['beta_lr'] or cfg['lr']}; epochs, seeds and per-hop cap per "
        "dataset below. " + status, "",
        table(["dataset", "train / test pairs", "epochs", "runs IGMC / IGMC-DAM (of seeds)", "ensemble epochs",
               "nodes/hop cap", "lambda", "IGMC RMSE", "IGMC-DAM RMSE", "IGMC RMSE, last epoch",
               "IGMC-DAM RMSE, last epoch", f"DAM width (of {HIDDEN})", "seconds"], rows),
        "", "Per run:", "",
        table(["dataset", "seed", "method", "RMSE (ensemble)", "RMSE (last epoch)", "width", "seconds", "resumed"],
              per_run),
        "", "Subgraph extraction (1-hop, vectorised numpy; cached on disk), as the first run of each dataset "
        "found it:", "",
        table(["dataset", "split", "pairs", "seconds", "us / subgraph", "from cache", "mean nodes", "mean edges"],
              extraction),
        "", "Plots: " + ", ".join(f"![{p}]({p})" for p in results["plots"]), "",
    ])
