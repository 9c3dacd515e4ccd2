"""Data modules: splits, normalisation, augmentation, file formats and their errors."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import MissingMandatoryValue, OmegaConf
from PIL import Image

from hmqsearch.data.cifar10 import CIFAR10DataModule, load_cifar10
from hmqsearch.data.common import IMAGENET_MEAN, IMAGENET_STD
from hmqsearch.data.digits import DigitsDataModule
from hmqsearch.data.image_folder import ImageFolderDataModule
from hmqsearch.data.images import random_crop_flip
from hmqsearch.errors import UserError

CONF = Path(__file__).resolve().parents[1] / "conf"
MEAN = torch.tensor(IMAGENET_MEAN).reshape(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).reshape(3, 1, 1)


def fake_cifar(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(10), n_per_class)  # sorted by class, like the shared copy
    return rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8), y.astype(np.int64)


@pytest.fixture
def npz_root(tmp_path: Path) -> Path:
    for split, n, seed in (("train", 20, 0), ("test", 6, 1)):
        x, y = fake_cifar(n, seed)
        np.savez(tmp_path / f"{split}.npz", x=x, y=y)
    return tmp_path


def test_cifar_splits_are_balanced_disjoint_and_seeded(npz_root: Path) -> None:
    dm = CIFAR10DataModule(str(npz_root), batch_size=16, val_size=50, seed=0)
    dm.setup("fit")
    tr, va = dm.indices["train"], dm.indices["val"]
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (150, 50, 60)
    assert not set(tr) & set(va) and len(set(tr) | set(va)) == 200
    _, y = load_cifar10(npz_root, "train")
    assert np.bincount(y[va], minlength=10).tolist() == [5] * 10

    again = CIFAR10DataModule(str(npz_root), val_size=50, seed=0)
    again.setup("fit")
    other = CIFAR10DataModule(str(npz_root), val_size=50, seed=1)
    other.setup("fit")
    assert np.array_equal(again.indices["val"], va)
    assert not np.array_equal(other.indices["val"], va)

    x, labels = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() <= 9
    assert dm.num_classes == 10 and dm.input_shape == (3, 32, 32) and dm.class_names[0] == "airplane"


def test_cifar_normalises_rgb_pixels_in_chw_order(npz_root: Path) -> None:
    dm = CIFAR10DataModule(str(npz_root), val_size=10, augment=False)
    dm.setup("fit")
    raw, _ = load_cifar10(npz_root, "train")
    for split, dataset in (("train", dm.train_set), ("val", dm.val_set)):
        img, _ = dataset[3]
        pixels = torch.from_numpy(raw[dm.indices[split][3]]).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(img, (pixels - MEAN) / STD)

    unit = CIFAR10DataModule(str(npz_root), val_size=10, mean=[0, 0, 0], std=[1, 1, 1])
    unit.setup("test")
    img, _ = unit.test_set[0]
    assert unit.train_set is None  # testing alone does not load the training arrays
    assert 0 <= img.min() and img.max() <= 1


def test_cifar_subsets_are_class_balanced(npz_root: Path) -> None:
    dm = CIFAR10DataModule(str(npz_root), val_size=50, train_subset=30, test_subset=20, seed=3)
    dm.setup("fit")
    _, y = load_cifar10(npz_root, "train")
    _, y_test = load_cifar10(npz_root, "test")
    assert np.bincount(y[dm.indices["train"]], minlength=10).tolist() == [3] * 10
    assert np.bincount(y_test[dm.indices["test"]], minlength=10).tolist() == [2] * 10
    assert not set(dm.indices["train"]) & set(dm.indices["val"])
    other_seed = CIFAR10DataModule(str(npz_root), val_size=50, test_subset=20, seed=4)
    other_seed.setup("test")
    assert np.array_equal(other_seed.indices["test"], dm.indices["test"])  # fixed for comparisons


def test_random_crop_flip_is_a_shifted_possibly_flipped_copy() -> None:
    img = torch.randint(1, 256, (3, 32, 32), dtype=torch.uint8)  # no zeros, so the padding is visible
    padded = F.pad(img, (4, 4, 4, 4))
    candidates = {
        (top, left, flip): padded[:, top : top + 32, left : left + 32].flip(-1) if flip
        else padded[:, top : top + 32, left : left + 32]
        for top in range(9) for left in range(9) for flip in (False, True)
    }
    torch.manual_seed(0)
    seen = set()
    for _ in range(300):
        out = random_crop_flip(img, 4)
        assert out.shape == img.shape and out.dtype == torch.uint8
        matches = [key for key, cand in candidates.items() if torch.equal(out, cand)]
        assert matches, "output is not a crop of the zero-padded image"
        seen.add(matches[0])
    assert {flip for _, _, flip in seen} == {False, True}
    assert len({(t, l) for t, l, _ in seen}) > 30  # offsets spread over the 9 x 9 grid

    torch.manual_seed(5)
    first = [random_crop_flip(img, 4) for _ in range(5)]
    torch.manual_seed(5)
    assert all(torch.equal(a, random_crop_flip(img, 4)) for a in first)


def test_cifar_loaders_are_reproducible_and_val_is_unaugmented(npz_root: Path) -> None:
    def first_batch(seed: int) -> torch.Tensor:
        dm = CIFAR10DataModule(str(npz_root), batch_size=8, val_size=20, seed=seed)
        dm.setup("fit")
        torch.manual_seed(123)  # what Lightning's seed_everything does for the augmentation
        return next(iter(dm.train_dataloader()))[0]

    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))

    dm = CIFAR10DataModule(str(npz_root), val_size=20)
    dm.setup("fit")
    assert all(torch.equal(a[0], b[0]) for a, b in zip(dm.val_dataloader(), dm.val_dataloader()))
    plain, _ = dm.calib_set[0]  # the same image as train_set[0], without augmentation
    assert any(not torch.equal(dm.train_set[0][0], plain) for _ in range(10))


def test_calibration_batches_are_unaugmented_training_images(npz_root: Path) -> None:
    dm = CIFAR10DataModule(str(npz_root), batch_size=16, val_size=20)
    batches = dm.calibration_batches(3)  # sets itself up when needed
    assert [b.shape for b in batches] == [(16, 3, 32, 32)] * 3
    plain = torch.stack([dm.calib_set[i][0] for i in range(len(dm.calib_set))])
    for img in batches[0]:
        assert (plain == img).flatten(1).all(1).any()
    assert all(torch.equal(a, b) for a, b in zip(batches, dm.calibration_batches(3)))
    assert sum(len(b) for b in dm.calibration_batches(100)) == len(dm.calib_set)
    with pytest.raises(UserError, match="n_batches"):
        dm.calibration_batches(0)


def write_batches(folder: Path, n_per_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """The official python format: pickled dicts with bytes keys, data rows = R, G, B planes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (n_per_batch, 32, 32, 3), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        rows = x.transpose(0, 3, 1, 2).reshape(n_per_batch, -1)
        with (folder / name).open("wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": y, b"data": rows}, f)
        images.append(x)
        labels.append(np.array(y))
    return np.concatenate(images), np.concatenate(labels)


