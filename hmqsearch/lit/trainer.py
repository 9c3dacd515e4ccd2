"""Lightning Trainer, callbacks and experiment loggers of each stage, built from their Hydra nodes.

conf/trainer, conf/callbacks and conf/logger name their classes with ``_target_`` (as
lightning-hydra-template does) and are built with ``hydra.utils.instantiate``.  What differs
from stage to stage is passed in here: the epochs, the stage's logger and callbacks to the
Trainer; to each callback whose target takes them (and whose node does not set them) the
stage's checkpoint folder ``dirpath``, its name ``stage``, its monitored metric ``monitor`` and
the best checkpoint's ``filename``.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback, ProgressBar, RichProgressBar
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger


class RunLoggers:
    """A run's experiment tracking, shared by its stages: this base tracks nothing (``logger=none``;
    the console and train.log only), its subclasses are the other ``logger=`` options."""

    def __init__(self, run_dir: Path, run_config: dict[str, Any]) -> None:
        self.run_dir, self.run_config = Path(run_dir), run_config

    def for_stage(self, stage: str) -> Logger | bool:
        """The Lightning logger of one stage (False: none)."""
        return False

    def log_summary(self, summary: dict[str, Any]) -> None:
        """Record the run's final figures (the summary's scalars)."""

    def finish(self, exit_code: int = 0) -> None:
        """Close the tracking run; a second call does nothing."""


class CSVLoggers(RunLoggers):
    """One CSV file per stage: ``<run dir>/csv/<stage>/metrics.csv``."""

    def for_stage(self, stage: str) -> Logger:
        return CSVLogger(self.run_dir, name="csv", version=stage)


class WandbLoggers(RunLoggers):
    """One Weights & Biases run for the whole run, metrics prefixed by stage; the resolved
    configuration is recorded once, the summary's scalars at the end."""

    def __init__(
        self, run_dir: Path, run_config: dict[str, Any], project: str = "hmqsearch", name: str | None = None,
        mode: str = "offline",
    ) -> None:
        super().__init__(run_dir, run_config)
        self.project, self.name, self.offline = project, name, mode == "offline"
        self._wandb_run = None

    def for_stage(self, stage: str) -> Logger:
        import wandb

        logger = WandbLogger(
            project=self.project, name=self.name, save_dir=str(self.run_dir), offline=self.offline, prefix=stage,
            experiment=self._wandb_run,
            config=self.run_config if self._wandb_run is None else None,
            settings=wandb.Settings(silent=True),  # no banner, no history and summary on the console
        )
        # Lightning passes anonymous=None, which recent wandb versions warn about on the console
        # ("The anonymous setting has no effect"); leaving it out is wandb's own default.
        getattr(logger, "_wandb_init", {}).pop("anonymous", None)
        self._wandb_run = logger.experiment
        return logger

    def log_summary(self, summary: dict[str, Any]) -> None:
        if self._wandb_run is not None:
            self._wandb_run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})

    def finish(self, exit_code: int = 0) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=exit_code)
            self._wandb_run = None


def run_loggers(logger_cfg: DictConfig, run_dir: Path, run_config: dict[str, Any]) -> RunLoggers:
    """The run's loggers, the :class:`RunLoggers` (sub)class ``logger_cfg`` names."""
    return instantiate(logger_cfg, _partial_=True)(run_dir, run_config)


def rich_progress_bar(enabled: bool = True, leave: bool = True) -> RichProgressBar | None:
    """Lightning's Rich progress bar, or none (``callbacks.progress_bar=false``)."""
    return RichProgressBar(leave=leave) if enabled else None


def stage_callbacks(callbacks_cfg: DictConfig, stage: str, ckpt_dir: Path, monitor: str | None) -> list[Callback]:
    """The callbacks of one stage: every node of ``callbacks_cfg`` with a ``_target_``, in order."""
    given = {"dirpath": ckpt_dir, "stage": stage, "monitor": monitor, "filename": "best" if monitor else "epoch{epoch}"}
    callbacks = []
    for node in callbacks_cfg.values():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue  # a setting (progress_bar, checkpoint_every_n_steps), or a callback set to null
        takes = inspect.signature(get_object(node._target_)).parameters
        callback = instantiate(node, **{k: v for k, v in given.items() if k in takes and k not in node})
        if callback is not None:
            callbacks.append(callback)
    return callbacks


def make_trainer(
    trainer_cfg: DictConfig, callbacks_cfg: DictConfig, stage: str, run_dir: Path, logger: Logger | bool, epochs: int,
    monitor: str | None,
) -> pl.Trainer:
    """A Trainer for one stage, its callbacks checkpointing into ``run_dir/checkpoints/<stage>``."""
    callbacks = stage_callbacks(callbacks_cfg, stage, run_dir / "checkpoints" / stage, monitor)
    return instantiate(trainer_cfg, _partial_=True, _convert_="partial")(
        max_epochs=epochs, logger=logger, callbacks=callbacks, default_root_dir=str(run_dir),
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
    )
