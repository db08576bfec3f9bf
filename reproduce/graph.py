"""``python -m reproduce graph-representation``: DAM on graph embeddings (docs/METHOD.md section 3.4).

The paper names the experiment but published no setup; ours (stated in results.md):

- **GAE** (Kipf & Welling 2016): GCN(F, 128) + ReLU -> GCN(128, 64) -> DAM(64) -> inner
  product decoder; 85/5/10% link split (``RandomLinkSplit``), Adam 0.01, negative sampling
  each step. Metric: test link-prediction AUC / AP.
- **DGI** (Velickovic et al. 2019): GCN(F, d) + PReLU -> DAM(d), d = 128 ("short", the
  default) or DGI's 512 (``--protocol paper``); mean-sigmoid summary,
  bilinear discriminator, feature-shuffling corruption; Adam 0.001. Metric: accuracy of a
  logistic-regression probe trained on the 140/120 Planetoid training nodes' embeddings,
  scored on the 1000 test nodes.

Each encoder is trained with DAM, without DAM at full width, and without DAM at the width
DAM found (per seed). The gate is one :class:`~torchdam.gates.DAMGate` on the embedding;
its beta has its own Adam learning rate and no weight decay (:func:`torchdam.dam_param_groups`),
the loss adds the penalty (:class:`torchdam.DAMPolicy`). PubMed is not available offline and is reported as not
run. Data: :mod:`reproduce.data.planetoid`. Protocols (epochs, widths, seeds): :class:`GraphConfig`.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from reproduce.data.planetoid import PlanetoidGraph, load_planetoid  # noqa: E402
from torchdam.errors import ConfigError, DataError  # noqa: E402
from reproduce import EXPERIMENTS  # noqa: E402
from reproduce.common import (  # noqa: E402
    RUNS_FILE, SweepLock, append_run, format_mean_std, open_sweep, progress, read_runs, resolve_protocol,
    save_figure, seed_list, write_results,
)
from torchdam.gates import DAMGate  # noqa: E402
from torchdam.train import DAMPolicy, dam_param_groups  # noqa: E402

DATASETS = ("cora", "citeseer", "pubmed")


@dataclass(frozen=True)
class GraphConfig:
    """One protocol's settings; the defaults are the "short" protocol, what 2 shared CPU
    cores afforded (see docs/reproduction/graph-representation.md).

    The "paper" protocol (:data:`PAPER`) trains DGI at its paper's embedding width 512.
    DGI's paper trains with Adam 1e-3 until the training loss has not improved for 20
    epochs (early stopping, patience 20); we train a fixed :data:`PAPER_DGI_EPOCHS`
    instead, so the three variants get the same budget and the protocol's cost is known
    in advance; the count is the largest round one at which the whole protocol (2 seeds,
    Cora and CiteSeer, 3 variants of both encoders) fits about 40 minutes of one CPU core.
    GAE gets its paper's 200 epochs there (Kipf & Welling 2016).
    """

    seeds: int = 2
    datasets: tuple[str, ...] = DATASETS
    gae_dim: int = 64
    gae_hidden: int = 128
    gae_epochs: int = 100
    gae_lr: float = 0.01
    gae_lam: float = 0.5
    dgi_dim: int = 128
    dgi_epochs: int = 60
    dgi_lr: float = 0.001
    dgi_lam: float = 0.5
    beta_lr: float = 0.05


PAPER_DGI_EPOCHS = 250  #: fixed in place of DGI's early stopping (see :class:`GraphConfig`)
SHORT = GraphConfig()
PAPER = replace(SHORT, dgi_dim=512, dgi_epochs=PAPER_DGI_EPOCHS, gae_epochs=200)
QUICK = replace(SHORT, seeds=1, datasets=("cora",), gae_epochs=10, dgi_epochs=5, dgi_dim=32)
#: ``--protocol`` choices; "short" is the default, "quick" what ``--quick`` selects.
PROTOCOLS = {"short": SHORT, "paper": PAPER, "quick": QUICK}
DEFAULT_PROTOCOL = "short"
#: What results.md says about each protocol's epoch counts.
EPOCH_NOTES = {
    "short": ("Short runs, far shorter than GAE's 200 epochs and DGI's early-stopped training: "
              "treat the absolute numbers as short-run numbers."),
    "paper": (f"DGI's paper stops early (Adam 1e-3, patience 20 on the training loss); here a fixed "
              f"{PAPER_DGI_EPOCHS} epochs, the same for all variants, the largest round count at which the "
              "whole protocol fits about 40 minutes of one CPU core. GAE: its paper's 200 epochs."),
    "quick": "Smoke-test epochs, not a result.",
}
#: The three trainings per (dataset, encoder, seed), in this order: the last one trains
#: at the width the DAM run ended with.
VARIANTS = ("DAM", "dense full width", "dense at DAM width")


class GatedEncoder(nn.Module):
    """A GCN encoder whose embedding optionally passes through a DAM gate."""

    def __init__(self, body: nn.Module, dim: int, dam: bool) -> None:
        super().__init__()
        self.body = body
        self.gate = DAMGate(dim) if dam else None

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        z = self.body(x, adj)
        return self.gate(z) if self.gate is not None else z

    def width(self) -> int:
        return int(self.gate.active()) if self.gate is not None else self.body.dim


class GCNLayer(nn.Module):
    """Kipf & Welling's graph convolution ``A_hat (x W) + b`` with a precomputed sparse
    ``A_hat = D^-1/2 (A + I) D^-1/2`` (same maths as torch_geometric's GCNConv, without
    re-normalising the graph every step). ``x`` may be a sparse tensor (on CPU here a dense
    ``x @ W`` was faster for Cora's 1.3%-dense features, so the experiment passes dense)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        h = torch.sparse.mm(x, self.weight) if x.is_sparse else x @ self.weight
        return torch.sparse.mm(adj, h) + self.bias


def normalized_adjacency(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Sparse ``D^-1/2 (A + I) D^-1/2`` (the GCN propagation matrix)."""
    loops = torch.arange(num_nodes).repeat(2, 1)
    index = torch.cat([edge_index, loops], 1)
    deg = torch.bincount(index[0], minlength=num_nodes).float()
    value = deg[index[0]].rsqrt() * deg[index[1]].rsqrt()
    return torch.sparse_coo_tensor(index, value, (num_nodes, num_nodes), check_invariants=True).coalesce()


class GAEBody(nn.Module):
    def __init__(self, in_dim: int, hidden: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.conv1, self.conv2 = GCNLayer(in_dim, hidden), GCNLayer(hidden, dim)

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        return self.conv2(torch.relu(self.conv1(x, adj)), adj)


class DGIBody(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.conv, self.act = GCNLayer(in_dim, dim), nn.PReLU(dim)

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        return self.act(self.conv(x, adj))


def _fit(model: nn.Module, encoder: GatedEncoder, step_loss, epochs: int, lr: float, lam: float,
         beta_lr: float, desc: str, progress: bool) -> list[dict]:
    """Full-batch Adam; the gate's beta in its own group (own lr, no decay)."""
    optimizer = torch.optim.Adam(dam_param_groups(model, lr=lr, beta_lr=beta_lr), lr=lr)
    policy = DAMPolicy(lam)
    history = []
    for epoch in tqdm(range(epochs), desc=desc, leave=False, disable=None if progress else True):
        model.train()
        loss = step_loss()
        total = loss + policy.penalty(model) if encoder.gate is not None else loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        policy.after_backward(model, epoch)
        optimizer.step()
        if epoch % 10 == 9 or epoch == epochs - 1:
            history.append({"epoch": epoch + 1, "loss": loss.item(), "width": encoder.width()})
    return history


def run_gae(g: PlanetoidGraph, dim: int, dam: bool, seed: int, cfg: GraphConfig, progress: bool) -> dict:
    from torch_geometric.data import Data
    from torch_geometric.nn import GAE
    from torch_geometric.transforms import RandomLinkSplit

    torch.manual_seed(seed)  # the same seed gives the same link split for every variant
    random.seed(seed)  # torch_geometric's negative sampling draws from Python's random
    split = RandomLinkSplit(num_val=0.05, num_test=0.1, is_undirected=True, split_labels=True,
                            add_negative_train_samples=False)
    train, _, test = split(Data(x=g.x, edge_index=g.edge_index, num_nodes=g.num_nodes))
    encoder = GatedEncoder(GAEBody(g.x.shape[1], cfg.gae_hidden, dim), dim, dam)
    model = GAE(encoder)
    x, adj = g.x, normalized_adjacency(train.edge_index, g.num_nodes)

    def step_loss() -> Tensor:
        return model.recon_loss(model.encode(x, adj), train.pos_edge_label_index)

    history = _fit(model, encoder, step_loss, cfg.gae_epochs, cfg.gae_lr, cfg.gae_lam, cfg.beta_lr,
                   f"GAE {g.name} {'DAM' if dam else dim}", progress)
    model.eval()
    with torch.no_grad():
        z = model.encode(x, adj)
        auc, ap = model.test(z, test.pos_edge_label_index, test.neg_edge_label_index)
    return {"auc": float(auc), "ap": float(ap), "width": encoder.width(), "history": history}


def run_dgi(g: PlanetoidGraph, dim: int, dam: bool, seed: int, cfg: GraphConfig, progress: bool) -> dict:
    from sklearn.linear_model import LogisticRegression
    from torch_geometric.nn import DeepGraphInfomax

    torch.manual_seed(seed)
    encoder = GatedEncoder(DGIBody(g.x.shape[1], dim), dim, dam)
    model = DeepGraphInfomax(dim, encoder, summary=lambda z, *a, **k: torch.sigmoid(z.mean(0)),
                             corruption=lambda x, adj: (x[torch.randperm(x.shape[0])], adj))
    x, adj = g.x, normalized_adjacency(g.edge_index, g.num_nodes)

    def step_loss() -> Tensor:
        pos, neg, summary = model(x, adj)
        return model.loss(pos, neg, summary)

    history = _fit(model, encoder, step_loss, cfg.dgi_epochs, cfg.dgi_lr, cfg.dgi_lam, cfg.beta_lr,
                   f"DGI {g.name} {'DAM' if dam else dim}", progress)
    model.eval()
    with torch.no_grad():
        z = encoder(x, adj).numpy()
    probe = LogisticRegression(max_iter=2000).fit(z[g.train_mask.numpy()], g.y[g.train_mask].numpy())
    acc = probe.score(z[g.test_mask.numpy()], g.y[g.test_mask].numpy())
    return {"acc": float(acc), "width": encoder.width(), "history": history}


#: encoder -> (trainer, full width attribute of the config, metric names)
ENCODERS = {"GAE": (run_gae, "gae_dim", ("auc", "ap")), "DGI": (run_dgi, "dgi_dim", ("acc",))}


def key_of(run: dict) -> tuple[str, str, str, int]:
    """A recorded run's key in the sweep: (dataset, encoder, variant, seed)."""
    return str(run["dataset"]), str(run["encoder"]), str(run["variant"]), int(run["seed"])


def sweep_jobs(cfg: GraphConfig, seeds: list[int]) -> list[tuple[str, str, str, int]]:
    """Dataset, then encoder, then seed; the variants of one seed in :data:`VARIANTS` order,
    so a seed's DAM run is recorded before the dense run at its width."""
    return [(name, enc, variant, seed) for name in cfg.datasets for enc in ENCODERS for seed in seeds
            for variant in VARIANTS]


def job_dim(cfg: GraphConfig, job: tuple[str, str, str, int], done: dict[tuple, dict]) -> int:
    """The embedding width ``job`` trains at: the encoder's full width, or, for "dense at DAM
    width", the width (at least 1) of the recorded DAM run of the same dataset, encoder and seed."""
    name, enc, variant, seed = job
    if variant != "dense at DAM width":
        return getattr(cfg, ENCODERS[enc][1])
    dam = done.get((name, enc, "DAM", seed))
    if dam is None:
        raise ConfigError(f"{name} {enc} seed {seed}: no recorded DAM run to take the width from")
    return max(1, int(dam["width"]))


def train_one(g: PlanetoidGraph, job: tuple[str, str, str, int], dim: int, cfg: GraphConfig,
              progress: bool) -> dict:
    """One training run of ``job`` at width ``dim``: its record for runs.jsonl."""
    name, enc, variant, seed = job
    start = time.perf_counter()
    measured = ENCODERS[enc][0](g, dim, variant == "DAM", seed, cfg, progress)
    return {"dataset": name, "encoder": enc, "variant": variant, "seed": seed, "dim": dim, **measured,
            "seconds": round(time.perf_counter() - start, 1)}


def _markdown(results: dict) -> str:
    cfg = results["config"]
    status = (f"**Partial: {results['runs_done']} of {results['runs_expected']} runs done**; the runs per "
              "row are in the table." if not results["complete"] else f"Complete: {results['runs_done']} runs.")
    lines = [
        "# Graph representation learning with a DAM gate on the embedding"
        + (" -- QUICK smoke run, not a result" if results["protocol_name"] == "quick" else ""), "",
        f"Protocol {results['protocol_name']!r}: up to {results['seeds']} seed(s). GAE: {cfg['gae_epochs']} "
        f"epochs, width {cfg['gae_dim']}, lambda {cfg['gae_lam']}; DGI: {cfg['dgi_epochs']} epochs, width "
        f"{cfg['dgi_dim']}, lambda {cfg['dgi_lam']}; beta lr {cfg['beta_lr']}. Mean +- std over seeds. "
        + status, "",
        EPOCH_NOTES[results["protocol_name"]], "",
        "| dataset | encoder | variant | runs | width | metric(s) |", "|---|---|---|---|---|---|",
    ]
    for name, r in results["datasets"].items():
        if "not_run" in r:
            lines.append(f"| {name} | - | not run | 0 | - | {r['not_run']} |")
            continue
        for enc, variants in r.items():
            for variant, s in variants["summary"].items():
                metrics = ", ".join(f"{m} {v}" for m, v in s.items() if m not in ("width", "runs"))
                lines.append(f"| {name} | {enc} | {variant} | {s['runs']} | {s['width']} | {metrics} |")
    lines += ["", "Plots: " + ", ".join(f"![{p}]({p})" for p in results["plots"]), ""]
    return "\n".join(lines)


def _plot(out_dir: Path, results: dict) -> list[str]:
    done = {n: r for n, r in results["datasets"].items() if "not_run" not in r}
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, (enc, (_, dim_attr, _)) in zip(axes, ENCODERS.items()):
        for name, r in done.items():
            for k, run in enumerate(r[enc]["runs"]["DAM"]):
                ax.plot([h["epoch"] for h in run["history"]], [h["width"] for h in run["history"]],
                        color=f"C{list(done).index(name)}", label=name if k == 0 else None)
        ax.set_title(f"{enc}: DAM embedding width (of {results['config'][dim_attr]})")
        ax.set_xlabel("epoch")
        ax.set_ylim(0, results["config"][dim_attr] * 1.05)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    save_figure(fig, out_dir / "graph_width.png", dpi=90)
    return ["graph_width.png"]


def _load(name: str) -> PlanetoidGraph | None:
    """The dataset, or None for PubMed when its files are missing (reported as not run)."""
    try:
        return load_planetoid(name)
    except DataError:
        if name != "pubmed":
            raise
        return None


@EXPERIMENTS.register("graph-representation")
def run(out_dir: Path, quick: bool = False, seeds: int | None = None, protocol: str | None = None,
        report_only: bool = False) -> dict:
    """GAE and DGI, each with DAM / dense full width / dense at DAM's width.

    A resumable sweep like the autoencoders': every finished (dataset, encoder, variant,
    seed) run is appended to ``out_dir/runs.jsonl``; started again, only the runs missing
    there train (a "dense at DAM width" run takes its width from the recorded DAM run), and
    the results are always built from ``runs.jsonl`` (``report_only``: nothing is trained).
    A run is not checkpointed part-way: a kill loses at most that one run."""
    import sklearn.linear_model  # noqa: F401  (the extra the runs import: missing, fail before any run)
    import torch_geometric.nn  # noqa: F401

    out_dir = Path(out_dir)
    name = resolve_protocol("graph-representation", protocol, quick, PROTOCOLS, DEFAULT_PROTOCOL)
    seed_ids = seed_list(seeds, PROTOCOLS[name].seeds, name == "quick")
    cfg = replace(PROTOCOLS[name], seeds=len(seed_ids))
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items() if k != "seeds"}
    open_sweep(out_dir, {"experiment": "graph-representation", "protocol": name, "config": settings}, report_only)
    jobs = sweep_jobs(cfg, seed_ids)
    if not report_only:
        with SweepLock(out_dir):
            done = {key_of(r): r for r in read_runs(out_dir, key_of)}
            todo = [job for job in jobs if job not in done]
            graphs = {dataset: _load(dataset) for dataset in dict.fromkeys(job[0] for job in todo)}
            absent = {dataset for dataset, g in graphs.items() if g is None}
            total = sum(job[0] not in absent for job in jobs)
            todo = [job for job in todo if job[0] not in absent]
            for n, job in enumerate(progress(todo, "graph-representation"), start=total - len(todo) + 1):
                dim = job_dim(cfg, job, done)
                r = train_one(graphs[job[0]], job, dim, cfg, name != "quick")
                append_run(out_dir, r)
                done[job] = r
                metrics = ", ".join(f"{m} {r[m]:.4f}" for m in ENCODERS[job[1]][2])
                print(f"[{n}/{total}] {job[0]} {job[1]} {job[2]} seed {job[3]} (dim {dim}): width "
                      f"{r['width']}, {metrics}, {r['seconds']} s", flush=True)
    return report(out_dir, name, cfg, jobs)


def report(out_dir: Path, protocol_name: str, cfg: GraphConfig, jobs: list[tuple[str, str, str, int]]) -> dict:
    """Tables, plot and results.json from the runs in ``runs.jsonl`` (all or some of them).
    A dataset without runs whose files are missing is reported as not run."""
    order = {job: i for i, job in enumerate(jobs)}
    runs = sorted(read_runs(out_dir, key_of), key=lambda r: order.get(key_of(r), len(order)))
    if not runs:
        raise ConfigError(f"{out_dir / RUNS_FILE}: no runs to report yet")
    results = {"experiment": "graph-representation", "protocol_name": protocol_name,
               "quick": protocol_name == "quick", "config": asdict(cfg), "seeds": cfg.seeds, "datasets": {}}
    for name in cfg.datasets:
        dataset_runs = [r for r in runs if r["dataset"] == name]
        if not dataset_runs:
            try:
                load_planetoid(name)
            except DataError as err:
                results["datasets"][name] = {"not_run": str(err)}
                continue
        entry = {}
        for enc, (_, _, metrics) in ENCODERS.items():
            by_variant = {v: [r for r in dataset_runs if r["encoder"] == enc and r["variant"] == v] for v in VARIANTS}
            summary = {v: {"runs": len(rs), "width": format_mean_std([r["width"] for r in rs], "{:.1f}"),
                           **{m: format_mean_std([r[m] for r in rs]) for m in metrics}} for v, rs in by_variant.items()}
            entry[enc] = {"runs": by_variant, "summary": summary}
        results["datasets"][name] = entry
    expected = sum(1 for job in jobs if "not_run" not in results["datasets"][job[0]])
    results.update(complete=len(runs) >= expected, runs_done=len(runs), runs_expected=expected,
                   seconds=sum(r.get("seconds", 0.0) for r in runs))
    results["plots"] = _plot(out_dir, results)
    return write_results(out_dir, results, _markdown(results))
