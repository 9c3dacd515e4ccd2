"""Training batches cut on the device (data.device_loader): the same order and pixels as the
DataLoader path, crops and flips as the per-image transform makes them, exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from hmqsearch.data.cifar10 import CIFAR10DataModule
from hmqsearch.data.common import IMAGENET_MEAN, IMAGENET_STD
from hmqsearch.data.device_batches import DeviceBatches, crop_flip, in_memory
from hmqsearch.data.digits import DigitsDataModule
from hmqsearch.data.image_folder import ImageFolderDataModule
from hmqsearch.errors import UserError
from hmqsearch.lit.classifier import ClassifierModule
from hmqsearch.models.small_cnn import SmallCNN

MEAN = torch.tensor(IMAGENET_MEAN).reshape(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).reshape(3, 1, 1)


@pytest.fixture
def npz_root(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 23), ("test", 6)):
        y = np.repeat(np.arange(10), n).astype(np.int64)
        np.savez(tmp_path / f"{split}.npz", x=rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8), y=y)
    return tmp_path


def cifar(root: Path, device_loader: str | bool, augment: bool = True, batch_size: int = 32) -> CIFAR10DataModule:
    dm = CIFAR10DataModule(str(root), batch_size=batch_size, val_size=20, seed=5, augment=augment,
                           device_loader=device_loader)
    dm.setup("fit")
    return dm


def epoch_batches(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)  # what Lightning does before every epoch
    return list(loader)


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        assert xa.dtype == xb.dtype and xa.shape == xb.shape and xa.is_contiguous()
        assert torch.equal(xa, xb)


@pytest.mark.parametrize("epoch", [0, 1])
def test_unaugmented_batches_equal_the_dataloader_path(npz_root: Path, epoch: int) -> None:
    loader = cifar(npz_root, False, augment=False).train_dataloader()
    batches = cifar(npz_root, True, augment=False).train_dataloader()
    assert isinstance(loader, DataLoader) and isinstance(batches, DeviceBatches)
    assert len(batches) == len(loader) == -(-210 // 32)  # 230 training images, 20 held out
    assert_same_batches(epoch_batches(batches, epoch), epoch_batches(loader, epoch))


def test_digits_batches_equal_the_dataloader_path() -> None:
    modules = [DigitsDataModule(seed=2, device_loader=d) for d in (False, True)]
    for dm in modules:
        dm.setup("fit")
    loader, batches = (dm.train_dataloader() for dm in modules)
    assert isinstance(batches, DeviceBatches)
    assert_same_batches(epoch_batches(batches, 3), epoch_batches(loader, 3))


def test_crop_flip_is_the_per_image_crop_then_flip() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 5, 7), dtype=torch.uint8, generator=gen)
    top, left = torch.tensor([0, 4, 2, 8, 1, 3]), torch.tensor([8, 0, 3, 1, 2, 5])
    flip = torch.tensor([False, True, True, False, True, False])
    out = crop_flip(images, top, left, flip, padding=4)
    assert out.shape == images.shape and out.dtype == torch.uint8 and out.is_contiguous()
    for i in range(len(images)):
        padded = F.pad(images[i], (4, 4, 4, 4))
        want = padded[:, top[i] : top[i] + 5, left[i] : left[i] + 7]
        assert torch.equal(out[i], want.flip(-1) if flip[i] else want)
    # offsets (4, 4) without a flip give the image back; (0, 0) shifts it down-right into black padding
    assert torch.equal(crop_flip(images, torch.full((6,), 4), torch.full((6,), 4), torch.zeros(6, dtype=torch.bool), 4), images)
    corner = crop_flip(images, torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.bool), 4)
    assert (corner[:, :, :4] == 0).all() and (corner[:, :, :, :4] == 0).all()
    assert torch.equal(corner[:, :, 4:, 4:], images[:, :, :1, :3])


def test_augmented_batches_are_crops_and_flips_of_the_right_images(npz_root: Path) -> None:
    dm = cifar(npz_root, True)
    batches = dm.train_dataloader()
    images = dm.train_set.images
    top, left, flip = batches.augmentation(2)
    assert top.min() >= 0 and top.max() <= 8 and left.min() >= 0 and left.max() <= 8
    assert 0 < int(flip.sum()) < len(flip) and len(set(top.tolist())) == 9  # every offset drawn in 210 images
    order = epoch_batches(batches, 2)
    positions = batches.sampler.epoch_order()
    for b, (x, y) in enumerate(order):
        for j in range(len(y)):
            p = b * 32 + j
            i = int(positions[p])
            padded = F.pad(images[i], (4, 4, 4, 4))
            crop = padded[:, top[p] : top[p] + 32, left[p] : left[p] + 32]
            crop = crop.flip(-1) if flip[p] else crop
            assert torch.equal(x[j], (crop.float() / 255.0 - MEAN) / STD)
            assert y[j] == dm.train_set.labels[i]
    again = cifar(npz_root, True).train_dataloader()
    assert_same_batches(epoch_batches(again, 2), order)  # a function of (seed, epoch)
    other = epoch_batches(cifar(npz_root, True).train_dataloader(), 3)
    assert not torch.equal(other[0][0], order[0][0])


@pytest.mark.parametrize("batches_done", [3, 7])  # mid-epoch, and at the end of epoch 1 (7 batches)
def test_resume_continues_with_the_same_batches(npz_root: Path, batches_done: int) -> None:
    reference = cifar(npz_root, True).train_dataloader()
    epoch1, epoch2 = epoch_batches(reference, 1), epoch_batches(reference, 2)
    resumed = cifar(npz_root, True)
    resumed.load_state_dict({"epoch": 1, "batches_done": batches_done})
    batches = resumed.train_dataloader()
    expected = epoch1[batches_done:] if batches_done < len(epoch1) else epoch2
    expected_epoch = 1 if batches_done < len(epoch1) else 2
    assert_same_batches(epoch_batches(batches, expected_epoch), expected)
    assert_same_batches(epoch_batches(batches, expected_epoch + 1), epoch_batches(reference, expected_epoch + 1))


def test_lightning_trains_identically_from_either_path() -> None:
    """A whole Lightning fit (set_epoch, len, batch transfer) on the CPU: same weights."""
    weights = []
    for device_loader in (False, True):
        pl.seed_everything(0)
        dm = DigitsDataModule(seed=0, device_loader=device_loader)
        module = ClassifierModule(SmallCNN(num_classes=10, in_channels=1), 10, torch.optim.SGD, lr=0.05)
        trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             limit_val_batches=0)
        trainer.fit(module, datamodule=dm)
        assert isinstance(dm.train_dataloader(), DeviceBatches if device_loader else DataLoader)
        weights.append([p.detach().clone() for p in module.parameters()])
    for a, b in zip(*weights):
        assert torch.equal(a, b)


def test_auto_uses_the_dataloader_off_the_gpu(npz_root: Path) -> None:
    assert isinstance(cifar(npz_root, "auto").train_dataloader(), DataLoader)


def test_bad_device_loader_values_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"data.device_loader='gpu'; allowed: auto, true, false"):
        DigitsDataModule(device_loader="gpu")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="device_loader=true.*files.*allowed here: auto, false"):
        ImageFolderDataModule(str(tmp_path), device_loader=True)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_gpu_batches_equal_the_cpu_ones(npz_root: Path) -> None:
    dm = cifar(npz_root, True)
    on_cpu = epoch_batches(dm.train_dataloader(), 1)
    on_gpu = epoch_batches(DeviceBatches(in_memory(dm.train_set), 32, dm._train_sampler(), torch.device("cuda")), 1)
    assert all(x.is_cuda and y.is_cuda for x, y in on_gpu)
    assert_same_batches([(x.cpu(), y.cpu()) for x, y in on_gpu], on_cpu)


@pytest.mark.gpu
@needs_cuda
def test_auto_cuts_batches_on_a_single_gpu_trainer() -> None:
    dm = DigitsDataModule(seed=0)
    module = ClassifierModule(SmallCNN(num_classes=10, in_channels=1), 10, torch.optim.SGD, lr=0.05)
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    batches = dm.train_dataloader()
    assert isinstance(batches, DeviceBatches) and batches.images.is_cuda


@pytest.mark.gpu
@needs_cuda
def test_a_gpu_batch_is_cut_without_waiting_for_the_gpu(npz_root: Path) -> None:
    from test_gpu_step import host_reads  # tests/ is on sys.path (pytest prepend import mode)

    dm = cifar(npz_root, True)
    batches = iter(DeviceBatches(in_memory(dm.train_set), 32, dm._train_sampler(), torch.device("cuda")))
    next(batches)  # the epoch's order and crops go to the GPU once, at its start
    assert host_reads(lambda: next(batches)) == []
