"""The training set kept on the device and augmented there, a whole batch at a time.

The study's augmentation, vectorised: per-sample random crop with 4-pixel zero padding
(offsets uniform over 0..8 in each axis), per-sample horizontal flip with probability 0.5,
ToTensor's scaling to [0, 1], then Normalize(MEAN, STD). For a given offset and flip the
result is, pixel for pixel, torchvision's `RandomCrop(32, padding=4)`, `RandomHorizontalFlip`,
`ToTensor` and `Normalize` on the PIL image; the random draws have the same distribution.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from cifarexp.training.data import MEAN, STD, ImageArrayDataset
from cifarexp.training.engine import compiled_for_shapes

PADDING = 4
SIZE = 32  # crop size: CIFAR's own


def pad_images(images_hwc: Tensor) -> Tensor:
    """N x 32 x 32 x 3 uint8 -> N x 40 x 40 x 3, zero-padded as RandomCrop(padding=4) pads."""
    return F.pad(images_hwc, (0, 0, PADDING, PADDING, PADDING, PADDING))


def normalization(device: torch.device) -> tuple[Tensor, Tensor]:
    """The study's MEAN and STD as 3 x 1 x 1 tensors on `device` (made once: a copy to the
    GPU made per batch would make the host wait for it)."""
    return (
        torch.tensor(MEAN, device=device).view(3, 1, 1),
        torch.tensor(STD, device=device).view(3, 1, 1),
    )


def crop_flip_normalize(
    padded: Tensor,
    index: Tensor,
    offsets: Tensor,
    flips: Tensor,
    mean: Tensor,
    std: Tensor,
    *,
    channels_last: bool = False,
) -> Tensor:
    """The augmented batch of images `padded[index]`: B x 3 x 32 x 32 float32.

    padded: N x 40 x 40 x 3 uint8 (`pad_images`); index: B image numbers; offsets: B x 2
    (top, left), each in 0..8; flips: B booleans; mean, std: `normalization(device)`.
    One gather does the crop and the flip.
    """
    span = torch.arange(SIZE, device=padded.device)
    rows = offsets[:, :1] + span  # B x 32
    cols = offsets[:, 1:] + torch.where(flips[:, None], span.flip(0), span)  # B x 32
    # HWC storage makes each gathered pixel 3 contiguous bytes; the B x 32 x 32 x 3 result,
    # permuted, is an NCHW-shaped tensor already in channels_last memory order.
    crops = padded[index[:, None, None], rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if not channels_last:
        crops = crops.contiguous()
    # The same float operations as ToTensor (divide by 255) then Normalize (sub, div).
    return crops.float().div_(255).sub_(mean).div_(std)


class GpuLoader:
    """Shuffled, augmented training batches made on `device` from its uint8 copy of the set.

    Each epoch draws a permutation, crop offsets and flips from one generator seeded once
    with `seed` (as the DataLoader's shuffling is), all on the device: the host launches
    kernels and never waits. Batches come as (images, labels) already on the device, so
    the engine's copy to the device is a no-op. The last batch may be smaller.

    `shard` = (rank, world size): every rank draws the same epoch and trains on positions
    rank, rank + world size, ... of it, wrapping round so that each rank gets as many
    images (as DistributedSampler does).

    `compiled`: the augmentation torch.compile'd (with the model, on CUDA): a few fused
    kernels a batch where eager runs about twelve; compiled per batch size by `warm_up`.
    """

    def __init__(
        self,
        dataset: ImageArrayDataset,
        *,
        batch_size: int,
        device: torch.device,
        seed: int,
        channels_last: bool = False,
        shard: tuple[int, int] = (0, 1),
        compiled: bool = False,
    ) -> None:
        images = torch.from_numpy(dataset.data).to(device)  # N x 32 x 32 x 3 uint8
        self.padded = pad_images(images)  # padded once; ~240 MB for 50,000 images
        self.labels = torch.as_tensor(dataset.targets, dtype=torch.long, device=device)
        self.mean, self.std = normalization(device)
        self.batch_size, self.channels_last = batch_size, channels_last
        self.generator = torch.Generator(device).manual_seed(seed)
        rank, world_size = shard
        n = len(self.labels)
        total = -(-n // world_size) * world_size
        self.positions = torch.arange(rank, total, world_size, device=device) % n
        self.sharded = world_size > 1
        self.augment = compiled_for_shapes(crop_flip_normalize) if compiled else crop_flip_normalize

    def __len__(self) -> int:
        return -(-len(self.positions) // self.batch_size)

    def warm_up(self, batch_sizes: list[int]) -> None:
        """Makes one batch of each size as an epoch makes it, from a scratch generator (the
        epochs' draws stay as they are): the drawing and indexing kernels load, and a compiled
        augmentation compiles, here, before the epochs. A size larger than an epoch's
        positions is refused (its batch would be cut short)."""
        if max(batch_sizes, default=0) > len(self.positions):
            raise ValueError(
                f"a warm-up batch of {max(batch_sizes)} from {len(self.positions)} images"
            )
        draws = self.draw(torch.Generator(self.labels.device).manual_seed(0))
        for size in batch_sizes:
            self.batch(*draws, slice(0, size))

    def draw(self, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """One epoch's randomness, one entry per position of this rank: the image numbers (of
        a permutation of the set's), crop offsets in 0..8 (top, left) and flips."""
        n, device = len(self.labels), self.labels.device
        order = torch.randperm(n, device=device, generator=generator)
        offsets = torch.randint(0, 2 * PADDING + 1, (n, 2), device=device, generator=generator)
        flips = torch.rand(n, device=device, generator=generator) < 0.5
        if self.sharded:
            return order[self.positions], offsets[self.positions], flips[self.positions]
        return order, offsets, flips

    def batch(
        self, order: Tensor, offsets: Tensor, flips: Tensor, batch: slice
    ) -> tuple[Tensor, Tensor]:
        """The batch of positions `batch` of an epoch's draws: (images, labels)."""
        index = order[batch]
        images = self.augment(
            self.padded,
            index,
            offsets[batch],
            flips[batch],
            self.mean,
            self.std,
            channels_last=self.channels_last,
        )
        return images, self.labels[index]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order, offsets, flips = self.draw(self.generator)
        for start in range(0, len(order), self.batch_size):
            yield self.batch(order, offsets, flips, slice(start, start + self.batch_size))
