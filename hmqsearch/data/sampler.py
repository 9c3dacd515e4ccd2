"""A shuffling sampler whose order is a function of (seed, epoch), so a run resumed mid-epoch
can skip exactly the batches it had already trained on."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """Epoch ``e`` visits ``randperm(n)`` drawn from ``seed + e``, from position ``skip`` on.

    Lightning calls ``set_epoch`` before every epoch. ``resume_at(epoch, skip)`` makes the next
    iteration start ``skip`` samples into that epoch's order (the rest of an interrupted epoch).
    ``generator`` is reseeded per epoch too: the DataLoader draws its workers' base seed from it,
    so augmentation in loader workers is also a function of (seed, epoch).
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self.epoch, self.skip = 0, 0
        self.generator = torch.Generator()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)

    def resume_at(self, epoch: int, skip: int) -> None:
        self.set_epoch(epoch)
        self.skip = skip

    def __len__(self) -> int:
        return self.n

    def epoch_order(self) -> torch.Tensor:
        """The current epoch's whole order (``skip`` not applied)."""
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()
        skip, self.skip = self.skip, 0
        yield from order[skip:].tolist()
