"""scikit-learn's bundled 8x8 digits: the embedded default data set, no download needed."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from hmqsearch.data.common import ClassificationDataModule, check_count

N_DIGITS = 1797
N_CLASSES = 10


class DigitsDataModule(ClassificationDataModule):
    """1797 images of 1 x 8 x 8, split stratified by class into train/val/test from ``seed``.

    Pixels (0..16) are scaled to [0, 1], then normalised with the training split's mean and
    std (exposed as ``mean`` / ``std`` after ``setup``; ``indices`` holds each split's positions
    in ``load_digits()``). No augmentation.
    """

    num_classes = N_CLASSES
    input_shape = (1, 8, 8)
    class_names = [str(d) for d in range(N_CLASSES)]

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int = 512,
        val_size: int = 180,
        test_size: int = 360,
        seed: int = 0,
        num_workers: int = 0,
        device_loader: str | bool = "auto",
    ) -> None:
        super().__init__(batch_size, eval_batch_size, seed, num_workers, device_loader)
        # A stratified split needs at least one sample per class on every side.
        check_count("data.val_size", val_size, N_CLASSES, N_DIGITS - 2 * N_CLASSES)
        check_count("data.test_size", test_size, N_CLASSES, N_DIGITS - N_CLASSES - val_size)
        self.val_size = val_size
        self.test_size = test_size
        self.mean: float | None = None
        self.std: float | None = None
        self.indices: dict[str, np.ndarray] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        digits = load_digits()
        x = digits.images.astype(np.float32) / 16.0
        y = digits.target.astype(np.int64)
        rest, test = train_test_split(np.arange(len(y)), test_size=self.test_size, stratify=y, random_state=self.seed)
        train, val = train_test_split(rest, test_size=self.val_size, stratify=y[rest], random_state=self.seed)
        self.mean, self.std = float(x[train].mean()), float(x[train].std())
        self.indices = {"train": train, "val": val, "test": test}

        def tensors(idx: np.ndarray) -> TensorDataset:
            images = torch.from_numpy((x[idx] - self.mean) / self.std).unsqueeze(1)
            return TensorDataset(images, torch.from_numpy(y[idx]))

        self.train_set = self.calib_set = tensors(train)
        self.val_set = tensors(val)
        self.test_set = tensors(test)
