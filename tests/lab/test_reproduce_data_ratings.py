"""Rating readers: Monti .mat splits (h5py) and MovieLens-100K u1 (recbole's file)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from reproduce.data.ratings import DATA_DIR_ENV, load_monti, load_movielens100k, load_ratings
from torchdam.errors import DataError


def _load_or_skip(name: str):
    try:
        return load_ratings(name)
    except DataError as err:
        if os.environ.get("CI"):  # CI has ../shared and recbole: missing data there is a failure
            raise
        pytest.skip(str(err))


@pytest.mark.parametrize("name, total, train, test, levels, lo, hi", [
    ("douban", 136891, 123202, 13689, 5, 1.0, 5.0),
    ("flixster", 26173, 23556, 2617, 10, 0.5, 5.0),
    ("yahoo_music", 5335, 4802, 533, None, 1.0, 100.0),
])
def test_monti_counts_match_the_data_readme(name, total, train, test, levels, lo, hi):
    d = _load_or_skip(name)
    assert (d.num_users, d.num_items) == (3000, 3000)
    assert (len(d.train_ratings), len(d.test_ratings)) == (train, test)
    assert len(d.train_ratings) + len(d.test_ratings) == total
    if levels is not None:
        assert len(d.rating_values) == levels
    assert min(d.rating_values) >= lo and max(d.rating_values) <= hi
    train_pairs = set(zip(d.train_users.tolist(), d.train_items.tolist()))
    assert not train_pairs & set(zip(d.test_users.tolist(), d.test_items.tolist()))
    types = d.rating_type(d.train_ratings)
    assert np.array_equal(np.asarray(d.rating_values, np.float32)[types], d.train_ratings)


def test_movielens_u1_split():
    d = _load_or_skip("ml_100k")
    assert (d.num_users, d.num_items) == (943, 1682)
    assert (len(d.train_ratings), len(d.test_ratings)) == (80000, 20000)
    assert d.rating_values == (1.0, 2.0, 3.0, 4.0, 5.0)
    # first row of u.data / ml-100k.inter: user 196, item 242, rating 3 -> u1.test
    assert (d.test_users[0], d.test_items[0], d.test_ratings[0]) == (195, 241, 3.0)


def test_missing_and_tampered_files(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(DataError, match="douban.*training_test_dataset.mat"):
        load_monti("douban")
    bad = tmp_path / "ml-100k.inter"
    bad.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t5\t0\n")
    with pytest.raises(DataError, match="sha256"):
        load_movielens100k(path=bad)
