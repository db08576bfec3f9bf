"""CIFAR-10 (JPEG copy): pinned zip, decode + on-disk cache, normalisation, augmentation."""
from __future__ import annotations

import io
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from torchdam.data import DATASETS, RandomCropFlip, cifar10_arrays, load_dataset
from torchdam.data import cifar10 as cifar10_module
from torchdam.errors import DataError


@pytest.fixture(autouse=True)
def fresh_cache():
    cifar10_module._cached.cache_clear()
    yield
    cifar10_module._cached.cache_clear()


def _real_or_skip() -> dict[str, np.ndarray]:
    try:
        return cifar10_arrays()
    except DataError as err:
        if os.environ.get("CI"):  # CI has ../shared beside the clone: missing data is a failure
            raise
        pytest.skip(str(err))


def _fake_zip(root, per_class: int = 2) -> str:
    """A tiny zip laid out like the real one; returns its sha256."""
    path = root / cifar10_module.ZIP_NAME
    path.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for split in ("train", "test"):
            for name in cifar10_module.CLASSES:
                for i in range(per_class):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
                    archive.writestr(f"{split}/{name}/{i:04d}.jpg", buf.getvalue())
    return cifar10_module.sha256_of(path)


def test_real_copy_decodes_to_the_readme_numbers() -> None:
    arrays = _real_or_skip()
    assert arrays["train_images"].shape == (50000, 3, 32, 32)
    assert arrays["test_images"].shape == (10000, 3, 32, 32)
    assert arrays["train_images"].dtype == np.uint8
    assert np.bincount(arrays["train_labels"]).tolist() == [5000] * 10
    assert np.bincount(arrays["test_labels"]).tolist() == [1000] * 10
    # shuffled with the fixed seed, not sorted by class as in the zip
    assert len(set(arrays["train_labels"][:50].tolist())) > 5
    x = arrays["train_images"]
    np.testing.assert_allclose(x.mean((0, 2, 3), dtype=np.float64) / 255, [0.4913, 0.4821, 0.4465], atol=2e-4)
    np.testing.assert_allclose(x.std((0, 2, 3), dtype=np.float64) / 255, [0.2452, 0.2428, 0.2606], atol=2e-4)
    with pytest.raises(ValueError):
        arrays["train_images"][0, 0, 0, 0] = 1  # read-only: shared by the cache


def test_load_dataset_normalises_per_channel() -> None:
    _real_or_skip()
    splits = load_dataset("cifar10", val_size=5000, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (45000, 5000, 10000)
    assert splits.input_shape == (3, 32, 32) and splits.num_classes == 10
    assert splits.name == "cifar10" and splits.display_name == "CIFAR-10 (JPEG copy)"
    x = splits.train.tensors[0]
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=0.01)
    assert torch.allclose(x.std((0, 2, 3)), torch.ones(3), atol=0.01)


def test_missing_zip_names_the_file(tmp_path, monkeypatch) -> None:
    with pytest.raises(DataError, match="cifar10-jpeg.zip"):
        cifar10_arrays(root=tmp_path)
    monkeypatch.setenv("TORCHDAM_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="TORCHDAM_DATA_DIR"):
        load_dataset("cifar10")


def test_zip_with_another_sha256_is_refused(tmp_path) -> None:
    _fake_zip(tmp_path)
    with pytest.raises(DataError, match="sha256"):
        cifar10_arrays(root=tmp_path)
    assert "cifar10" in DATASETS


def test_decoded_arrays_are_cached_on_disk_by_sha256(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCHDAM_CACHE_DIR", str(tmp_path / "cache"))
    digest = _fake_zip(tmp_path / "data", per_class=3)
    first = cifar10_arrays(root=tmp_path / "data", sha256=digest)
    assert first["train_images"].shape == (30, 3, 32, 32) and first["test_images"].shape == (30, 3, 32, 32)
    assert sorted(np.bincount(first["train_labels"]).tolist()) == [3] * 10
    assert sorted(p.name for p in (tmp_path / "cache" / f"cifar10-{digest}").iterdir()) == [
        "sha256.json", "test_images.npy", "test_labels.npy", "train_images.npy", "train_labels.npy"]

    cifar10_module._cached.cache_clear()
    monkeypatch.setattr(cifar10_module, "_decode", lambda path: pytest.fail("decoded again"))
    second = cifar10_arrays(root=tmp_path / "data", sha256=digest)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


def _augmenter(n: int = 16, padding: int = 4, seed: int = 0) -> RandomCropFlip:
    images = torch.arange(n * 3 * 8 * 8, dtype=torch.float32).reshape(n, 3, 8, 8)
    return RandomCropFlip(images, torch.arange(n), padding=padding, fill=(-1.0, -2.0, -3.0),
                          generator=torch.Generator().manual_seed(seed))


def test_augmentation_crops_and_flips_each_image() -> None:
    aug = _augmenter()
    x = aug.tensors[0]
    out = aug.augment(x)
    assert out.shape == x.shape
    p = aug.padding
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    for c, value in enumerate((-1.0, -2.0, -3.0)):
        border = torch.ones(8 + 2 * p, 8 + 2 * p, dtype=torch.bool)
        border[p:-p, p:-p] = False
        padded[:, c][:, border] = value
    for i in range(len(x)):  # every output is some 8x8 window of the padded image, maybe flipped
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(2 * p + 1) for dx in range(2 * p + 1)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows), i


def test_augmentation_is_seeded_and_batched_by_the_loader() -> None:
    a, b, c = _augmenter(seed=1), _augmenter(seed=1), _augmenter(seed=2)
    xa, xb, xc = (aug.augment(aug.tensors[0]) for aug in (a, b, c))
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    flips_only = _augmenter(padding=0)
    out = flips_only.augment(flips_only.tensors[0])
    x = flips_only.tensors[0]
    assert all(torch.equal(o, i) or torch.equal(o, i.flip(-1)) for o, i in zip(out, x))
    batch_x, batch_y = next(iter(DataLoader(_augmenter(), batch_size=5, shuffle=False)))
    assert batch_x.shape == (5, 3, 8, 8) and batch_y.tolist() == [0, 1, 2, 3, 4]
    single_x, single_y = _augmenter()[3]
    assert single_x.shape == (3, 8, 8) and int(single_y) == 3


def test_load_dataset_augment_only_touches_train(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCHDAM_CACHE_DIR", str(tmp_path / "cache"))
    digest = _fake_zip(tmp_path / "data")
    splits = load_dataset("cifar10", val_size=4, augment=True, root=tmp_path / "data", sha256=digest)
    assert isinstance(splits.train, RandomCropFlip) and not isinstance(splits.val, RandomCropFlip)
    assert len(splits.train) == 16 and splits.input_shape == (3, 32, 32)
    black = (-torch.tensor(cifar10_module.MEAN) / torch.tensor(cifar10_module.STD)).view(3, 1, 1)
    assert torch.allclose(splits.train.fill, black.expand(3, 1, 1))
    torch.manual_seed(0)
    first = next(iter(DataLoader(splits.train, batch_size=8)))[0]
    torch.manual_seed(0)
    again = next(iter(DataLoader(splits.train, batch_size=8)))[0]
    assert first.shape == (8, 3, 32, 32) and torch.equal(first, again)
