"""PyTorch Geometric models as their users build them (``torch_geometric.nn.models`` and a
hand-written GraphConv net), on a random graph: default ``attach``, a few training steps
with the penalty, mixed live/dead gates, ``compact`` under ``torch.no_grad()``; the
compacted model gives the gated model's outputs, its graph convolutions are narrower, and
it saves and loads exactly (PyG's modules trusted). A budget lands on its target. What has no rule (GAT's heads,
SAGE's L2 normalisation) is refused in one line naming the layer."""
from __future__ import annotations

import copy
import functools
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from zoo_checks import assert_no_dam_state, assert_save_load_round_trip

import torchdam as dam
from torchdam.budget import TOLERANCE, Budget, WidthModel, _beta_for
from torchdam.compact import ScatterUnits
from torchdam.errors import AttachError, CheckpointError

pyg = pytest.importorskip("torch_geometric")
from torch_geometric.nn import (
    ChebConv,
    ClusterGCNConv,
    GATConv,
    GATv2Conv,
    GCNConv,
    GraphConv,
    LEConv,
    ResGatedGraphConv,
    SAGEConv,
    SGConv,
    TAGConv,
    TransformerConv,
)
from torch_geometric.nn import models as M

NODES, FEATURES, HIDDEN, CLASSES = 40, 12, 32, 4


def graph(gen: torch.Generator) -> tuple[Tensor, Tensor]:
    return torch.randn(NODES, FEATURES, generator=gen), torch.randint(0, NODES, (2, 120), generator=gen)


class GraphConvNet(nn.Module):
    """A hand-written node classifier: two GraphConv layers (max aggregation), a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = GraphConv(FEATURES, HIDDEN, aggr="max")
        self.conv2 = GraphConv(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        x = F.relu(self.conv1(x, edge_index))
        return self.head(F.relu(self.conv2(x, edge_index)))


class EdgeGATNet(nn.Module):
    """Two attention convs with edge features and residual projections (GATv2 sharing its
    source and target Linears), a Linear head; the edge features are made from the edges."""

    def __init__(self, conv: type, **options) -> None:
        super().__init__()
        self.conv1 = conv(FEATURES, 8, heads=4, edge_dim=2, residual=True, **options)
        self.conv2 = conv(32, 8, heads=2, edge_dim=2, residual=True, **options)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        edge_attr = torch.stack([edge_index[0] - edge_index[1], edge_index[0] + edge_index[1]], 1).float() / NODES
        x = F.elu(self.conv1(x, edge_index, edge_attr=edge_attr))
        return self.head(F.elu(self.conv2(x, edge_index, edge_attr=edge_attr)))


class TwoConvNet(nn.Module):
    """Two graph convs of one kind, ReLU between, a Linear head."""

    def __init__(self, conv: Callable[[int, int], nn.Module]) -> None:
        super().__init__()
        self.conv1, self.conv2 = conv(FEATURES, HIDDEN), conv(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        return self.head(F.relu(self.conv2(F.relu(self.conv1(x, edge_index)), edge_index)))


class GraphTransformerNet(nn.Module):
    """Two TransformerConv layers (4 and 2 heads of 8, root weights), a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = TransformerConv(FEATURES, 8, heads=4)
        self.conv2 = TransformerConv(32, 8, heads=2)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        return self.head(F.relu(self.conv2(F.relu(self.conv1(x, edge_index)), edge_index)))


@dataclass(frozen=True)
class Family:
    make: Callable[[], nn.Module]
    narrowed: Callable[[nn.Module], nn.Module]  # a gated graph conv / Linear of the compacted model
    name: str  # its name in the gated model


