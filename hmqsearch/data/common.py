"""What the data modules share: class-balanced subsets, loaders, calibration."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from hmqsearch.data.device_batches import DeviceBatches, in_memory
from hmqsearch.data.sampler import EpochShuffleSampler
from hmqsearch.errors import UserError

log = logging.getLogger(__name__)

# The pretrained CIFAR ResNets were trained with the ImageNet statistics, not CIFAR's own.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def balanced_indices(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` sorted indices drawn at random with per-class counts as equal as the classes allow."""
    if not 0 <= n <= len(labels):
        raise ValueError(f"cannot draw {n} of {len(labels)} samples")
    rank = np.empty(len(labels), dtype=np.int64)  # position of each sample in its class's shuffle
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank[rng.permutation(members)] = np.arange(len(members))
    order = np.lexsort((rng.random(len(labels)), rank))
    return np.sort(order[:n])


def check_count(name: str, value: int | None, low: int, high: int) -> None:
    """Raise a ``UserError`` unless ``value`` is None or an integer in ``[low, high]``."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise UserError(f"{name}={value!r}; allowed: an integer from {low} to {high}")


def check_normalisation(mean: Sequence[float], std: Sequence[float], channels: int) -> None:
    if len(mean) != channels or len(std) != channels:
        raise UserError(f"data.mean={list(mean)} / data.std={list(std)}: give {channels} values each")
    if any(s <= 0 for s in std):
        raise UserError(f"data.std={list(std)}; every value must be > 0")


class ClassificationDataModule(pl.LightningDataModule):
    """Loaders and calibration batches over the ``train_set`` / ``val_set`` / ``test_set`` that a
    subclass's ``setup`` fills in; ``calib_set`` is the training set without augmentation.

    ``device_loader`` (``data.device_loader``) picks where training batches come from for a data
    set held in memory (``in_memory``): ``"auto"`` cuts them on the training device when that
    is a single GPU (:class:`~hmqsearch.data.device_batches.DeviceBatches`) and uses a
    DataLoader otherwise, ``True`` always cuts them on the trainer's device (the CPU too),
    ``False`` always uses the DataLoader.
    """

    num_classes: int
    input_shape: tuple[int, int, int]
    class_names: list[str]
    in_memory: bool = True  # the training set is tensors in memory (DeviceBatches can serve it)

    def __init__(
        self, batch_size: int, eval_batch_size: int, seed: int, num_workers: int, device_loader: str | bool = "auto"
    ) -> None:
        super().__init__()
        check_count("data.batch_size", batch_size, 1, 1 << 20)
        check_count("data.eval_batch_size", eval_batch_size, 1, 1 << 20)
        check_count("data.num_workers", num_workers, 0, 1024)
        if device_loader != "auto" and not isinstance(device_loader, bool):
            raise UserError(f"data.device_loader={device_loader!r}; allowed: auto, true, false")
        if device_loader is True and not self.in_memory:
            raise UserError(
                f"data.device_loader=true: {type(self).__name__} decodes its images from files on access, "
                "it does not hold them in memory; allowed here: auto, false"
            )
        self.device_loader = device_loader
        self._device_batches: DeviceBatches | None = None
        self._announced_loader = False
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.calib_set: Dataset | None = None
        self._resume_position: dict[str, int] | None = None

    def _loader(self, dataset: Dataset | None, batch_size: int) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its loaders are asked for")
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
        )

    def _training_device(self) -> torch.device | None:
        """The device to cut training batches on, or None for the DataLoader (``device_loader``)."""
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        ranks = trainer.world_size if trainer is not None else 1
        if self.device_loader is False:
            return None
        if self.device_loader is True:
            if ranks > 1:
                raise UserError(
                    f"data.device_loader=true serves one process, this run has {ranks}; allowed with DDP: auto, false"
                )
            return device
        return device if device.type == "cuda" and ranks == 1 and self.in_memory else None

    def _announce(self, message: str, *args: object) -> None:
        if not self._announced_loader:
            self._announced_loader = True
            log.info(message, *args)

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        """Shuffled by an :class:`EpochShuffleSampler`: the order is a function of (seed, epoch),
        and a checkpoint taken mid-epoch resumes at the next unseen batch. A DataLoader, or
        :class:`DeviceBatches` on the training device (``device_loader``)."""
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its loaders are asked for")
        sampler = self._train_sampler()
        device = self._training_device()
        data = in_memory(self.train_set) if device is not None else None
        if device is not None and data is None:
            raise RuntimeError(
                f"{type(self).__name__}.in_memory is True but its train_set ({type(self.train_set).__name__}) "
                "holds no tensors DeviceBatches can serve"
            )
        if data is not None:
            if self._device_batches is None or self._device_batches.device != device:
                self._device_batches = DeviceBatches(data, self.batch_size, sampler, device)
            self._device_batches.sampler = sampler
            augmented = data.pixels is not None and data.pixels.augment
            self._announce("training batches: %d images held on %s, cut%s there, no loader workers "
                           "(data.device_loader=%s)", len(data.labels), device, " and cropped/flipped" if augmented else "",
                           str(self.device_loader).lower())
            return self._device_batches
        self._announce("training batches: DataLoader with %d worker(s) (data.device_loader=%s%s)", self.num_workers,
                       str(self.device_loader).lower(), "" if self.in_memory else "; images are read from files")
        return DataLoader(
            self.train_set, batch_size=self.batch_size, sampler=sampler, generator=sampler.generator,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _train_sampler(self) -> EpochShuffleSampler:
        """A sampler over the training set, positioned where a loaded checkpoint left off."""
        assert self.train_set is not None
        sampler = EpochShuffleSampler(len(self.train_set), self.seed)
        if self._resume_position is not None:
            position, self._resume_position = self._resume_position, None
            n_batches = -(-len(self.train_set) // self.batch_size)
            if position["batches_done"] >= n_batches:  # saved at the end of an epoch
                sampler.resume_at(position["epoch"] + 1, 0)
            else:
                sampler.resume_at(position["epoch"], position["batches_done"] * self.batch_size)
        return sampler

    def state_dict(self) -> dict[str, int]:
        """Where training stands in the data (saved in every Lightning checkpoint)."""
        trainer = self.trainer
        if trainer is None or not trainer.training or trainer.world_size > 1:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_position = dict(state) if state else None

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size)

    def calibration_batches(self, n_batches: int) -> list[Tensor]:
        """``n_batches`` batches (``batch_size`` each, fewer if the set is small) of unaugmented
        training images, the same ones for a given seed."""
        check_count("calibration_batches(n_batches)", n_batches, 1, 1 << 20)
        if self.calib_set is None:
            self.setup("fit")
        assert self.calib_set is not None
        n = min(len(self.calib_set), n_batches * self.batch_size)
        order = torch.randperm(len(self.calib_set), generator=torch.Generator().manual_seed(self.seed))[:n]
        images = torch.stack([self.calib_set[int(i)][0] for i in order])
        return list(images.split(self.batch_size))
