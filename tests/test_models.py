"""Model zoo and pretrained loading: architectures, published accuracy, the loader's errors."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
import torch.fx
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from hmqsearch.data.cifar10 import CIFAR10DataModule
from hmqsearch.errors import UserError
from hmqsearch.models.mobilenetv2_cifar import mobilenetv2_cifar
from hmqsearch.models.pretrained import load_pretrained
from hmqsearch.models.resnet_cifar import resnet20, resnet32, resnet44, resnet56
from hmqsearch.models.small_cnn import SmallCNN

CONF = Path(__file__).resolve().parents[1] / "conf"
WEIGHTS = {
    resnet20: "resnet20-12fca82f.th",
    resnet32: "resnet32-d509ac18.th",
    resnet44: "resnet44-014dd654.th",
    resnet56: "resnet56-4bfd9763.th",
}


@pytest.mark.parametrize(
    "build, shape, max_params",
    [
        (resnet20, (2, 3, 32, 32), 280_000),
        (lambda: mobilenetv2_cifar(width_mult=0.5), (2, 3, 32, 32), 1_000_000),
        (SmallCNN, (2, 1, 8, 8), 10_000),
    ],
)
def test_forward_shape_size_and_traceable(build, shape: tuple[int, ...], max_params: int) -> None:
    model = build().eval()
    assert model(torch.randn(shape)).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) < max_params
    torch.fx.symbolic_trace(model)  # batch-norm folding traces the model


@pytest.mark.parametrize(
    "name", ["small_cnn", "resnet20", "resnet32", "resnet44", "resnet56", "mobilenetv2_cifar"]
)
def test_model_configs_build_their_network(name: str) -> None:
    cfg = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    assert set(cfg) == {"net", "pretrained"} and cfg.pretrained is None
    net = instantiate(cfg.net).eval()
    shape = (1, 1, 8, 8) if name == "small_cnn" else (1, 3, 32, 32)
    assert net(torch.randn(shape)).shape == (1, cfg.net.num_classes)


def test_resnet_layout_matches_the_published_architecture() -> None:
    model = resnet20()
    assert sum(p.numel() for p in model.parameters()) == 269_722  # "0.27 M"
    keys = model.state_dict().keys()
    assert {"conv1.weight", "bn1.running_var", "layer3.2.bn2.bias", "linear.weight", "linear.bias"} <= set(keys)
    assert all(not k.startswith("layer") or k.split(".")[2] in {"conv1", "bn1", "conv2", "bn2"} for k in keys)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert [len(s) for s in (resnet56().layer1, resnet56().layer2, resnet56().layer3)] == [9, 9, 9]
    x = torch.randn(1, 16, 32, 32)
    out = model.layer2[0].shortcut(x)  # option A: subsample, zero channels on both sides
    assert out.shape == (1, 32, 16, 16)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2]) and not out[:, :8].any() and not out[:, 24:].any()


def test_mobilenetv2_has_depthwise_convolutions() -> None:
    model = mobilenetv2_cifar()
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert model.features[0][0].stride == (1, 1)
    assert model.features(torch.randn(1, 3, 32, 32)).shape[-2:] == (4, 4)
    with pytest.raises(UserError, match="width_mult"):
        mobilenetv2_cifar(width_mult=0)


def test_pretrained_resnet20_reaches_its_published_accuracy(shared_data: Path) -> None:
    dm = CIFAR10DataModule(str(shared_data / "cifar10"), eval_batch_size=500, test_subset=1000)
    dm.setup("test")
    model = resnet20()
    meta = load_pretrained(model, str(shared_data / "weights" / WEIGHTS[resnet20]))
    assert meta["best_prec1"] == pytest.approx(91.78, abs=0.01)
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            correct += int((model(x).argmax(1) == y).sum())
    accuracy = 100 * correct / len(dm.test_set)
    print(f"ResNet-20 top-1 on the class-balanced 1000-image test slice: {accuracy:.2f} %")
    assert abs(accuracy - 91.73) <= 1.5


@pytest.mark.parametrize("build", [resnet32, resnet44, resnet56])
def test_deeper_resnets_load_their_weights(shared_data: Path, build) -> None:
    model = build()
    load_pretrained(model, str(shared_data / "weights" / WEIGHTS[build]))
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_loader_accepts_raw_and_wrapped_state_dicts(tmp_path: Path) -> None:
    source = SmallCNN().eval()
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "raw.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 7}, tmp_path / "wrapped.pt")
    x = torch.randn(3, 1, 8, 8)
    for name, meta in (("raw.pt", {}), ("wrapped.pt", {"epoch": 7})):
        model = SmallCNN().eval()
        assert load_pretrained(model, str(tmp_path / name)) == meta
        torch.testing.assert_close(model(x), source(x))
    digest = sha256(tmp_path / "raw.pt")
    load_pretrained(SmallCNN(), str(tmp_path / "raw.pt"), sha256=digest[:12].upper())


def test_loader_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"missing\.pt not found"):
        load_pretrained(SmallCNN(), str(tmp_path / "missing.pt"))

    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match=r"cannot read pretrained weights .*corrupt\.pt"):
        load_pretrained(SmallCNN(), str(tmp_path / "corrupt.pt"))

    torch.save(resnet20().state_dict(), tmp_path / "other.pt")
    fit = r"other\.pt do not fit SmallCNN: missing: .*block_conv1\.weight.*unexpected: .*layer1"
    with pytest.raises(UserError, match=fit):
        load_pretrained(SmallCNN(), str(tmp_path / "other.pt"))

    torch.save(SmallCNN(width=8).state_dict(), tmp_path / "narrow.pt")
    shapes = r"narrow\.pt .*shape mismatch: conv1\.weight \(file \(8, 1, 3, 3\), model \(16, 1, 3, 3\)\)"
    with pytest.raises(UserError, match=shapes):
        load_pretrained(SmallCNN(), str(tmp_path / "narrow.pt"))

    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(UserError, match=r"list\.pt holds no state_dict"):
        load_pretrained(SmallCNN(), str(tmp_path / "list.pt"))

    torch.save(SmallCNN().state_dict(), tmp_path / "model-deadbeef.pt")
    with pytest.raises(UserError, match=r"model-deadbeef\.pt have sha256 [0-9a-f]{64}.*'-deadbeef\.'"):
        load_pretrained(SmallCNN(), str(tmp_path / "model-deadbeef.pt"))
    with pytest.raises(UserError, match=r"does not match given sha256"):
        load_pretrained(SmallCNN(), str(tmp_path / "narrow.pt"), sha256="0" * 64)


def test_url_downloads_into_the_hub_cache_and_verifies(tmp_path: Path, monkeypatch, shared_data: Path) -> None:
    fetched: list[str] = []

    def fake_download(url: str, dst: str, progress: bool = True) -> None:  # no network in tests
        fetched.append(url)
        shutil.copy(shared_data / "weights" / WEIGHTS[resnet20], dst)

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    base = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
    for _ in range(2):
        load_pretrained(resnet20(), base + WEIGHTS[resnet20])
    assert fetched == [base + WEIGHTS[resnet20]]  # cached after the first download
    assert (tmp_path / "hub" / "checkpoints" / WEIGHTS[resnet20]).is_file()

    with pytest.raises(UserError, match=r"resnet20-12fca82e\.th have sha256 12fca82f.*download was removed"):
        load_pretrained(resnet20(), base + "resnet20-12fca82e.th")  # the name promises another hash
    assert not (tmp_path / "hub" / "checkpoints" / "resnet20-12fca82e.th").exists()
