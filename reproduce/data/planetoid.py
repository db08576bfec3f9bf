"""Cora / CiteSeer / PubMed in the Planetoid ``ind.*`` format (Yang et al., ICML 2016), offline.

``torch_geometric.datasets.Planetoid`` downloads; this reads the same files from a local
folder. The ``x, y, tx, ty, allx, ally, graph`` files are Python pickles (scipy sparse
matrices, numpy arrays, a dict of adjacency lists). Unpickling can run code, so a file is
unpickled only when its sha256 is one of :data:`PLANETOID_SHA256` (the copies listed in
``../shared/data/README.md``); anything else raises :class:`~torchdam.errors.DataError`.

Folder: ``root=``, else ``$TORCHDAM_DATA_DIR/planetoid``, else ``../shared/data/planetoid``
next to the repository.

>>> g = load_planetoid("cora")  # doctest: +SKIP
>>> g.x.shape, g.edge_index.shape, int(g.test_mask.sum())  # doctest: +SKIP
(torch.Size([2708, 1433]), torch.Size([2, 10556]), 1000)
"""
from __future__ import annotations

import hashlib
import io
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from torchdam.data.paths import DATA_DIR_ENV, data_dir
from torchdam.errors import DataError

NAMES = ("cora", "citeseer", "pubmed")
_PICKLED = ("x", "y", "tx", "ty", "allx", "ally", "graph")

#: sha256 of the files we agree to unpickle (github.com/kimiyoung/planetoid @ af6abf4).
PLANETOID_SHA256: dict[str, str] = {
    "ind.citeseer.allx": "2ac30345d95c9ec933a817ee0bdd6a5f077f8c184a20e696910192d534414668",
    "ind.citeseer.ally": "f704b2d986dde6c2669934de1f3ae5696a6cf9455c0f6b2646a2d135ea0a1c95",
    "ind.citeseer.graph": "d79a4ef9d3e7169aee8946145f6b7306e35bc79bffad26346cfb94e10e9912a7",
    "ind.citeseer.test.index": "2af990671580b6b2df5d158d1038f8292e30c9cd821b5453f399659b25b723d4",
    "ind.citeseer.tx": "539a8906a2da97628d212f2fdd668c109a8b3f0d36574b59e5d3fd5b5303da21",
    "ind.citeseer.ty": "55e5bd1ba1e733a04598753ad1a8d57957f4b8f89e74519f41f4f4938767e4ce",
    "ind.citeseer.x": "d20de19150741e555de0ed037195630fc194114ebc7fd72ced62810148aa22f6",
    "ind.citeseer.y": "8ba87e515d8e3ee3cf52f6d2c5b86aa73f11ecad825a808455209ec26cd54924",
    "ind.cora.allx": "9419ba2f26f5c35243db64aba110e0f35a04851609e0dc5433450676ca6b8543",
    "ind.cora.ally": "2b998f5cc7fedc86e7f97ca2498f47a1ffc1462c29e2d578b23bf3f62b6e7d71",
    "ind.cora.graph": "58f13302f39dde8852dad6fe6d15b89b077b6d7f837626bce671ef80344b383d",
    "ind.cora.test.index": "297ce89af2b51a6a194181c7dbe1796c6a1cf9cd9349a88383b1b1e227867875",
    "ind.cora.tx": "b9afbaa4a400df991f6f02ef677e1e44da55ffc04801fd02f9e673987829226a",
    "ind.cora.ty": "41f5ac76596a1699cc33f53084a2419e92961c42bb75f36fc38e616d348532ad",
    "ind.cora.x": "23cfa55d91c6f624233f5eb7b6e3f141f1bd2b2ae39608a63cf5d084bb27baab",
    "ind.cora.y": "94465c14eb53e04ca262198dcbb2521ee8af60fb3f3d546cd6ca24a511b0e7d1",
}


@dataclass
class PlanetoidGraph:
    """One citation graph with the standard Planetoid split.

    ``x`` float32 (N, F) bag-of-words, ``y`` int64 (N,), ``edge_index`` int64 (2, E): both
    directions of every undirected edge, duplicates and self-loops removed (as
    torch_geometric's Planetoid). ``num_adjacency_entries`` counts the raw adjacency lists.
    """

    name: str
    x: Tensor
    y: Tensor
    edge_index: Tensor
    train_mask: Tensor
    val_mask: Tensor
    test_mask: Tensor
    num_classes: int
    num_adjacency_entries: int

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]


