"""Training batches cut from tensors held on the training device: no loader workers, no
per-image Python, the crop and flip done as batched tensor ops on the device.

For data sets that fit in device memory (CIFAR-10: 150 MB of uint8 pixels). The order of the
samples is the :class:`~hmqsearch.data.sampler.EpochShuffleSampler`'s, so a run resumed
mid-epoch skips exactly the batches it had trained on. The augmentation is drawn once per
epoch from a CPU generator seeded with (seed, epoch), one (top, left, flip) per position in the
epoch: a batch is a function of (seed, epoch, batch index) alone, on any device, and a resumed
run gets the same crops and flips as an uninterrupted one. (The DataLoader path draws its
crops from torch's global generator instead, so with augmentation the two paths give the
same images only up to which crop each one gets; without augmentation they are identical.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from hmqsearch.data.images import ArrayImageDataset
from hmqsearch.data.sampler import EpochShuffleSampler

AUGMENT_STREAM = 1 << 40  # keeps the augmentation's seeds apart from the shuffle's (seed * 1_000_003 + epoch)


@dataclass(frozen=True)
class Pixels:
    """How stored uint8 pixels become network inputs: scaled to [0, 1], normalised per channel,
    and (``augment``) cropped out of the image zero-padded by ``padding``, then flipped."""

    mean: Tensor  # (C, 1, 1) float32
    std: Tensor
    augment: bool
    padding: int


@dataclass(frozen=True)
class InMemorySet:
    """A training set as tensors: ``images`` (uint8 pixels with ``pixels``, or final inputs
    when ``pixels`` is None) and int64 ``labels``."""

    images: Tensor
    labels: Tensor
    pixels: Pixels | None


def in_memory(dataset: Dataset) -> InMemorySet | None:
    """The tensors behind ``dataset`` when it holds them in memory (an
    :class:`~hmqsearch.data.images.ArrayImageDataset` or a two-tensor ``TensorDataset``), else None."""
    if isinstance(dataset, ArrayImageDataset):
        t = dataset.transform
        return InMemorySet(dataset.images, dataset.labels, Pixels(t.mean, t.std, t.augment, t.padding))
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return InMemorySet(*dataset.tensors, None)
    return None


def crop_flip(images: Tensor, top: Tensor, left: Tensor, flip: Tensor, padding: int) -> Tensor:
    """Batched :func:`~hmqsearch.data.images.random_crop_flip` at given offsets: image ``i`` of
    ``images`` (B x C x H x W) cropped at (``top[i]``, ``left[i]``) out of its copy zero-padded
    by ``padding``, then mirrored left-right where ``flip[i]``; one gather, contiguous output."""
    b, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    cols = torch.arange(w, device=device)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + left[:, None]  # (B, W)
    rows = top[:, None] + torch.arange(h, device=device)  # (B, H)
    batch = torch.arange(b, device=device).reshape(b, 1, 1, 1)
    channel = torch.arange(c, device=device).reshape(1, c, 1, 1)
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


class DeviceBatches:
    """An iterable of ``(inputs, labels)`` training batches cut from ``data`` moved to ``device``.

    Lightning calls ``sampler.set_epoch`` before every epoch, as for a DataLoader;
    ``sampler.resume_at`` starts the next iteration part-way into an epoch. ``len()`` is the
    number of batches of a whole epoch, the last one smaller, as a DataLoader without
    ``drop_last`` counts them.
    """

    def __init__(self, data: InMemorySet, batch_size: int, sampler: EpochShuffleSampler, device: torch.device) -> None:
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.pixels = data.pixels
        self.batch_size = batch_size
        self.sampler = sampler
        self.device = device
        if self.pixels is not None:
            self.mean = self.pixels.mean.to(device)[None]
            self.std = self.pixels.std.to(device)[None]

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def augmentation(self, epoch: int) -> tuple[Tensor, Tensor, Tensor]:
        """(top, left, flip) of every position of ``epoch``, on the CPU: the same on any device."""
        n, padding = len(self.labels), self.pixels.padding if self.pixels else 0
        gen = torch.Generator().manual_seed(self.sampler.seed * 1_000_003 + epoch + AUGMENT_STREAM)
        offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=gen)
        return offsets[0], offsets[1], torch.rand(n, generator=gen) < 0.5

    def _inputs(self, index: Tensor, top: Tensor, left: Tensor, flip: Tensor) -> Tensor:
        images = self.images.index_select(0, index)
        if self.pixels is None:
            return images
        if self.pixels.augment:
            images = crop_flip(images, top, left, flip, self.pixels.padding)
        return (images.float() / 255.0 - self.mean) / self.std

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        sampler = self.sampler
        skip, sampler.skip = sampler.skip, 0
        order = sampler.epoch_order().to(self.device)
        top, left, flip = (t.to(self.device) for t in self.augmentation(sampler.epoch))
        for start in range(skip, len(order), self.batch_size):
            at = slice(start, start + self.batch_size)
            index = order[at]
            yield self._inputs(index, top[at], left[at], flip[at]), self.labels.index_select(0, index)
