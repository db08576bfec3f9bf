"""CIFAR-10 (JPEG copy) as raw uint8 arrays, read offline, plus crop+flip augmentation.

The images come from ``cifar10-jpeg.zip`` in the project's shared data folder (see
``../shared/data/README.md``): the 60,000 CIFAR-10 images saved as JPEG, one folder per
class. JPEG is lossy, so accuracies on this copy are not directly comparable with
published CIFAR-10 numbers; we call it "CIFAR-10 (JPEG copy)" wherever we report it.

The zip is pinned by its sha256. Decoding 60,000 JPEGs takes a while on 2 cores, so the
decoded arrays are cached as ``.npy`` files under ``~/.cache/torchdam/`` in a folder named
after that sha256: a different zip can never be served from a stale cache. Beside them,
``sha256.json`` records each decoded array's sha256 (written last); a cache whose arrays
do not match it (edited labels, zeroed images, a missing or partial file) is decoded again
from the zip, with a warning.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from torchdam.data.mnist import ImageArrays, _read_only
from torchdam.data.paths import DATA_DIR_ENV, cache_dir, data_dir
from torchdam.errors import DataError

DISPLAY_NAME = "CIFAR-10 (JPEG copy)"
ZIP_NAME = "cifar10/cifar10-jpeg.zip"
ZIP_SHA256 = "f7625fc6a42ead0a462a6e36eb4b53cc89da86f36a0e011313c8c9a582622870"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel statistics of this JPEG copy's training images, measured on all 50,000
# (README; canonical CIFAR-10: mean 0.4914/0.4822/0.4465, std 0.2470/0.2435/0.2616).
MEAN = (0.4913, 0.4821, 0.4465)
STD = (0.2452, 0.2428, 0.2606)
# The zip is sorted by class and file name; this fixed seed gives every run the same order.
SHUFFLE_SEED = 0
_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
MANIFEST = "sha256.json"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cifar10_arrays(root: str | os.PathLike | None = None, *, sha256: str = ZIP_SHA256) -> dict[str, np.ndarray]:
    """CIFAR-10 (JPEG copy): ``train_images`` (50000, 3, 32, 32) and ``test_images``
    (10000, 3, 32, 32) uint8 in N, C, H, W order, int64 labels in :data:`CLASSES` order.

    Both sets are shuffled with a fixed seed (the zip is sorted by class). ``root`` is
    the shared data folder holding ``cifar10/cifar10-jpeg.zip``; a zip whose sha256 is
    not ``sha256`` is refused. Arrays are cached on disk and per process, read-only.
    """
    path = data_dir(root) / ZIP_NAME
    if not path.is_file():
        raise DataError(
            f"CIFAR-10 needs {path}; set {DATA_DIR_ENV} to the shared data folder holding "
            f"{ZIP_NAME} (or pass root=)")
    digest = sha256_of(path)
    if digest != sha256:
        raise DataError(f"{path} has sha256 {digest}, expected {sha256}: it is not the pinned "
                        "CIFAR-10 JPEG copy; restore the file from the shared data folder")
    return dict(_cached(str(path), digest))


def _array_sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _read_cache(folder: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays if every one matches ``sha256.json``, else ``None`` (with a
    warning when a cache was there but is damaged)."""
    files = {k: folder / f"{k}.npy" for k in _KEYS}
    if not folder.is_dir() or not any(f.exists() for f in files.values()):
        return None
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        arrays = {k: np.load(f, allow_pickle=False) for k, f in files.items()}
        bad = [k for k, a in arrays.items() if _array_sha256(a) != manifest.get(k)]
    except (OSError, ValueError, AttributeError) as err:  # missing/partial file, bad JSON or npy
        bad = [f"{type(err).__name__}: {err}"]
    if not bad:
        return arrays
    warnings.warn(f"the decoded CIFAR-10 cache in {folder} does not match its {MANIFEST} ({', '.join(bad)[:200]}); "
                  "decoding the zip again", stacklevel=3)
    return None


