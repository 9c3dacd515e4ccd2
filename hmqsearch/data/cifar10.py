"""CIFAR-10 from a local folder: ``train.npz``/``test.npz`` arrays or the official python batches."""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hmqsearch.data.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassificationDataModule,
    balanced_indices,
    check_count,
    check_normalisation,
)
from hmqsearch.data.images import ArrayImageDataset, ImageTransform
from hmqsearch.errors import UserError

log = logging.getLogger(__name__)

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BATCHES_DIR = "cifar-10-batches-py"
_EXPECTED = (
    "train.npz and test.npz (arrays x: N x 32 x 32 x 3 uint8 RGB, y: N labels 0..9), "
    f"or the official python version {BATCHES_DIR}/ (data_batch_1..5, test_batch)"
)
_PICKLED = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _check_arrays(x: np.ndarray, y: np.ndarray, source: Path) -> None:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise UserError(f"{source}: x has shape {x.shape} and dtype {x.dtype}; expected N x 32 x 32 x 3 uint8")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{source}: y has shape {y.shape} and dtype {y.dtype}; expected {len(x)} integer labels")
    if len(y) and (y.min() < 0 or y.max() >= len(CLASS_NAMES)):
        raise UserError(f"{source}: labels span {y.min()}..{y.max()}; expected 0..{len(CLASS_NAMES) - 1}")


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise UserError(f"CIFAR-10 file {path} not found; expected {_EXPECTED}")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = sorted({"x", "y"} - set(arrays.files))
            if missing:
                raise UserError(f"{path} has arrays {sorted(arrays.files)} but lacks {missing}; expected {_EXPECTED}")
            return arrays["x"], arrays["y"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read CIFAR-10 file {path}: {exc}") from exc


def _entry(batch: dict[Any, Any], key: str) -> Any:
    """Official batches unpickled with ``encoding="bytes"`` have bytes keys; accept str keys too."""
    return batch.get(key.encode(), batch.get(key))


def _load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise UserError(f"CIFAR-10 batch {path} not found; expected {_EXPECTED}")
    try:
        with path.open("rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise UserError(f"cannot read CIFAR-10 batch {path}: {exc}") from exc
    data = _entry(batch, "data") if isinstance(batch, dict) else None
    labels = _entry(batch, "labels") if isinstance(batch, dict) else None
    if data is None or labels is None:
        raise UserError(f"{path} is not a CIFAR-10 batch: expected a dict with 'data' and 'labels'")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{path}: data has shape {data.shape} and dtype {data.dtype}; expected N x 3072 uint8")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(labels, dtype=np.int64)


def _find_batches(root: Path) -> Path | None:
    """The folder of official python batches: ``root/cifar-10-batches-py`` or ``root`` itself."""
    for folder in (root / BATCHES_DIR, root):
        if any((folder / name).exists() for names in _PICKLED.values() for name in names):
            return folder
    return None


def load_cifar10(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N x 32 x 32 x 3 uint8) and labels (N int64) of the ``"train"`` or ``"test"`` split.

    ``root`` holds ``train.npz``/``test.npz``, or ``cifar-10-batches-py/``, or is that folder.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"CIFAR-10 folder {root} does not exist; expected it to hold {_EXPECTED}")
    if (root / "train.npz").exists() or (root / "test.npz").exists():
        path = root / f"{split}.npz"
        x, y = _load_npz(path)
    else:
        batches = _find_batches(root)
        if batches is None:
            raise UserError(f"CIFAR-10 folder {root} holds no CIFAR-10 files; expected {_EXPECTED}")
        parts = [_load_batch(batches / name) for name in _PICKLED[split]]
        x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        path = batches
    _check_arrays(x, y, path)
    return x, y.astype(np.int64)


def _to_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(y)


class CIFAR10DataModule(ClassificationDataModule):
    """CIFAR-10 with a seeded, class-balanced validation split held out of the training set.

    The validation split (no augmentation) selects checkpoints; the test set is only for the
    final figure. ``train_subset`` / ``test_subset`` take class-balanced subsets for quick runs;
    the test subset does not depend on ``seed`` so that runs with different seeds are compared
    on the same images. ``indices`` holds each split's positions in the source arrays
    (train and val in the training set, test in the test set).
    """

    num_classes = 10
    input_shape = (3, 32, 32)
    class_names = CLASS_NAMES

    def __init__(
        self,
        root: str,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        val_size: int = 5000,
        seed: int = 0,
        num_workers: int = 0,
        augment: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        train_subset: int | None = None,
        test_subset: int | None = None,
        download: bool = False,
        device_loader: str | bool = "auto",
    ) -> None:
        super().__init__(batch_size, eval_batch_size, seed, num_workers, device_loader)
        check_normalisation(mean, std, 3)
        # Exact upper bounds are checked in setup(), once the data's size is known.
        for name, value in (("val_size", val_size), ("train_subset", train_subset), ("test_subset", test_subset)):
            check_count(f"data.{name}", value, 1, 1 << 30)
        self.root = Path(root).expanduser()
        self.val_size = val_size
        self.augment = augment
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.train_subset = train_subset
        self.test_subset = test_subset
        self.download = download
        self.indices: dict[str, np.ndarray] = {}

    def prepare_data(self) -> None:
        """Download the official python version into ``root`` if asked to and nothing is there."""
        if not self.download or _find_batches(self.root) or (self.root / "train.npz").exists():
            return
        try:
            from torchvision.datasets import CIFAR10
        except ImportError as exc:
            raise UserError(
                f"data.download=true needs torchvision, which is not installed; put {_EXPECTED} "
                f"into {self.root} yourself, or install torchvision"
            ) from exc
        for train in (True, False):
            CIFAR10(str(self.root), train=train, download=True)

    def setup(self, stage: str | None = None) -> None:
        """Load the test set, and the train/val splits unless only testing (idempotent)."""
        self.prepare_data()
        plain = ImageTransform(self.mean, self.std, augment=False, padding=0)
        if self.test_set is None:
            x, y = load_cifar10(self.root, "test")
            check_count("data.test_subset", self.test_subset, 1, len(y))
            keep = np.arange(len(y)) if self.test_subset is None else balanced_indices(
                y, self.test_subset, np.random.default_rng(0)
            )
            self.test_set = ArrayImageDataset(*_to_tensors(x[keep], y[keep]), plain)
            self.indices["test"] = keep
        if self.train_set is None and stage not in ("test", "predict"):
            x, y = load_cifar10(self.root, "train")
            check_count("data.val_size", self.val_size, 1, len(y) - 1)
            val = balanced_indices(y, self.val_size, np.random.default_rng((self.seed, 0)))
            train = np.setdiff1d(np.arange(len(y)), val)
            if self.train_subset is not None:
                check_count("data.train_subset", self.train_subset, 1, len(train))
                train = train[balanced_indices(y[train], self.train_subset, np.random.default_rng((self.seed, 1)))]
            images, labels = _to_tensors(x[train], y[train])
            augmenting = ImageTransform(self.mean, self.std, self.augment, padding=4)
            self.train_set = ArrayImageDataset(images, labels, augmenting)
            self.calib_set = ArrayImageDataset(images, labels, plain)
            self.val_set = ArrayImageDataset(*_to_tensors(x[val], y[val]), plain)
            self.indices.update(train=train, val=val)
            n_test = len(self.indices["test"])
            log.info("CIFAR-10 from %s: %d train, %d val, %d test", self.root, len(train), len(val), n_test)
