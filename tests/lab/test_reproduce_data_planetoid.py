"""Planetoid ind.* reader: counts from ../shared/data/README.md, sha256 refusal."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from reproduce.data.planetoid import DATA_DIR_ENV, PLANETOID_SHA256, load_planetoid, planetoid_root
from torchdam.errors import DataError


def _load_or_skip(name: str, **kwargs):
    try:
        return load_planetoid(name, **kwargs)
    except DataError as err:
        if os.environ.get("CI"):  # CI has ../shared beside the clone: missing data is a failure
            raise
        pytest.skip(str(err))


@pytest.mark.parametrize("name, nodes, features, classes, entries, edges, train", [
    ("cora", 2708, 1433, 7, 10858, 10556, 140),
    ("citeseer", 3327, 3703, 6, 9464, 9104, 120),
])
def test_counts_match_the_data_readme(name, nodes, features, classes, entries, edges, train):
    g = _load_or_skip(name)
    assert g.x.shape == (nodes, features) and g.x.dtype == torch.float32
    assert g.y.shape == (nodes,) and g.num_classes == classes and int(g.y.max()) == classes - 1
    assert g.num_adjacency_entries == entries
    assert g.edge_index.shape == (2, edges)  # both directions, deduplicated, no self-loops
    assert not bool((g.edge_index[0] == g.edge_index[1]).any())
    reverse = set(map(tuple, g.edge_index.flip(0).t().tolist()))
    assert reverse == set(map(tuple, g.edge_index.t().tolist()))
    assert int(g.train_mask.sum()) == train and int(g.val_mask.sum()) == 500 and int(g.test_mask.sum()) == 1000
    assert not bool((g.train_mask & g.test_mask).any())


def test_refuses_a_tampered_pickle(tmp_path):
    src = planetoid_root()
    if not (src / "ind.cora.x").exists():
        assert not os.environ.get("CI"), f"no Planetoid copy at {src}"
        pytest.skip(f"no Planetoid copy at {src}")
    copy = tmp_path / "planetoid"
    shutil.copytree(src, copy)
    (copy / "ind.cora.x").write_bytes((copy / "ind.cora.x").read_bytes() + b"\x00")
    with pytest.raises(DataError, match="refusing to unpickle .*ind.cora.x"):
        load_planetoid("cora", root=copy)
    assert load_planetoid("citeseer", root=copy).num_nodes == 3327  # untouched files still load


def test_env_var_and_missing_files(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert planetoid_root() == tmp_path / "planetoid"
    with pytest.raises(DataError, match="ind.cora"):
        load_planetoid("cora")
    with pytest.raises(DataError, match="PubMed is not available offline"):
        load_planetoid("pubmed")
    with pytest.raises(DataError, match="unknown Planetoid"):
        load_planetoid("reddit")


def test_pins_cover_every_pickled_file():
    for name in ("cora", "citeseer"):
        for part in ("x", "y", "tx", "ty", "allx", "ally", "graph", "test.index"):
            assert f"ind.{name}.{part}" in PLANETOID_SHA256