@pytest.mark.parametrize("point_at_batches", [False, True])
def test_reads_the_official_python_batches(tmp_path: Path, point_at_batches: bool) -> None:
    x, y = write_batches(tmp_path / "cifar-10-batches-py", 12)
    root = tmp_path / "cifar-10-batches-py" if point_at_batches else tmp_path
    x_train, y_train = load_cifar10(root, "train")
    x_test, y_test = load_cifar10(root, "test")
    assert np.array_equal(x_train, x[:60]) and np.array_equal(y_train, y[:60])
    assert np.array_equal(x_test, x[60:]) and np.array_equal(y_test, y[60:])
    dm = CIFAR10DataModule(str(root), val_size=10, batch_size=4)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (50, 10, 12)


def test_cifar_errors_name_the_path_and_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nowhere.*does not exist.*train\.npz"):
        load_cifar10(tmp_path / "nowhere", "train")
    with pytest.raises(UserError, match=r"holds no CIFAR-10 files.*cifar-10-batches-py"):
        load_cifar10(tmp_path, "train")

    x, y = fake_cifar(2, 0)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    with pytest.raises(UserError, match=r"test\.npz not found"):
        load_cifar10(tmp_path, "test")
    np.savez(tmp_path / "test.npz", x=x)
    with pytest.raises(UserError, match=r"test\.npz.*lacks \['y'\]"):
        load_cifar10(tmp_path, "test")
    np.savez(tmp_path / "test.npz", x=x.transpose(0, 3, 1, 2), y=y)
    with pytest.raises(UserError, match=r"test\.npz: x has shape \(20, 3, 32, 32\).*N x 32 x 32 x 3"):
        load_cifar10(tmp_path, "test")
    np.savez(tmp_path / "test.npz", x=x, y=y[:5])
    with pytest.raises(UserError, match=r"test\.npz: y has shape \(5,\)"):
        load_cifar10(tmp_path, "test")
    (tmp_path / "test.npz").write_bytes(b"not a zip file")
    with pytest.raises(UserError, match=r"cannot read CIFAR-10 file .*test\.npz"):
        load_cifar10(tmp_path, "test")

    batches = tmp_path / "py"
    write_batches(batches / "cifar-10-batches-py", 2)
    (batches / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UserError, match=r"data_batch_3 not found"):
        load_cifar10(batches, "train")

    np.savez(tmp_path / "test.npz", x=x, y=y)
    with pytest.raises(UserError, match=r"data\.val_size=20; allowed: an integer from 1 to 19"):
        CIFAR10DataModule(str(tmp_path), val_size=20).setup("fit")
    with pytest.raises(UserError, match="mean"):
        CIFAR10DataModule(str(tmp_path), mean=[0.5, 0.5])


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_download_without_torchvision_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="needs torchvision"):
        CIFAR10DataModule(str(tmp_path / "cifar"), download=True).setup("fit")


