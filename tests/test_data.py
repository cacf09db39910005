import hashlib
import pickle

import numpy as np
import pytest
import torch
from torchvision import datasets

from cifarexp.config import CifarexpError
from cifarexp.training.data import load_split, synthetic_arrays
from tests.conftest import TINY


def test_synthetic_is_cifar_shaped_uint8_and_deterministic():
    images, labels = synthetic_arrays(64, seed=3, train=True)
    assert images.shape == (64, 32, 32, 3) and images.dtype == np.uint8
    assert set(labels) <= set(range(10))
    again, labels_again = synthetic_arrays(64, seed=3, train=True)
    assert np.array_equal(images, again) and labels == labels_again
    other, _ = synthetic_arrays(64, seed=4, train=True)
    assert not np.array_equal(images, other)


def test_synthetic_first_n_images_do_not_depend_on_the_size():
    small, small_labels = synthetic_arrays(1500, seed=0, train=True)
    large, large_labels = synthetic_arrays(2500, seed=0, train=True)
    assert np.array_equal(small, large[:1500]) and small_labels == large_labels[:1500]


def test_synthetic_is_learnable_but_not_trivially():
    images, labels = synthetic_arrays(4000, seed=0, train=True)
    labels = np.array(labels)
    flat = images.reshape(len(images), -1).astype(np.float32)
    train, held_out = slice(0, 2000), slice(2000, None)
    means = np.stack([flat[train][labels[train] == c].mean(0) for c in range(10)])
    distances = ((flat[held_out, None, :] - means[None]) ** 2).sum(-1)
    accuracy = (distances.argmin(1) == labels[held_out]).mean()
    # nearest class mean on held-out images: far above chance (10%), below 100% (the 20%
    # of random labels cap it near 82%)
    assert 0.3 < accuracy < 0.85


def test_train_split_is_transformed_like_cifar10():
    dataset = load_split(TINY, train=True)
    image, label = dataset[0]
    assert len(dataset) == TINY.train_size
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert isinstance(label, int)


def write_cifar10(root, n=20):
    """A tiny folder in CIFAR-10's own python-pickle format; returns its (data, labels)."""
    folder = root / datasets.CIFAR10.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist()
    names = [name for name, _ in datasets.CIFAR10.train_list + datasets.CIFAR10.test_list]
    for name in names:
        batch = {"data": data, "labels": labels, "batch_label": name}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": [f"class{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return folder, data, labels


@pytest.fixture
def tiny_cifar10(tmp_path, monkeypatch):
    """The tiny folder, with torchvision's checksums pointed at its files."""
    folder, data, labels = write_cifar10(tmp_path)
    md5 = lambda name: hashlib.md5((folder / name).read_bytes()).hexdigest()  # noqa: E731
    for attr in ("train_list", "test_list"):
        entries = [[name, md5(name)] for name, _ in getattr(datasets.CIFAR10, attr)]
        monkeypatch.setattr(datasets.CIFAR10, attr, entries)
    meta = {**datasets.CIFAR10.meta, "md5": md5("batches.meta")}
    monkeypatch.setattr(datasets.CIFAR10, "meta", meta)
    monkeypatch.setattr(datasets.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    return tmp_path, data, labels


def test_cifar10_files_are_read_in_their_own_format(tiny_cifar10):
    root, data, labels = tiny_cifar10
    cfg = TINY.replace(dataset="cifar10", data_dir=str(root), train_size=None)
    dataset = load_split(cfg, train=True)
    assert len(dataset) == 5 * len(data)  # five training batches
    hwc = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert np.array_equal(dataset.data[: len(data)], hwc)
    assert dataset.targets[: len(labels)] == labels


def test_cifar10_train_size_takes_the_first_images(tiny_cifar10):
    root, _, labels = tiny_cifar10
    cfg = TINY.replace(dataset="cifar10", data_dir=str(root), train_size=7)
    dataset = load_split(cfg, train=True)
    assert len(dataset) == 7 and dataset.targets == labels[:7]


def test_missing_cifar10_names_the_folder_and_the_synthetic_option(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    cfg = TINY.replace(dataset="cifar10", data_dir=str(tmp_path / "empty"))
    with pytest.raises(CifarexpError, match="synthetic") as info:
        load_split(cfg, train=True)
    assert str(tmp_path / "empty") in str(info.value)


def test_corrupt_cifar10_file_is_reported_not_loaded(tiny_cifar10):
    root, _, _ = tiny_cifar10
    (root / datasets.CIFAR10.base_folder / "data_batch_1").write_bytes(b"garbage")
    cfg = TINY.replace(dataset="cifar10", data_dir=str(root))
    with pytest.raises(CifarexpError, match="missing or corrupt"):
        load_split(cfg, train=True)