FAMILIES = {
    "gcn": Family(lambda: M.GCN(FEATURES, HIDDEN, 3, out_channels=CLASSES), lambda m: m.convs[0], "convs.0"),
    "gcn_batchnorm_jk": Family(lambda: M.GCN(FEATURES, HIDDEN, 3, out_channels=CLASSES, norm="batch_norm",
                                             jk="cat"), lambda m: m.convs[1].module, "convs.1"),
    "graphsage_mean": Family(lambda: M.GraphSAGE(FEATURES, HIDDEN, 3, out_channels=CLASSES),
                             lambda m: m.convs[0], "convs.0"),
    "graphsage_max_project": Family(lambda: M.GraphSAGE(FEATURES, HIDDEN, 2, out_channels=CLASSES, aggr="max",
                                                        project=True), lambda m: m.convs[0], "convs.0"),
    "gin": Family(lambda: M.GIN(FEATURES, HIDDEN, 3, out_channels=CLASSES), lambda m: m.convs[0].nn.lins[0],
                  "convs.0.nn.lins.0"),
    "edge_cnn": Family(lambda: M.EdgeCNN(FEATURES, HIDDEN, 2, out_channels=CLASSES),
                       lambda m: m.convs[0].nn.lins[0], "convs.0.nn.lins.0"),
    "mlp": Family(lambda: M.MLP([FEATURES, HIDDEN, HIDDEN, CLASSES]), lambda m: m.lins[0], "lins.0"),
    "graphconv_hand_written": Family(GraphConvNet, lambda m: m.conv1, "conv1"),
    "gat": Family(lambda: M.GAT(FEATURES, HIDDEN, 3, out_channels=CLASSES, heads=4), lambda m: m.convs[0], "convs.0"),
    "gatv2": Family(lambda: M.GAT(FEATURES, HIDDEN, 2, out_channels=CLASSES, heads=4, v2=True),
                    lambda m: m.convs[0], "convs.0"),
    "gat_edge_residual": Family(lambda: EdgeGATNet(GATConv), lambda m: m.conv1, "conv1"),
    "gatv2_shared_edge_residual": Family(lambda: EdgeGATNet(GATv2Conv, share_weights=True), lambda m: m.conv1,
                                         "conv1"),
    "graph_transformer": Family(GraphTransformerNet, lambda m: m.conv1, "conv1"),
    **{name: Family(functools.partial(TwoConvNet, conv), lambda m: m.conv1, "conv1") for name, conv in (
        ("cheb", functools.partial(ChebConv, K=3)), ("tag", TAGConv), ("sg", functools.partial(SGConv, K=2)),
        ("le", LEConv), ("cluster_gcn", ClusterGCNConv), ("res_gated", ResGatedGraphConv))},
}


def call(model: nn.Module, x: Tensor, edge_index: Tensor) -> Tensor:
    return model(x) if isinstance(model, M.MLP) else model(x, edge_index)


def inputs(model: nn.Module, x: Tensor, edge_index: Tensor) -> tuple:
    return (x,) if isinstance(model, M.MLP) else (x, edge_index)


@dataclass
class Compacted:
    gated: nn.Module
    small: nn.Module
    gates: dict
    example: tuple
    fresh: tuple


