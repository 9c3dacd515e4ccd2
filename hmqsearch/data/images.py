"""Images held in memory as uint8 tensors and their transform to network inputs.

Below both :mod:`hmqsearch.data.common` (the data modules' loaders) and
:mod:`hmqsearch.data.device_batches` (which serves an :class:`ArrayImageDataset` on the device).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset


def random_crop_flip(img: Tensor, padding: int) -> Tensor:
    """Crop a ``C x H x W`` image at a random offset out of its zero-padded copy, then flip it
    horizontally with probability 1/2.

    Draws from torch's global generator, which Lightning seeds in the main process and in each
    loader worker, so the augmentation is reproducible from the run's seed.
    """
    _, h, w = img.shape
    padded = F.pad(img, (padding, padding, padding, padding))
    top, left = torch.randint(0, 2 * padding + 1, (2,)).tolist()
    out = padded[:, top : top + h, left : left + w]
    return out.flip(-1) if torch.rand(()) < 0.5 else out


class ImageTransform:
    """uint8 ``C x H x W`` image -> float tensor scaled to [0, 1] and normalised per channel,
    with optional crop/flip augmentation (done on the pixels, so padding is black)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], augment: bool, padding: int) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        self.augment = augment
        self.padding = padding

    def __call__(self, img: Tensor) -> Tensor:
        if self.augment:
            img = random_crop_flip(img, self.padding)
        return (img.float() / 255.0 - self.mean) / self.std


class ArrayImageDataset(Dataset):
    """Images held in memory as one uint8 ``N x C x H x W`` tensor, transformed on access."""

    def __init__(self, images: Tensor, labels: Tensor, transform: ImageTransform) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.transform(self.images[i]), self.labels[i]
