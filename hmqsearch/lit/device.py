"""Where the run's own passes go: evaluation, calibration, the sensitivity start and the
batch-norm re-estimation run on the device the Lightning stages train on, not on the CPU.

Lightning moves a module to its device for ``fit`` and back to the CPU afterwards; these
passes do the same with :func:`on_device`, so between stages the model stays on the CPU
(where the export and the checkpoints expect it).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from omegaconf import DictConfig, ListConfig
from torch import nn

from hmqsearch.errors import UserError

log = logging.getLogger(__name__)

CUDA_ACCELERATORS = ("gpu", "cuda")


def _cuda_index(devices: object) -> int:
    """This process's GPU: the LOCAL_RANK-th of ``trainer.devices`` when it lists indices
    ([1, 3] or "1,3"), else the LOCAL_RANK-th GPU (Lightning's numbering either way)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if isinstance(devices, str) and "," in devices:
        devices = [int(d) for d in devices.split(",") if d.strip()]
    if isinstance(devices, (list, tuple, ListConfig)):
        return int(devices[local_rank])
    return local_rank


def stage_device(trainer_cfg: DictConfig) -> torch.device:
    """The device ``trainer.accelerator`` / ``trainer.devices`` train on (cpu and cuda; the
    passes of other accelerators run on the CPU)."""
    accelerator = str(trainer_cfg.get("accelerator", "auto")).lower()
    wants_cuda = accelerator in CUDA_ACCELERATORS or (accelerator == "auto" and torch.cuda.is_available())
    if accelerator in CUDA_ACCELERATORS and not torch.cuda.is_available():
        raise UserError(
            f"trainer.accelerator={accelerator}, but torch {torch.__version__} sees no CUDA device; "
            "allowed here: cpu, auto"
        )
    if wants_cuda:
        return torch.device("cuda", _cuda_index(trainer_cfg.get("devices", "auto")))
    if accelerator not in ("cpu", "auto"):
        log.info("trainer.accelerator=%s: evaluation and calibration passes run on the CPU", accelerator)
    return torch.device("cpu")


@contextmanager
def on_device(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``module`` on ``device`` inside the block, back on the device of its first parameter or
    buffer (the CPU for one without) afterwards, also when the block raises."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    home = first.device if first is not None else torch.device("cpu")
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)