@functools.cache
def compacted(family: str) -> Compacted:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = FAMILIES[family].make()
    gates = dam.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for _ in range(3):
        out = call(model, *graph(gen))
        loss = F.cross_entropy(out, torch.randint(0, CLASSES, (NODES,), generator=gen)) + dam.penalty(model, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for g in gates.values():
        g.beta.data.fill_(-2.0)  # units j < 0.4 n dead
    example, fresh = inputs(model, *graph(gen)), inputs(model, *graph(gen))
    with torch.no_grad():
        small = dam.compact(model, example)
    return Compacted(model, small, gates, example, fresh)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_compacts_exactly_and_narrower(family):
    c, fam = compacted(family), FAMILIES[family]
    assert fam.name in c.gates
    c.gated.eval()
    with torch.no_grad():
        ref, got = c.gated(*c.fresh), c.small(*c.fresh)
    assert (ref - got).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    live, total = dam.widths(c.gated)[fam.name]
    assert 0 < live < total
    narrowed = fam.narrowed(c.small)
    assert getattr(narrowed, "heads", 1) * narrowed.out_channels == live
    assert not any(isinstance(m, ScatterUnits) for m in c.small.modules()) or family == "gcn_batchnorm_jk"
    assert_no_dam_state(c.small)
    before, after = dam.count(c.gated, c.fresh), dam.count(c.small, c.fresh)
    assert after["params"] < before["params"] and after["flops"] < before["flops"]


def test_graph_convs_are_gated_as_layers_and_their_own_linears_are_not():
    gates = compacted("gcn").gates
    assert sorted(gates) == ["convs.0", "convs.1"]  # convs.2 is the output layer
    assert sorted(compacted("graphsage_max_project").gates) == ["convs.0"]
    # GCNConv's bias is added after the aggregation: it shrank with the conv's rows
    conv = compacted("gcn").small.convs[0]
    assert conv.bias.shape[0] == conv.lin.weight.shape[0] == conv.lin.out_channels == conv.out_channels


def test_a_batchnorm_between_graph_convs_scatters_the_units_it_turns_into_constants():
    """A dead unit leaves BatchNorm as a constant, which a GCN's degree-weighted aggregation
    cannot take in a bias: the conv computes its live units only and they are scattered back."""
    c = compacted("gcn_batchnorm_jk")
    assert isinstance(c.small.convs[1], ScatterUnits)
    assert c.small.convs[1].module.out_channels == dam.widths(c.gated)["convs.1"][0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compacted_family_saves_and_loads_exactly(family, tmp_path):
    """PyG's classes load once trusted (``trusted_modules``); each message-passing layer's
    signature inspector is built again from its class, never read from the file."""
    c = compacted(family)
    assert_save_load_round_trip(c.small, c.fresh, tmp_path)


def test_a_graph_conv_with_message_passing_hooks_is_refused_at_save(tmp_path):
    small = copy.deepcopy(compacted("gcn").small)
    small.convs[0].register_propagate_forward_hook(lambda module, inputs, output: output)
    with pytest.raises(CheckpointError, match=r"'convs.0'.*message-passing hooks") as err:
        dam.save(small, tmp_path / "m")
    assert "\n" not in str(err.value) and not (tmp_path / "m").exists()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_width_model_prices_what_compact_gives(family):
    torch.manual_seed(0)
    model = FAMILIES[family].make()
    dam.attach(model)
    gen = torch.Generator().manual_seed(0)
    example = inputs(model, *graph(gen))
    wm = WidthModel(model, example)
    for fraction in (0.3, 0.7):
        live = [max(g.group, int(g.n * fraction) // g.group * g.group) for _, g in dam.named_gates(model)]  # whole heads
        with torch.no_grad():
            for (_, g), count in zip(dam.named_gates(model), live):
                g.beta.fill_(_beta_for(g, count))
        assert [int(g.active()) for _, g in dam.named_gates(model)] == live
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            real, dense = dam.count(dam.compact(model, example), example), dam.count(model, example)
        for metric in ("flops", "params"):  # relative: the MLP is priced per node, the graph nets per graph
            said = float(wm.relative(torch.tensor(live, dtype=torch.float64), metric))
            assert said == pytest.approx(real[metric] / dense[metric], rel=1e-9)


@pytest.mark.parametrize("make", [lambda: M.GCN(FEATURES, 64, 3, out_channels=CLASSES),
                                  lambda: M.GAT(FEATURES, 64, 3, out_channels=CLASSES, heads=8)], ids=["gcn", "gat"])
def test_budget_lands_on_a_third_of_the_flops(make):
    """GAT's gates move by whole heads of 8 features: the snap keeps whole heads."""
    torch.manual_seed(0)
    model = make()
    dam.attach(model)
    gen = torch.Generator().manual_seed(0)
    x, edge_index = graph(gen)
    y = torch.randint(0, CLASSES, (NODES,), generator=gen)
    budget, steps = Budget(flops=1 / 3), 40
    budget.bind(model, (x, edge_index), total_steps=steps)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x, edge_index), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        budget.step()
    small = dam.compact(model, (x, edge_index))
    got = dam.count(small, (x, edge_index))["flops"] / dam.count(model, (x, edge_index))["flops"]
    assert abs(got * 3 - 1) <= TOLERANCE, got
    assert all(int(g.active()) % g.group == 0 for _, g in dam.named_gates(model))
    model.eval()
    with torch.no_grad():
        assert torch.allclose(small(x, edge_index), model(x, edge_index), atol=1e-5)


@pytest.mark.parametrize("family", ["gat", "gatv2", "gat_edge_residual", "gatv2_shared_edge_residual",
                                    "graph_transformer"])
def test_attention_heads_leave_whole_and_the_attention_stays(family):
    """A head's features share one offset: the gate's width moves by whole heads, the
    compacted conv has fewer heads, every per-head weight shrank with them."""
    c, fam = compacted(family), FAMILIES[family]
    gate, conv = c.gates[fam.name], fam.narrowed(c.small)
    assert gate.group == conv.out_channels == 8 and dam.widths(c.gated)[fam.name][0] % 8 == 0
    gated = fam.narrowed(c.gated)
    assert conv.heads < gated.heads
    for name, p in conv.named_parameters():
        if name.startswith("att"):
            assert p.shape == (1, conv.heads, 8), name


def test_graph_convs_without_a_rule_are_named_when_nothing_else_is_gated():
    from torch_geometric.nn import FeaStConv

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = FeaStConv(FEATURES, 16)
            self.head = nn.Linear(16, CLASSES)

        def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
            return self.head(self.conv(x, edge_index))

    with pytest.raises(AttachError, match=re.escape("'conv' (FeaStConv)")) as err:
        dam.attach(Net())
    assert "\n" not in str(err.value) and "GCNConv" in str(err.value)


@pytest.mark.parametrize("options, why", [({"beta": True}, "beta=True"), ({"edge_dim": 2}, "edge_dim"),
                                           ({"concat": False}, "concat=False")])
def test_a_graph_transformer_the_gate_cannot_fold_into_is_refused_by_name(options, why):
    model = nn.ModuleDict({"a": TransformerConv(FEATURES, 8, heads=2, **options), "out": nn.Linear(16, CLASSES)})
    with pytest.raises(AttachError, match=f"'a'.*{re.escape(why)}"):
        dam.attach(model, layers=("a",))


def test_a_gat_averaging_its_heads_is_refused_by_name_and_skipped_by_default():
    model = nn.ModuleDict({"a": GATConv(FEATURES, 8, heads=2, concat=False), "b": GCNConv(8, 8),
                           "out": nn.Linear(8, CLASSES)})
    assert list(dam.attach(model)) == ["b"]
    dam.detach(model)
    with pytest.raises(AttachError, match="'a'.*concat=False"):
        dam.attach(model, layers=("a",))


def test_sage_with_l2_normalised_output_is_refused_by_name_and_skipped_by_default():
    model = nn.ModuleDict({"a": SAGEConv(FEATURES, HIDDEN, normalize=True), "b": GCNConv(HIDDEN, HIDDEN),
                           "out": nn.Linear(HIDDEN, CLASSES)})
    assert list(dam.attach(model)) == ["b"]
    dam.detach(model)
    with pytest.raises(AttachError, match="'a'.*normalize=True"):
        dam.attach(model, layers=("a",))


def test_trainer_prunes_a_gcn_on_a_data_object_to_a_flops_target(tmp_path):
    """Full-batch node classification as PyG users write it: the loader yields one ``Data``,
    ``forward_fn`` picks the training nodes; the budget is bound
    on the model's own call (features, edges) and lands within +-3%."""
    from torch_geometric.data import Data

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, edge_index = graph(gen)
    data = Data(x=x, edge_index=edge_index, y=(x[:, 0] > 0).long(), train_mask=torch.rand(NODES, generator=gen) < 0.7)
    model = M.GCN(FEATURES, 64, 3, out_channels=2)
    dam.attach(model)
    config = dam.TrainConfig(epochs=30, lr=0.01, optimizer="adam", target_flops=1 / 3, batch_size=1)
    trainer = dam.Trainer(model, config, out_dir=tmp_path,
                          forward_fn=lambda m, d: (m(d.x, d.edge_index)[d.train_mask], d.y[d.train_mask]))
    trainer.fit([data])
    small = dam.compact(model, (x, edge_index))
    got = dam.count(small, (x, edge_index))["flops"] / dam.count(model, (x, edge_index))["flops"]
    assert abs(got * 3 - 1) <= TOLERANCE, got