def test_real_cifar10_split_and_statistics(shared_data: Path) -> None:
    dm = CIFAR10DataModule(str(shared_data / "cifar10"), augment=False)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (45_000, 5_000, 10_000)
    assert torch.bincount(dm.val_set.labels).tolist() == [500] * 10
    calib = torch.cat(dm.calibration_batches(8))
    # The data's own channel means (0.4914, 0.4822, 0.4465), seen through the ImageNet normalisation.
    expected = (torch.tensor([0.4914, 0.4822, 0.4465]) - MEAN.flatten()) / STD.flatten()
    torch.testing.assert_close(calib.mean((0, 2, 3)), expected, atol=0.05, rtol=0)


def write_image_folder(root: Path, splits: dict[str, int]) -> dict[str, tuple[int, int, int]]:
    """Solid-colour images of varied sizes and formats, one colour per class."""
    colours = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}
    for split, n in splits.items():
        for name, colour in colours.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                suffix = ".png" if i % 2 else ".jpg"
                Image.new("RGB", (12 + i, 10), colour).save(root / split / name / f"{i}{suffix}")
    return colours


def test_image_folder_reads_resizes_and_labels(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": 4, "val": 2})
    (tmp_path / "train" / "red" / "notes.txt").write_text("ignored")
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, batch_size=5, mean=[0, 0, 0], std=[1, 1, 1])
    assert dm.class_names == ["blue", "green", "red"] and dm.num_classes == 3 and dm.input_shape == (3, 16, 16)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (12, 6, 6)  # test falls back to val
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (6, 3, 16, 16) and y.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(x.mean((2, 3)).argmax(1), torch.tensor([2, 2, 1, 1, 0, 0]))  # blue is channel 2
    assert [b.shape for b in dm.calibration_batches(2)] == [(5, 3, 16, 16)] * 2

    write_image_folder(tmp_path / "with_test", {"train": 2, "val": 1, "test": 3})
    dm = ImageFolderDataModule(str(tmp_path / "with_test"), image_size=[8, 12], test_subset=6)
    dm.setup("fit")
    assert len(dm.test_set) == 6 and dm.test_set[0][0].shape == (3, 8, 12)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"train not found.*root/train/<class>"):
        ImageFolderDataModule(str(tmp_path))
    write_image_folder(tmp_path, {"train": 2})
    with pytest.raises(UserError, match=r"val not found"):
        ImageFolderDataModule(str(tmp_path)).setup("fit")
    write_image_folder(tmp_path, {"val": 1})
    (tmp_path / "val" / "zebra").mkdir()
    with pytest.raises(UserError, match=r"class folders \['zebra'\]"):
        ImageFolderDataModule(str(tmp_path)).setup("fit")
    (tmp_path / "val" / "zebra").rmdir()
    (tmp_path / "train" / "red" / "broken.png").write_bytes(b"not an image")
    dm = ImageFolderDataModule(str(tmp_path))
    dm.setup("fit")
    broken = next(i for i, (p, _) in enumerate(dm.train_set.samples) if p.name == "broken.png")
    with pytest.raises(UserError, match=r"cannot read image .*broken\.png"):
        dm.train_set[broken]
    with pytest.raises(UserError, match="image_size"):
        ImageFolderDataModule(str(tmp_path), image_size=[8])


