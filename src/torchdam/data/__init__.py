"""Datasets as ready-to-train tensors: ``load_dataset("mnist", val_size=5000, seed=0)``.

Each registered loader returns raw uint8 arrays and the statistics to normalise them;
:func:`load_dataset` does the part every dataset shares (seeded validation split taken
from the training set, scaling, normalising) so a new dataset is one loader function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from torch.utils.data import TensorDataset

from torchdam.data import cifar10 as _cifar10
from torchdam.data import mnist as _mnist
from torchdam.data.cifar10 import RandomCropFlip, cifar10_arrays
from torchdam.data.mnist import ImageArrays, fashion_mnist_arrays, mnist_arrays, read_idx
from torchdam.errors import ConfigError
from torchdam.registry import Registry

DATASETS: Registry[ImageArrays] = Registry("dataset")
DATASETS.register("mnist")(_mnist.mnist)
DATASETS.register("fashion_mnist")(_mnist.fashion_mnist)
DATASETS.register("fashion-mnist")(_mnist.fashion_mnist)
DATASETS.register("cifar10")(_cifar10.cifar10)

#: How a dataset is named wherever results are printed, when that differs from its key.
DISPLAY_NAMES: dict[str, str] = {"cifar10": _cifar10.DISPLAY_NAME}


@dataclass
class Splits:
    """Train/val/test ``TensorDataset``s of normalised float32 (N, C, H, W) images and
    int64 labels, with what a model needs to know about them."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    input_shape: tuple[int, ...]
    num_classes: int
    name: str
    display_name: str = ""

    def __post_init__(self) -> None:
        self.display_name = self.display_name or self.name


Stat = Union[float, tuple[float, ...]]


def _channel_stat(value: Stat) -> torch.Tensor:
    """A scalar, or a per-channel tuple shaped to broadcast over N, C, H, W."""
    return torch.tensor(value, dtype=torch.float32).reshape(-1, 1, 1)


def _tensors(images: np.ndarray, labels: np.ndarray, mean: Stat, std: Stat) -> TensorDataset:
    x = torch.tensor(images, dtype=torch.float32).div_(255.0)  # copies: the cache is read-only
    if x.ndim == 3:
        x = x.unsqueeze(1)  # grayscale: add the channel axis models expect
    x.sub_(_channel_stat(mean)).div_(_channel_stat(std))
    return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))


def load_dataset(
    name: str, val_size: int = 5000, seed: int = 0, limit: int | None = None, augment: bool = False,
    **kwargs,
) -> Splits:
    """Load a registered dataset and split ``val_size`` examples off its training set.

    The validation split is a random permutation seeded by ``seed`` (same seed, same
    split); ``limit`` caps the training set (after the split) for fast tests. Extra
    keywords go to the loader (e.g. ``root=`` for Fashion-MNIST). ``augment=True`` makes
    ``train`` a :class:`RandomCropFlip` (random crop with padding 4 and horizontal flip,
    the standard CIFAR augmentation); validation and test are never augmented.

    >>> splits = load_dataset("mnist", limit=1000)  # doctest: +SKIP
    >>> len(splits.train), len(splits.val), len(splits.test), splits.input_shape  # doctest: +SKIP
    (1000, 5000, 10000, (1, 28, 28))
    """
    data = DATASETS.build(name, **kwargs)
    a = data.arrays
    n_train = len(a["train_labels"])
    if not 0 <= val_size < n_train:
        raise ConfigError(f"val_size must be in [0, {n_train}) for {name!r}, got {val_size}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of training examples, got {limit}")
    order = np.random.default_rng(seed).permutation(n_train)
    val_idx, train_idx = np.sort(order[:val_size]), np.sort(order[val_size:])
    if limit is not None:
        train_idx = train_idx[:limit]
    norm = (data.mean, data.std)
    train = _tensors(a["train_images"][train_idx], a["train_labels"][train_idx], *norm)
    if augment:
        # pad with black, as a crop of the raw image would: (0 - mean) / std once normalised
        black = -_channel_stat(data.mean) / _channel_stat(data.std)
        train = RandomCropFlip(*train.tensors, padding=4, fill=black)
    return Splits(
        train=train,
        val=_tensors(a["train_images"][val_idx], a["train_labels"][val_idx], *norm),
        test=_tensors(a["test_images"], a["test_labels"], *norm),
        input_shape=tuple(train.tensors[0].shape[1:]),
        num_classes=data.num_classes,
        name=name,
        display_name=DISPLAY_NAMES.get(name, name),
    )


__all__ = [
    "DATASETS", "DISPLAY_NAMES", "ImageArrays", "RandomCropFlip", "Splits", "cifar10_arrays",
    "fashion_mnist_arrays", "load_dataset", "mnist_arrays", "read_idx",
]
