"""graph-representation and recommendation experiments: quick runs through the CLI, and
the pieces they are built from."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from reproduce.__main__ import main
from torchdam.errors import DataError
from reproduce.igmc_model import BasisRGCNConv
from reproduce.igmc_subgraphs import extract


@pytest.mark.parametrize("name, files", [
    ("graph-representation", ["graph_width.png"]),
    ("recommendation", ["igmc_width.png", "igmc_rmse.png"]),
])
def test_quick_reproduce_through_the_cli(name, files, tmp_path, monkeypatch):
    from reproduce.data.planetoid import load_planetoid
    from reproduce.data.ratings import load_ratings

    try:
        load_planetoid("cora") if name == "graph-representation" else load_ratings("yahoo_music")
    except DataError as err:
        if os.environ.get("CI"):  # CI has ../shared: missing data there is a failure
            raise
        pytest.skip(str(err))
    monkeypatch.setenv("TORCHDAM_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main([name, "--quick", "--out", str(out)])
    assert exc.value.code == 0
    for f in ["results.json", "results.md", *files]:
        assert (out / f).is_file(), f
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == name
    assert "|---" in (out / "results.md").read_text()


def test_basis_rgcn_matches_torch_geometric():
    from torch_geometric.nn import RGCNConv

    torch.manual_seed(0)
    ref, ours = RGCNConv(4, 8, 7, num_bases=4), BasisRGCNConv(4, 8, 7, 4)
    ours.load_state_dict(ref.state_dict())
    x, edges, types = torch.randn(30, 4), torch.randint(0, 30, (2, 120)), torch.randint(0, 7, (120,))
    torch.testing.assert_close(ours(x, edges, types), ref(x, edges, types), atol=1e-5, rtol=1e-5)


def test_subgraph_extraction_on_a_toy_matrix():
    # users 0,1,2 x items 0,1,2; ratings as types
    users, items, types = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 0, 2, 2]), np.array([0, 1, 2, 3, 4])
    s = extract(users, items, types, 3, 3, np.array([0]), np.array([0]), np.array([5.0]), progress=False)
    # target (0,0): users = 0 + raters of item 0 (1); items = 0 + items of user 0 (1)
    assert (s.num_users[0], s.num_items[0]) == (2, 2)
    edges = set(zip(s.edge_user.tolist(), s.edge_item.tolist(), s.edge_type.tolist()))
    assert edges == {(0, 1, 1), (1, 0, 2)}  # (0,0) itself removed; (1,2) outside the subgraph
    b = s.batch(np.array([0, 0]))
    assert b.x.shape == (8, 4) and b.edge_index.shape == (2, 8)
    assert b.user_index.tolist() == [0, 4] and b.item_index.tolist() == [2, 6]
    assert b.x.argmax(1).tolist() == [0, 2, 1, 3] * 2
