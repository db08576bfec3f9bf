"""``python -m reproduce graph-representation``: DAM on graph embeddings (docs/METHOD.md section 3.4).

The paper names the experiment but published no setup; ours (stated in results.md):

- **GAE** (Kipf & Welling 2016): GCN(F, 128) + ReLU -> GCN(128, 64) -> DAM(64) -> inner
  product decoder; 85/5/10% link split (``RandomLinkSplit``), Adam 0.01, negative sampling
  each step. Metric: test link-prediction AUC / AP.
- **DGI** (Velickovic et al. 2019): GCN(F, 512) + PReLU -> DAM(512); mean-sigmoid summary,
  bilinear discriminator, feature-shuffling corruption; Adam 0.001. Metric: accuracy of a
  logistic-regression probe trained on the 140/120 Planetoid training nodes' embeddings,
  scored on the 1000 test nodes.

Each encoder is trained with DAM, without DAM at full width, and without DAM at the width
DAM found (per seed). The gate is one :class:`~torchdam.gates.DAMGate` on the embedding;
its beta has its own Adam learning rate and no weight decay (:func:`torchdam.dam_param_groups`),
the loss adds the penalty (:class:`torchdam.DAMPolicy`). PubMed is not available offline and is reported as not
run. Data: :mod:`reproduce.data.planetoid`.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from torchdam.atomic import write_atomic  # noqa: E402
from reproduce.data.planetoid import PlanetoidGraph, load_planetoid  # noqa: E402
from torchdam.errors import DataError  # noqa: E402
from reproduce import EXPERIMENTS  # noqa: E402
from reproduce.common import format_mean_std, save_figure  # noqa: E402
from torchdam.gates import DAMGate  # noqa: E402
from torchdam.train import DAMPolicy, dam_param_groups  # noqa: E402

DATASETS = ("cora", "citeseer", "pubmed")


@dataclass(frozen=True)
class GraphConfig:
    """Defaults = what 2 shared CPU cores afforded (see docs/reproduction); DGI's paper
    width is 512 (``dgi_dim=512``)."""

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


FULL = GraphConfig()
QUICK = replace(FULL, seeds=1, datasets=("cora",), gae_epochs=10, dgi_epochs=5, dgi_dim=32)


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


def _markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [
        "# Graph representation learning with a DAM gate on the embedding", "",
        f"Seeds: {results['seeds']}. GAE: {cfg['gae_epochs']} epochs, width {cfg['gae_dim']}, lambda "
        f"{cfg['gae_lam']}; DGI: {cfg['dgi_epochs']} epochs, width {cfg['dgi_dim']}, lambda {cfg['dgi_lam']}; "
        f"beta lr {cfg['beta_lr']}. Mean +- std over seeds.", "",
        "| dataset | encoder | variant | width | metric(s) |", "|---|---|---|---|---|",
    ]
    for name, r in results["datasets"].items():
        if "not_run" in r:
            lines.append(f"| {name} | - | not run | - | {r['not_run']} |")
            continue
        for enc, variants in r.items():
            for variant, s in variants["summary"].items():
                metrics = ", ".join(f"{m} {v}" for m, v in s.items() if m != "width")
                lines.append(f"| {name} | {enc} | {variant} | {s['width']} | {metrics} |")
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
        ax.legend()
    save_figure(fig, out_dir / "graph_width.png", dpi=90)
    return ["graph_width.png"]


@EXPERIMENTS.register("graph-representation")
def run(out_dir: Path, quick: bool = False, seeds: int | None = None) -> dict:
    """GAE and DGI, each with DAM / dense full width / dense at DAM's width."""
    cfg = QUICK if quick else FULL
    if seeds is not None:
        cfg = replace(cfg, seeds=seeds)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"experiment": "graph-representation", "config": asdict(cfg), "seeds": cfg.seeds, "datasets": {}}
    start = time.perf_counter()
    for name in cfg.datasets:
        try:
            g = load_planetoid(name)
        except DataError as err:
            if name != "pubmed":
                raise
            results["datasets"][name] = {"not_run": str(err)}
            continue
        entry = {}
        for enc, (train_fn, dim_attr, metrics) in ENCODERS.items():
            full = getattr(cfg, dim_attr)
            runs = {"DAM": [], "dense full width": [], "dense at DAM width": []}
            for seed in tqdm(range(cfg.seeds), desc=f"{enc} {name}", disable=None if not quick else True):
                dam = train_fn(g, full, True, seed, cfg, not quick)
                runs["DAM"].append(dam)
                runs["dense full width"].append(train_fn(g, full, False, seed, cfg, not quick))
                runs["dense at DAM width"].append(train_fn(g, max(1, dam["width"]), False, seed, cfg, not quick))
            summary = {v: {"width": format_mean_std([r["width"] for r in rs], "{:.1f}"),
                           **{m: format_mean_std([r[m] for r in rs]) for m in metrics}} for v, rs in runs.items()}
            entry[enc] = {"runs": runs, "summary": summary}
        results["datasets"][name] = entry
    results["seconds"] = time.perf_counter() - start
    results["plots"] = _plot(out_dir, results)
    write_atomic(out_dir / "results.json", json.dumps(results, indent=1), "the results")
    write_atomic(out_dir / "results.md", _markdown(results), "the results")
    return results
