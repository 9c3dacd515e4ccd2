"""Users' own images: ``root/{train,val[,test]}/<class>/*.png|jpg``, decoded with Pillow."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from hmqsearch.data.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassificationDataModule,
    balanced_indices,
    check_count,
    check_normalisation,
)
from hmqsearch.data.images import ImageTransform
from hmqsearch.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
_LAYOUT = "root/train/<class>/*.png|jpg and root/val/<class>/*.png|jpg (root/test/<class>/ optional)"

Sample = tuple[Path, int]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _scan(split: Path, classes: list[str]) -> list[Sample]:
    """Every image of ``split/<class>/``; a class folder that ``classes`` lacks is an error."""
    if not split.is_dir():
        raise UserError(f"image folder {split} not found; expected {_LAYOUT}")
    unknown = sorted(d.name for d in split.iterdir() if d.is_dir() and d.name not in classes)
    if unknown:
        raise UserError(f"{split} has class folders {unknown} that {split.parent / 'train'} lacks")
    samples = [(p, i) for i, c in enumerate(classes) if (split / c).is_dir() for p in _images(split / c)]
    if not samples:
        raise UserError(f"{split} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); expected {_LAYOUT}")
    return samples


class FolderImageDataset(Dataset):
    """Image files decoded on access, converted to RGB and resized to ``size`` = (height, width)."""

    def __init__(self, samples: list[Sample], size: tuple[int, int], transform: ImageTransform) -> None:
        self.samples = samples
        self.size = size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                rgb = im.convert("RGB").resize(self.size[::-1], Image.Resampling.BILINEAR)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read image {path}: {exc}") from exc
        img = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)
        return self.transform(img), label


class ImageFolderDataModule(ClassificationDataModule):
    """Classification data from folders; classes are the sorted subfolder names of ``train/``.

    Without a ``test/`` folder the validation images double as the test set. Augmentation is a
    random crop out of the image zero-padded by ``image_size // 8`` and a horizontal flip.
    """

    in_memory = False  # decoded from files on access

    def __init__(
        self,
        root: str,
        image_size: int | Sequence[int] = 32,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        seed: int = 0,
        num_workers: int = 0,
        augment: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        train_subset: int | None = None,
        test_subset: int | None = None,
        device_loader: str | bool = "auto",
    ) -> None:
        super().__init__(batch_size, eval_batch_size, seed, num_workers, device_loader)
        check_normalisation(mean, std, 3)
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or any(not isinstance(s, int) or s < 1 for s in size):
            raise UserError(f"data.image_size={image_size!r}; give an integer or [height, width] >= 1")
        self.root = Path(root).expanduser()
        if not (self.root / "train").is_dir():
            raise UserError(f"image folder {self.root / 'train'} not found; expected {_LAYOUT}")
        self.class_names = sorted(d.name for d in (self.root / "train").iterdir() if d.is_dir())
        if not self.class_names:
            raise UserError(f"{self.root / 'train'} has no class subfolders; expected {_LAYOUT}")
        self.num_classes = len(self.class_names)
        self.image_size: tuple[int, int] = (size[0], size[1])
        self.input_shape = (3, *self.image_size)
        self.augment = augment
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.train_subset = train_subset
        self.test_subset = test_subset

    def _subset(self, name: str, samples: list[Sample], n: int | None, rng: np.random.Generator) -> list[Sample]:
        if n is None:
            return samples
        check_count(f"data.{name}", n, 1, len(samples))
        labels = np.array([label for _, label in samples])
        return [samples[i] for i in balanced_indices(labels, n, rng)]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train = _scan(self.root / "train", self.class_names)
        empty = sorted(set(self.class_names) - {self.class_names[label] for _, label in train})
        if empty:
            raise UserError(f"class folders {empty} under {self.root / 'train'} hold no images")
        val = _scan(self.root / "val", self.class_names)
        if (self.root / "test").is_dir():
            test = _scan(self.root / "test", self.class_names)
        else:
            log.info("no %s: the validation images serve as the test set", self.root / "test")
            test = val
        train = self._subset("train_subset", train, self.train_subset, np.random.default_rng((self.seed, 1)))
        test = self._subset("test_subset", test, self.test_subset, np.random.default_rng(0))
        plain = ImageTransform(self.mean, self.std, augment=False, padding=0)
        padding = min(self.image_size) // 8
        augmenting = ImageTransform(self.mean, self.std, self.augment, padding)
        self.train_set = FolderImageDataset(train, self.image_size, augmenting)
        self.calib_set = FolderImageDataset(train, self.image_size, plain)
        self.val_set = FolderImageDataset(val, self.image_size, plain)
        self.test_set = FolderImageDataset(test, self.image_size, plain)
        log.info(
            "image folder %s: %d classes, %d train, %d val, %d test",
            self.root, self.num_classes, len(train), len(val), len(test),
        )
