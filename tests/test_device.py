"""Where the run's own passes go: trainer.accelerator / trainer.devices resolved to a device,
and on_device's move-and-return."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from hmqsearch.errors import UserError
from hmqsearch.lit import device as device_mod
from hmqsearch.lit.device import on_device, stage_device


def _cfg(accelerator="auto", devices="auto"):
    return OmegaConf.create({"accelerator": accelerator, "devices": devices})


@pytest.fixture
def cuda_present(monkeypatch):
    monkeypatch.setattr(device_mod.torch.cuda, "is_available", lambda: True)


@pytest.fixture
def cuda_absent(monkeypatch):
    monkeypatch.setattr(device_mod.torch.cuda, "is_available", lambda: False)


def test_cpu_accelerator_and_auto_without_cuda_use_the_cpu(cuda_absent):
    assert stage_device(_cfg("cpu")) == torch.device("cpu")
    assert stage_device(_cfg("auto")) == torch.device("cpu")


def test_an_accelerator_without_its_own_passes_uses_the_cpu(cuda_present):
    assert stage_device(_cfg("tpu")) == torch.device("cpu")


def test_gpu_without_cuda_is_a_user_error_naming_the_value(cuda_absent):
    with pytest.raises(UserError, match=r"trainer.accelerator=gpu, but torch .* sees no CUDA device; allowed here: cpu, auto"):
        stage_device(_cfg("gpu"))


@pytest.mark.parametrize(("accelerator", "devices", "local_rank", "want"), [
    ("auto", "auto", None, "cuda:0"),
    ("gpu", 1, None, "cuda:0"),
    ("cuda", 4, "2", "cuda:2"),         # DDP: each process its LOCAL_RANK-th GPU
    ("gpu", [1, 3], "1", "cuda:3"),     # listed indices: the LOCAL_RANK-th of the list
    ("gpu", "1,3", "0", "cuda:1"),      # Lightning's string form of a list
    ("gpu", "2,", None, "cuda:2"),
])
def test_cuda_device_follows_devices_and_local_rank(cuda_present, monkeypatch, accelerator, devices, local_rank, want):
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert stage_device(_cfg(accelerator, devices)) == torch.device(want)


class _RecordingLinear(nn.Linear):
    """Records the devices it is moved to (this machine may have no second device)."""

    def __init__(self) -> None:
        super().__init__(2, 2)
        self.moves: list[object] = []

    def to(self, *args, **kwargs):  # noqa: ANN002, ANN003
        self.moves.append(args[0])
        return self


def test_on_device_moves_there_and_back_also_when_the_block_raises():
    layer = _RecordingLinear()
    with on_device(layer, torch.device("cuda", 1)) as inside:
        assert inside is layer and layer.moves == [torch.device("cuda", 1)]
    assert layer.moves == [torch.device("cuda", 1), torch.device("cpu")]

    layer.moves.clear()
    with pytest.raises(RuntimeError, match="boom"):
        with on_device(layer, torch.device("cuda", 0)):
            raise RuntimeError("boom")
    assert layer.moves == [torch.device("cuda", 0), torch.device("cpu")]
