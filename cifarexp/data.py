"""CIFAR-10 and its synthetic stand-in, with the study's transforms and DataLoader."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets, transforms

from cifarexp.config import CifarexpError, TrainConfig

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
NUM_CLASSES = 10
PATTERN_CONTRAST, NOISE_STD, LABEL_NOISE = 0.1, 64.0, 0.2  # how hard the synthetic set is
_CHUNK = 1_000  # synthetic images are made in seeded chunks, so the first N never depend on N
# make_loader warns once about more workers than CPUs; PyTorch would repeat it every epoch.
warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)


def train_transform() -> transforms.Compose:
    """The study's augmentation, in the study's order."""
    return transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(0.5),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


def test_transform() -> transforms.Compose:
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


class ImageArrayDataset(Dataset):
    """uint8 HWC images and int labels, transformed per sample exactly as torchvision's CIFAR10."""

    def __init__(self, data: np.ndarray, targets: list[int], transform: transforms.Compose):
        self.data, self.targets, self.transform = data, targets, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


def synthetic_arrays(size: int, *, seed: int, train: bool) -> tuple[np.ndarray, list[int]]:
    """CIFAR-shaped, learnable images: a smooth per-class pattern under per-image brightness
    and noise, with LABEL_NOISE of the labels replaced at random, so that training accuracy
    climbs over epochs as on CIFAR-10 instead of reaching 100% at once.

    The class patterns depend on `seed` only (shared by both splits); each chunk of images
    has its own seeded stream, so the result is deterministic and its first N images are
    the same whatever `size` is.
    """
    coarse = np.random.default_rng(seed).uniform(0, 255, size=(NUM_CLASSES, 4, 4, 3))
    coarse = 128 + PATTERN_CONTRAST * (coarse - 128)
    patterns = coarse.repeat(8, axis=1).repeat(8, axis=2).astype(np.float32)  # 8x8 blocks
    images = np.empty((size, 32, 32, 3), dtype=np.uint8)
    labels = np.empty(size, dtype=np.int64)
    for start in range(0, size, _CHUNK):
        rng = np.random.default_rng([seed, int(train), start // _CHUNK])
        n = min(_CHUNK, size - start)  # a whole chunk is always drawn, then cut
        classes = rng.integers(0, NUM_CLASSES, size=_CHUNK)[:n]
        noise = rng.normal(0, NOISE_STD, size=(_CHUNK, 32, 32, 3)).astype(np.float32)[:n]
        brightness = rng.uniform(0.7, 1.3, size=(_CHUNK, 1, 1, 1)).astype(np.float32)[:n]
        relabel = rng.random(_CHUNK)[:n] < LABEL_NOISE
        random_labels = rng.integers(0, NUM_CLASSES, size=_CHUNK)[:n]
        pixels = patterns[classes] * brightness + noise
        images[start : start + n] = np.clip(pixels, 0, 255).astype(np.uint8)
        labels[start : start + n] = np.where(relabel, random_labels, classes)
    return images, labels.tolist()


def _cifar10_arrays(data_dir: str, train: bool) -> tuple[np.ndarray, list[int]]:
    """torchvision's CIFAR10 (checksummed); downloaded into data_dir when absent."""
    try:
        dataset = datasets.CIFAR10(data_dir, train=train, download=False)
    except RuntimeError:  # absent or corrupt: torchvision verifies the files' checksums
        try:
            dataset = datasets.CIFAR10(data_dir, train=train, download=True)
        except Exception as exc:
            folder = Path(data_dir).resolve() / datasets.CIFAR10.base_folder
            raise CifarexpError(
                f"CIFAR-10 is missing or corrupt in {folder} and could not be downloaded "
                f"({type(exc).__name__}: {exc}); put the CIFAR-10 python files there, or use "
                "the synthetic dataset",
                field="data_dir",
            ) from None
    return dataset.data, list(dataset.targets)


def load_split(cfg: TrainConfig, *, train: bool) -> ImageArrayDataset:
    """The train or test split of cfg.dataset (its first --train-size / --test-size images)."""
    size = cfg.images(train=train)
    if cfg.dataset == "synthetic":
        data, targets = synthetic_arrays(size, seed=cfg.seed, train=train)
    else:
        data, targets = _cifar10_arrays(cfg.data_dir, train)
        data, targets = data[:size], targets[:size]
    return ImageArrayDataset(data, targets, train_transform() if train else test_transform())


def cpu_count() -> int:
    """CPUs this process may use (its affinity), which is what DataLoader workers share."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def make_loader(
    cfg: TrainConfig,
    dataset: ImageArrayDataset,
    *,
    train: bool,
    sampler: Sampler[int] | None = None,
) -> DataLoader:
    """The study's DataLoader: shuffled for training (or in `sampler`'s order: one rank's
    shard), cfg.workers worker processes.

    More workers than usable CPUs is allowed (C3 sweeps past them) but warned about once,
    in place of PyTorch's repeated one."""
    if cfg.workers > cpu_count():
        warnings.warn(
            f"{cfg.workers} DataLoader workers > {cpu_count()} CPUs this process may use",
            stacklevel=2,
        )
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=cfg.pin_memory,
        persistent_workers=cfg.persistent_workers,
        timeout=cfg.loader_timeout if cfg.workers > 0 else 0,  # a stuck worker fails the run
        generator=torch.Generator().manual_seed(cfg.seed),
    )