def planetoid_root(root: str | Path | None = None) -> Path:
    return Path(root) if root is not None else data_dir() / "planetoid"


def _read_verified(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(
            f"Planetoid file {path} is missing; copy the ind.* files there, or point "
            f"root= or ${DATA_DIR_ENV} at a folder holding planetoid/"
        )
    raw = path.read_bytes()
    expected = PLANETOID_SHA256.get(path.name)
    digest = hashlib.sha256(raw).hexdigest()
    if expected is None or digest != expected:
        raise DataError(
            f"refusing to unpickle {path}: its sha256 {digest} is not the pinned "
            f"{expected or '(no pinned sha256 for this file name)'}; replace it with the original file"
        )
    return raw


def _unpickle(path: Path):
    # Safe only because _read_verified pinned the exact bytes (see module docstring).
    raw = _read_verified(path)
    with warnings.catch_warnings():  # the 2016 pickles name scipy.sparse.csr.csr_matrix
        warnings.simplefilter("ignore", DeprecationWarning)
        return pickle.load(io.BytesIO(raw), encoding="latin1")


def _dense(a) -> np.ndarray:
    return np.asarray(a.todense() if hasattr(a, "todense") else a, dtype=np.float32)


def load_planetoid(name: str, root: str | Path | None = None) -> PlanetoidGraph:
    """Read ``ind.<name>.*`` like Kipf & Welling's / torch_geometric's reader: test nodes are
    put back in place by ``test.index``; CiteSeer's isolated test nodes get zero features
    and label 0 and are outside every mask. Train = the labelled ``x`` nodes (20 per class),
    val = the next 500, test = the 1000 test nodes."""
    name = name.lower()
    if name not in NAMES:
        raise DataError(f"unknown Planetoid dataset {name!r}; choose one of: {', '.join(NAMES)}")
    folder = planetoid_root(root)
    if name == "pubmed" and not (folder / "ind.pubmed.x").exists():
        raise DataError(f"PubMed is not available offline: {folder / 'ind.pubmed.allx'} is missing")
    parts = {key: _unpickle(folder / f"ind.{name}.{key}") for key in _PICKLED}
    index_path = folder / f"ind.{name}.test.index"
    test_index = np.array(_read_verified(index_path).decode().split(), dtype=np.int64)
    test_range = np.sort(test_index)

    tx, ty = _dense(parts["tx"]), _dense(parts["ty"])
    if name == "citeseer":  # isolated test nodes are missing from tx/ty: pad with zeros
        full = np.arange(test_range.min(), test_range.max() + 1)
        tx_full = np.zeros((len(full), tx.shape[1]), np.float32)
        ty_full = np.zeros((len(full), ty.shape[1]), np.float32)
        tx_full[test_range - test_range.min()] = tx
        ty_full[test_range - test_range.min()] = ty
        tx, ty = tx_full, ty_full
    x = np.concatenate([_dense(parts["allx"]), tx])
    labels = np.concatenate([_dense(parts["ally"]), ty])
    x[test_index], labels[test_index] = x[test_range], labels[test_range]

    graph: dict = parts["graph"]
    num_nodes = x.shape[0]
    src = np.concatenate([np.full(len(v), k, np.int64) for k, v in graph.items()])
    dst = np.concatenate([np.asarray(v, np.int64) for v in graph.values()])
    pairs = np.concatenate([np.stack([src, dst]), np.stack([dst, src])], axis=1)
    pairs = pairs[:, pairs[0] != pairs[1]]
    keys = np.unique(pairs[0] * num_nodes + pairs[1])
    edge_index = torch.from_numpy(np.stack([keys // num_nodes, keys % num_nodes]))

    def mask(idx) -> Tensor:
        m = torch.zeros(num_nodes, dtype=torch.bool)
        m[torch.as_tensor(idx)] = True
        return m

    n_train = parts["y"].shape[0]
    return PlanetoidGraph(
        name=name,
        x=torch.from_numpy(x),
        y=torch.from_numpy(labels.argmax(1).astype(np.int64)),
        edge_index=edge_index,
        train_mask=mask(np.arange(n_train)),
        val_mask=mask(np.arange(n_train, n_train + 500)),
        test_mask=mask(test_range),
        num_classes=labels.shape[1],
        num_adjacency_entries=int(sum(len(v) for v in graph.values())),
    )
