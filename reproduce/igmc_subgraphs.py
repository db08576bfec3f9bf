"""IGMC's 1-hop enclosing subgraphs (Zhang & Chen, ICLR 2020), extracted fast and cached.

For a target pair (u, v) the subgraph holds u, v, the users who rated v and the items u
rated (at most ``max_nodes_per_hop`` of each, sampled), and every training rating among
them except (u, v) itself; an edge's type is its rating level. Node labels (one-hot, 4):
target user 0, target item 1, other users 2, other items 3.

Extraction is vectorised numpy over CSR arrays (no per-subgraph scipy indexing and no
``torch_geometric.data.Data`` objects); the result for a whole split is a handful of flat
arrays, saved as one ``.npz`` keyed by everything that determines it, and batches are cut
from those arrays by offset arithmetic.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from torchdam.data.paths import cache_dir

NUM_LABELS = 4  # target user, target item, neighbour user, neighbour item
_FORMAT = 1


class Csr:
    """Row-compressed adjacency: row r's columns are ``indices[indptr[r]:indptr[r+1]]``."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, num_rows: int) -> None:
        order = np.lexsort((cols, rows))
        self.indices = cols[order].astype(np.int64)
        self.values = values[order].astype(np.int64)
        self.indptr = np.zeros(num_rows + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=num_rows), out=self.indptr[1:])

    def row(self, r: int) -> np.ndarray:
        return self.indices[self.indptr[r]:self.indptr[r + 1]]

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(position in rows, entry id)`` of every entry of ``rows``, without a Python loop."""
        starts, lengths = self.indptr[rows], self.indptr[rows + 1] - self.indptr[rows]
        owner = np.repeat(np.arange(len(rows)), lengths)
        first = np.repeat(np.cumsum(lengths) - lengths, lengths)
        return owner, np.repeat(starts, lengths) + np.arange(lengths.sum()) - first


@dataclass
class SubgraphSet:
    """Subgraphs of many target pairs in flat arrays. Graph g has ``num_users[g]`` user
    nodes then ``num_items[g]`` item nodes (local ids); its edges are
    ``edge_*[edge_ptr[g]:edge_ptr[g+1]]`` (user local id, item local id, type)."""

    num_users: np.ndarray
    num_items: np.ndarray
    edge_ptr: np.ndarray
    edge_user: np.ndarray
    edge_item: np.ndarray
    edge_type: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, ids: np.ndarray) -> "SubgraphBatch":
        """Stack graphs ``ids`` into one disjoint graph, both edge directions included."""
        nu, ni = self.num_users[ids], self.num_items[ids]
        sizes = nu + ni
        node_ptr = np.cumsum(sizes) - sizes
        counts = self.edge_ptr[ids + 1] - self.edge_ptr[ids]
        owner = np.repeat(np.arange(len(ids)), counts)
        eid = np.repeat(self.edge_ptr[ids], counts) + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        src = self.edge_user[eid] + node_ptr[owner]
        dst = self.edge_item[eid] + nu[owner] + node_ptr[owner]
        etype = self.edge_type[eid]
        # labels: first user node = target user (0), first item node = target item (1)
        graph = np.repeat(np.arange(len(ids)), sizes)
        local = np.arange(sizes.sum()) - node_ptr[graph]
        is_item = local >= nu[graph]
        label = np.where(is_item, 3, 2)
        label[node_ptr] = 0
        label[node_ptr + nu] = 1
        return SubgraphBatch(
            x=torch.nn.functional.one_hot(torch.from_numpy(label), NUM_LABELS).float(),
            edge_index=torch.from_numpy(np.stack([np.concatenate([src, dst]), np.concatenate([dst, src])])),
            edge_type=torch.from_numpy(np.concatenate([etype, etype])),
            user_index=torch.from_numpy(node_ptr),
            item_index=torch.from_numpy(node_ptr + nu),
            y=torch.from_numpy(self.targets[ids]).float(),
        )

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **{k: getattr(self, k) for k in self.__dataclass_fields__})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "SubgraphSet":
        with np.load(path) as f:
            return cls(**{k: f[k] for k in cls.__dataclass_fields__})


@dataclass
class SubgraphBatch:
    x: Tensor
    edge_index: Tensor
    edge_type: Tensor
    user_index: Tensor
    item_index: Tensor
    y: Tensor

    def to(self, device, non_blocking: bool = False) -> "SubgraphBatch":
        return SubgraphBatch(*(getattr(self, k).to(device, non_blocking=non_blocking)
                               for k in self.__dataclass_fields__))


def _sample(nodes: np.ndarray, exclude: int, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    nodes = nodes[nodes != exclude]
    if cap is not None and len(nodes) > cap:
        nodes = rng.choice(nodes, cap, replace=False)
    return nodes


def extract(
    users: np.ndarray, items: np.ndarray, types: np.ndarray, num_users: int, num_items: int,
    target_users: np.ndarray, target_items: np.ndarray, targets: np.ndarray,
    max_nodes_per_hop: int | None = None, seed: int = 0, progress: bool = True,
) -> SubgraphSet:
    """Subgraphs of the target pairs in the graph of training ratings (users, items, types)."""
    by_user = Csr(users, items, types, num_users)
    by_item = Csr(items, users, types, num_items)
    rng = np.random.default_rng(seed)
    item_pos = np.full(num_items, -1, np.int64)
    parts: dict[str, list] = {k: [] for k in ("nu", "ni", "ne", "eu", "ei", "et")}
    for u, v in tqdm(zip(target_users.tolist(), target_items.tolist()), total=len(target_users),
                     desc="subgraphs", leave=False, disable=None if progress else True):
        u_nodes = np.concatenate([[u], _sample(by_item.row(v), u, max_nodes_per_hop, rng)])
        v_nodes = np.concatenate([[v], _sample(by_user.row(u), v, max_nodes_per_hop, rng)])
        item_pos[v_nodes] = np.arange(len(v_nodes))
        owner, entry = by_user.gather(u_nodes)
        local_item = item_pos[by_user.indices[entry]]
        keep = (local_item >= 0) & ~((owner == 0) & (local_item == 0))  # drop the target edge
        item_pos[v_nodes] = -1
        parts["nu"].append(len(u_nodes))
        parts["ni"].append(len(v_nodes))
        parts["ne"].append(int(keep.sum()))
        parts["eu"].append(owner[keep])
        parts["ei"].append(local_item[keep])
        parts["et"].append(by_user.values[entry[keep]])
    edge_ptr = np.zeros(len(target_users) + 1, np.int64)
    np.cumsum(parts["ne"], out=edge_ptr[1:])
    cat = lambda key: np.concatenate(parts[key]).astype(np.int64) if parts[key] else np.zeros(0, np.int64)  # noqa: E731
    return SubgraphSet(
        num_users=np.asarray(parts["nu"], np.int64), num_items=np.asarray(parts["ni"], np.int64),
        edge_ptr=edge_ptr, edge_user=cat("eu"), edge_item=cat("ei"), edge_type=cat("et"),
        targets=np.asarray(targets, np.float32),
    )


def cached_extract(key: dict, progress: bool = True, **kwargs) -> tuple[SubgraphSet, bool]:
    """:func:`extract` through an on-disk cache; ``key`` must name everything the arrays
    depend on besides ``kwargs`` (which are hashed too). Returns (set, came from cache)."""
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    for name in sorted(kwargs):
        value = kwargs[name]
        h.update(name.encode())
        h.update(np.ascontiguousarray(value).tobytes() if isinstance(value, np.ndarray) else repr(value).encode())
    path = cache_dir() / "igmc" / f"v{_FORMAT}-{h.hexdigest()[:24]}.npz"
    if path.is_file():
        try:
            return SubgraphSet.load(path), True
        except (OSError, ValueError, KeyError):
            pass  # a truncated cache file: rebuild it
    subgraphs = extract(progress=progress, **kwargs)
    subgraphs.save(path)
    return subgraphs, False
