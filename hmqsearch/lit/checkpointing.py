"""What makes a stage's checkpoints safe to resume from: atomic writes, the RNG state, a
checkpoint on SIGTERM (pre-emption), and periodic step checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from hmqsearch.io import atomic_write

log = logging.getLogger(__name__)

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, writing to a temporary file renamed onto the final name:
    a run killed while saving keeps the previous checkpoint intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        atomic_write(path, lambda tmp: super(AtomicCheckpointIO, self).save_checkpoint(checkpoint, tmp, storage_options))


class RngState(Callback):
    """Saves the torch / numpy / python RNG states in each checkpoint and restores them on
    resume, so the Gumbel noise after a resume is the noise the uninterrupted run draws."""

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _collect_rng_states(include_cuda=True)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _set_rng_states(state_dict["rng"])


class CheckpointOnSigterm(Callback):
    """On SIGTERM Lightning finishes the current batch and raises ``SIGTERMException``; this
    writes ``last.ckpt`` at that batch boundary first, so a pre-empted run loses nothing."""

    def __init__(self, dirpath: Path) -> None:
        self.path = Path(dirpath) / LAST

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)
            log.warning("SIGTERM: saved %s", self.path)


def step_checkpoint(dirpath: Path, every_n_steps: int) -> ModelCheckpoint | None:
    """``last.ckpt`` every ``every_n_steps`` optimizer steps (mid-epoch), besides the epoch-end one;
    none for 0."""
    if not every_n_steps:
        return None
    return ModelCheckpoint(
        dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=every_n_steps,
        save_on_train_epoch_end=False, enable_version_counter=False,
    )