def test_digits_split_is_stratified_disjoint_and_seeded() -> None:
    dm = DigitsDataModule(seed=0)
    dm.setup("fit")
    idx = dm.indices
    assert (len(idx["train"]), len(idx["val"]), len(idx["test"])) == (1257, 180, 360)
    assert len(set(idx["train"]) | set(idx["val"]) | set(idx["test"])) == 1797
    from sklearn.datasets import load_digits

    y = load_digits().target
    for split, n in (("val", 180), ("test", 360)):
        counts = np.bincount(y[idx[split]], minlength=10)
        assert np.all(np.abs(counts - n / 10) <= 1), (split, counts)

    same, other = DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    same.setup("fit")
    other.setup("fit")
    assert np.array_equal(same.indices["test"], idx["test"])
    assert not np.array_equal(other.indices["test"], idx["test"])

    x, labels = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32 and labels.dtype == torch.int64
    train = dm.train_set.tensors[0]
    assert abs(float(train.mean())) < 1e-4 and abs(float(train.std()) - 1) < 1e-2
    assert dm.num_classes == 10 and dm.input_shape == (1, 8, 8)
    assert [b.shape for b in dm.calibration_batches(2)] == [(64, 1, 8, 8)] * 2
    with pytest.raises(UserError, match="val_size"):
        DigitsDataModule(val_size=5)


def test_data_configs_match_the_constructors(npz_root: Path) -> None:
    write_image_folder(npz_root / "images", {"train": 1, "val": 1})
    overrides = {
        "digits": {},
        "cifar10": {"root": str(npz_root), "val_size": 20},
        "image_folder": {"root": str(npz_root / "images")},
    }
    for name, override in overrides.items():
        cfg = OmegaConf.create({"seed": 3, "data": OmegaConf.load(CONF / "data" / f"{name}.yaml")})
        if "root" in override:
            with pytest.raises(MissingMandatoryValue):  # data is never found silently
                instantiate(cfg.data)
        dm = instantiate(OmegaConf.merge(cfg, {"data": override}).data)
        assert dm.seed == 3 and cfg.data._target_.endswith(type(dm).__name__)
        assert [b.shape[1:] for b in dm.calibration_batches(1)] == [dm.input_shape]