@functools.lru_cache(maxsize=4)
def _cached(path: str, digest: str) -> dict[str, np.ndarray]:
    folder = cache_dir() / f"cifar10-{digest}"
    arrays = _read_cache(folder)
    if arrays is not None:
        return _read_only(arrays)
    arrays = _decode(Path(path))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for key in _KEYS:
            file = folder / f"{key}.npy"
            tmp = file.with_name(f"{file.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, arrays[key])
            os.replace(tmp, file)  # atomic: a concurrent reader never sees half a file
        sums = json.dumps({k: _array_sha256(arrays[k]) for k in _KEYS}, indent=1)
        tmp = folder / f"{MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(sums)
        os.replace(tmp, folder / MANIFEST)  # last: a cache without it is never trusted
    except OSError as err:  # an unwritable cache only costs the next run a decode
        warnings.warn(f"cannot cache the decoded CIFAR-10 arrays in {folder} ({err.strerror or err})", stacklevel=3)
    return _read_only(arrays)


def _decode(path: Path) -> dict[str, np.ndarray]:
    from PIL import Image  # only needed on a cache miss

    index = {name: i for i, name in enumerate(CLASSES)}
    images: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    labels: dict[str, list[int]] = {"train": [], "test": []}
    with zipfile.ZipFile(path) as archive:
        for name in sorted(archive.namelist()):
            if name.endswith("/"):
                continue
            parts = name.split("/")
            if len(parts) != 3 or parts[0] not in images or parts[1] not in index:
                raise DataError(f"{path}: unexpected member {name!r}; expected train|test/<class>/<file>.jpg")
            with Image.open(io.BytesIO(archive.read(name))) as img:
                pixels = np.asarray(img.convert("RGB"))
            if pixels.shape != (32, 32, 3):
                raise DataError(f"{path}: {name} is {pixels.shape}, expected 32x32 RGB")
            images[parts[0]].append(pixels)
            labels[parts[0]].append(index[parts[1]])
    arrays = {}
    rng = np.random.default_rng(SHUFFLE_SEED)
    for split in ("train", "test"):
        if not images[split]:
            raise DataError(f"{path} holds no {split}/ images")
        order = rng.permutation(len(labels[split]))
        x = np.stack(images[split])[order].transpose(0, 3, 1, 2)
        arrays[f"{split}_images"] = np.ascontiguousarray(x)
        arrays[f"{split}_labels"] = np.asarray(labels[split], dtype=np.int64)[order]
    return arrays


def cifar10(root: str | os.PathLike | None = None, sha256: str = ZIP_SHA256) -> ImageArrays:
    """CIFAR-10 (JPEG copy) with this copy's per-channel normalisation constants."""
    return ImageArrays(cifar10_arrays(root, sha256=sha256), mean=MEAN, std=STD, num_classes=10,
                       source=f"CIFAR-10 {data_dir(root) / ZIP_NAME}")


class RandomCropFlip(TensorDataset):
    """``(image, label)`` pairs with the standard CIFAR training augmentation: pad by
    ``padding`` on every side with ``fill`` (per channel; pass the normalised value of
    black to pad like torchvision does on raw images), take a random crop of the original
    size, and flip horizontally with probability 1/2.

    Batches fetched by a ``DataLoader`` are augmented in one vectorised call
    (``__getitems__``). Randomness comes from ``generator``, else torch's global RNG (which
    :class:`torchdam.Trainer` seeds), so a seeded run is repeatable.
    """

    def __init__(self, images: Tensor, labels: Tensor, padding: int = 4,
                 fill: Tensor | tuple[float, ...] | float = 0.0, generator: torch.Generator | None = None) -> None:
        super().__init__(images, labels)
        if images.dim() != 4:
            raise DataError(f"RandomCropFlip needs N, C, H, W images, got shape {tuple(images.shape)}")
        self.padding = int(padding)
        self.fill = torch.as_tensor(fill, dtype=images.dtype).reshape(-1, 1, 1).expand(images.shape[1], 1, 1)
        self.generator = generator

    def augment(self, x: Tensor) -> Tensor:
        """Crop and flip a batch ``x`` (N, C, H, W); each image gets its own offsets."""
        n, c, h, w = x.shape
        p = self.padding
        padded = self.fill.expand(c, h + 2 * p, w + 2 * p).repeat(n, 1, 1, 1)
        padded[:, :, p:p + h, p:p + w] = x
        dy, dx, flip = (torch.randint(0, hi, (n,), generator=self.generator)
                        for hi in (2 * p + 1, 2 * p + 1, 2))
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
        cols = dx[:, None] + torch.arange(w)
        cols = torch.where(flip[:, None].bool(), cols.flip(1), cols)[:, None, None, :]
        batch = torch.arange(n)[:, None, None, None]
        return padded[batch, torch.arange(c)[None, :, None, None], rows, cols]

    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        return self.augment(x.unsqueeze(0))[0], y

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        x, y = self.augment(self.tensors[0][idx]), self.tensors[1][idx]
        return list(zip(x, y))
