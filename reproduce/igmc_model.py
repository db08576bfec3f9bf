"""IGMC (Zhang & Chen, ICLR 2020) and IGMC-DAM (docs/METHOD.md section 3.3).

Four relational graph convolutions (32 units, tanh) over a batch of enclosing subgraphs;
the target user's and item's states of all layers are concatenated (2 x 128 = 256) ->
Linear(256, 128) + ReLU -> dropout 0.5 (IGMC) or a DAM gate over the 128 units (IGMC-DAM)
-> Linear(128, 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn.inits import glorot, zeros
from torch_geometric.utils import dropout_edge

from reproduce.igmc_subgraphs import NUM_LABELS, SubgraphBatch


class BasisRGCNConv(nn.Module):
    """``torch_geometric.nn.RGCNConv(in, out, num_relations, num_bases)`` (mean aggregation
    per relation, root weight, bias), same parameters and outputs, but vectorised over
    relations: PyG's version runs one message pass per relation type, which on CPU is ~70x
    slower for YahooMusic's 71 rating levels. ``tests/lab/test_reproduce_graph_igmc.py``
    checks the two agree on a state dict loaded into both."""

    def __init__(self, in_channels: int, out_channels: int, num_relations: int, num_bases: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_relations, self.num_bases = num_relations, num_bases
        self.weight = nn.Parameter(torch.empty(num_bases, in_channels, out_channels))
        self.comp = nn.Parameter(torch.empty(num_relations, num_bases))
        self.root = nn.Parameter(torch.empty(in_channels, out_channels))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        glorot(self.weight)
        glorot(self.comp)
        glorot(self.root)
        zeros(self.bias)

    def relation_weights(self) -> Tensor:
        """Per-relation weights ``(R, in, out)`` = comp @ bases."""
        return (self.comp @ self.weight.view(self.num_bases, -1)).view(
            self.num_relations, self.in_channels, self.out_channels)

    def forward(self, x: Tensor, edge_index: Tensor, edge_type: Tensor) -> Tensor:
        src, dst = edge_index
        n = x.shape[0]
        # x through each basis (N, B, out); an edge mixes its source's rows by comp[type].
        # Elementwise, not einsum: that becomes a batched matmul of E tiny (1 x B) products.
        per_base = (x @ self.weight.permute(1, 0, 2).reshape(self.in_channels, -1)).view(n, self.num_bases, -1)
        messages = (self.comp[edge_type].unsqueeze(-1) * per_base[src]).sum(1)
        group = dst * self.num_relations + edge_type
        count = torch.bincount(group, minlength=n * self.num_relations).clamp_(min=1)
        messages = messages / count[group].unsqueeze(1).to(messages.dtype)
        out = torch.zeros(n, self.out_channels, dtype=x.dtype, device=x.device).index_add_(0, dst, messages)
        return out + x @ self.root + self.bias


class IGMC(nn.Module):
    """IGMC regression head over :class:`SubgraphBatch` inputs.

    Args:
        num_relations: rating levels (edge types).
        dam: put a DAM gate on ``lin1``'s 128 units instead of dropout (IGMC-DAM); the gate
            is attached by the caller with :func:`torchdam.attach` (``layers=("lin1",)``),
            so here ``dam`` only turns dropout off.
    """

    def __init__(self, num_relations: int, latent: tuple[int, ...] = (32, 32, 32, 32), num_bases: int = 4,
                 hidden: int = 128, adj_dropout: float = 0.2, dropout: float = 0.5) -> None:
        super().__init__()
        dims = (NUM_LABELS, *latent)
        self.convs = nn.ModuleList(BasisRGCNConv(a, b, num_relations, num_bases) for a, b in zip(dims, dims[1:]))
        self.lin1 = nn.Linear(2 * sum(latent), hidden)
        self.lin2 = nn.Linear(hidden, 1)
        self.adj_dropout, self.dropout = adj_dropout, dropout

    def forward(self, batch: SubgraphBatch) -> Tensor:
        edge_index, edge_type = batch.edge_index, batch.edge_type
        if self.training and self.adj_dropout > 0:
            edge_index, kept = dropout_edge(edge_index, p=self.adj_dropout, training=True)
            edge_type = edge_type[kept]
        x, states = batch.x, []
        for conv in self.convs:
            x = torch.tanh(conv(x, edge_index, edge_type))
            states.append(x)
        h = torch.cat(states, 1)
        h = torch.cat([h[batch.user_index], h[batch.item_index]], 1)
        h = F.relu(self.lin1(h))
        h = F.dropout(h, p=self.dropout, training=self.training)
        return self.lin2(h)[:, 0]

    def adjacent_rating_penalty(self) -> Tensor:
        """IGMC's ARR: sum over layers of ||W_{r+1} - W_r||^2 between adjacent rating levels."""
        total = torch.zeros((), device=self.lin1.weight.device)
        for conv in self.convs:
            w = conv.relation_weights()
            total = total + ((w[1:] - w[:-1]) ** 2).sum()
        return total
