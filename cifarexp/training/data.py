"""CIFAR-10 and its synthetic stand-in, with the study's transforms and DataLoader."""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets, transforms

from cifarexp import processes
from cifarexp.config import CifarexpError, TrainConfig

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
NUM_CLASSES = 10
# How hard the synthetic set is: a 2x2 grid of 16x16-pixel colour blocks per class at full
# contrast, per-image brightness and pixel noise, and LABEL_NOISE of the labels at random
# (which caps training accuracy near 82%). Easy enough that SGD at lr 0.1 learns within a
# hundred steps (the quick preset), as it does within CIFAR-10's first epoch.
PATTERN_GRID, PATTERN_CONTRAST, BRIGHTNESS = 2, 1.0, (0.9, 1.1)
NOISE_STD, LABEL_NOISE = 32.0, 0.2
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
    """CIFAR-shaped, learnable images: a per-class pattern of colour blocks under per-image
    brightness and noise, with LABEL_NOISE of the labels replaced at random, so that
    training accuracy climbs over epochs as on CIFAR-10 instead of reaching 100% at once.

    The class patterns depend on `seed` only (shared by both splits); each chunk of images
    has its own seeded stream, so the result is deterministic and its first N images are
    the same whatever `size` is.
    """
    grid = (NUM_CLASSES, PATTERN_GRID, PATTERN_GRID, 3)
    coarse = np.random.default_rng(seed).uniform(0, 255, size=grid)
    coarse = 128 + PATTERN_CONTRAST * (coarse - 128)
    block = 32 // PATTERN_GRID
    patterns = coarse.repeat(block, axis=1).repeat(block, axis=2).astype(np.float32)
    images = np.empty((size, 32, 32, 3), dtype=np.uint8)
    labels = np.empty(size, dtype=np.int64)
    for start in range(0, size, _CHUNK):
        rng = np.random.default_rng([seed, int(train), start // _CHUNK])
        n = min(_CHUNK, size - start)  # a whole chunk is always drawn, then cut
        classes = rng.integers(0, NUM_CLASSES, size=_CHUNK)[:n]
        noise = rng.normal(0, NOISE_STD, size=(_CHUNK, 32, 32, 3)).astype(np.float32)[:n]
        brightness = rng.uniform(*BRIGHTNESS, size=(_CHUNK, 1, 1, 1)).astype(np.float32)[:n]
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
) -> WatchedLoader:
    """The study's DataLoader: shuffled for training (or in `sampler`'s order: one rank's
    shard), cfg.workers worker processes, each batch due within cfg.loader_timeout.

    More workers than usable CPUs is allowed (C3 sweeps past them) but warned about once,
    in place of PyTorch's repeated one."""
    if cfg.workers > cpu_count():
        warnings.warn(
            f"{cfg.workers} DataLoader workers > {cpu_count()} CPUs this process may use",
            stacklevel=2,
        )
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=cfg.pin_memory,
        persistent_workers=cfg.persistent_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return WatchedLoader(loader, cfg.loader_timeout)


class LoaderTimeout(CifarexpError):
    """No batch came from the DataLoader's workers in time."""

    def __init__(self, timeout: float) -> None:
        super().__init__(
            f"DataLoader timed out after {timeout:g} seconds: no batch from its workers (one "
            "is stuck, or too slow); the run is FAILED. Raise the timeout, or use 0 workers",
            "loader_timeout",
        )


class WatchedLoader:
    """A DataLoader whose workers must deliver each batch within `timeout` seconds (0: no
    limit). Past it a watchdog thread interrupts the wait for the batch, even a read of a
    half-written batch that would never return; the workers are then killed (SIGKILL
    reaches a stopped process too, so nothing is left to wait for at exit) and the wait
    ends with LoaderTimeout."""

    def __init__(self, loader: DataLoader, timeout: float) -> None:
        self.loader, self.timeout = loader, timeout
        self.made = False  # whether an iterator has been made (see _started)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        if self.timeout <= 0 or self.loader.num_workers == 0:  # no worker to wait for
            return self._started()
        return self._watched()

    def _started(self) -> Iterator:
        """The DataLoader's iterator. Making one starts its workers, and a stop waits until
        it is made: one stopped half-made would report its missing parts as it is collected.
        Persistent workers are started once; each later epoch waits for them to be ready,
        and a stop is taken in that wait (a stuck worker would hold it forever)."""
        if self.loader.persistent_workers and self.made:
            return iter(self.loader)
        with processes.uninterruptible():
            batches = iter(self.loader)
        self.made = True
        return batches

    def _watched(self) -> Iterator:
        watch = _Watchdog(self.timeout, can_interrupt=processes.allow_interrupts())
        batches = self._started()  # starts the workers: part of waiting for batch 1
        watch.start()
        try:
            while True:
                watch.since = time.monotonic()
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                except BaseException:
                    if watch.fired:
                        processes.withdraw_interrupt()
                        processes.kill_children()  # the DataLoader's workers
                        raise LoaderTimeout(self.timeout) from None
                    raise
                finally:
                    watch.since = None
                yield batch
        finally:
            watch.stopped.set()


class _Watchdog(threading.Thread):
    def __init__(self, timeout: float, *, can_interrupt: bool) -> None:
        super().__init__(name="cifarexp loader watchdog", daemon=True)
        self.timeout, self.can_interrupt = timeout, can_interrupt
        self.since: float | None = None  # when the wait for the current batch began
        self.fired = False
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.1):
            since = self.since
            if since is not None and time.monotonic() - since > self.timeout:
                self.fired = True
                if self.can_interrupt:
                    processes.interrupt_main(LoaderTimeout(self.timeout))
                else:  # only the workers' death can end the main thread's wait
                    processes.kill_children()  # the DataLoader's workers
                return
