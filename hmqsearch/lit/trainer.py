"""Lightning Trainer and logger construction for each stage of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, RichProgressBar
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger

from hmqsearch.errors import UserError
from hmqsearch.lit.checkpointing import AtomicCheckpointIO, CheckpointOnSigterm, RngState, step_checkpoint
from hmqsearch.lit.guards import NonFiniteGuard

LOGGERS = ("wandb", "csv", "none")


class RunLoggers:
    """One experiment-tracking run shared by every stage; metrics are prefixed by stage."""

    def __init__(self, cfg: DictConfig, run_dir: Path, run_config: dict[str, Any]) -> None:
        kind = cfg.get("kind", "none")
        if kind not in LOGGERS:
            raise UserError(f"logger.kind={kind!r}; allowed: {', '.join(LOGGERS)}")
        self.kind, self.cfg, self.run_dir, self.run_config = kind, cfg, run_dir, run_config
        self._wandb_run = None

    def for_stage(self, stage: str) -> Logger | bool:
        if self.kind == "csv":
            return CSVLogger(self.run_dir, name="csv", version=stage)
        if self.kind == "wandb":
            import wandb

            logger = WandbLogger(
                project=self.cfg.get("project", "hmqsearch"),
                name=self.cfg.get("name"),
                save_dir=str(self.run_dir),
                offline=self.cfg.get("mode", "offline") == "offline",
                prefix=stage,
                experiment=self._wandb_run,
                config=self.run_config if self._wandb_run is None else None,
                settings=wandb.Settings(silent=True),  # no banner, no history and summary on the console
            )
            # Lightning passes anonymous=None, which recent wandb versions warn about on the console
            # ("The anonymous setting has no effect"); leaving it out is wandb's own default.
            getattr(logger, "_wandb_init", {}).pop("anonymous", None)
            self._wandb_run = logger.experiment
            return logger
        return False

    def log_summary(self, summary: dict[str, Any]) -> None:
        if self._wandb_run is not None:
            self._wandb_run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})

    def finish(self, exit_code: int = 0) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=exit_code)
            self._wandb_run = None


def make_trainer(
    trainer_cfg: DictConfig, stage: str, run_dir: Path, logger: Logger | bool, epochs: int,
    monitor: str | None, progress_bar: bool, checkpoint_every_n_steps: int = 0,
) -> pl.Trainer:
    """A Trainer for one stage, checkpointing into ``run_dir/checkpoints/<stage>``.

    ``last.ckpt`` is written at every epoch end, every ``checkpoint_every_n_steps`` steps (0: never
    mid-epoch) and on SIGTERM, always atomically; it carries the RNG state and the position in
    the data, so ``trainer.fit(ckpt_path=last.ckpt)`` continues exactly.
    """
    ckpt_dir = run_dir / "checkpoints" / stage
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="best" if monitor else "epoch{epoch}",
            monitor=monitor, mode="max", save_last=True, auto_insert_metric_name=False,
            enable_version_counter=False,  # the step callback writes last.ckpt too: overwrite, never last-v1
        ),
        RngState(),
        CheckpointOnSigterm(ckpt_dir),
        NonFiniteGuard(stage, str(ckpt_dir)),
    ]
    if checkpoint_every_n_steps:
        callbacks.append(step_checkpoint(ckpt_dir, checkpoint_every_n_steps))
    if progress_bar:
        callbacks.append(RichProgressBar(leave=True))
    kwargs = OmegaConf.to_container(trainer_cfg, resolve=True)
    return pl.Trainer(
        **kwargs, max_epochs=epochs, logger=logger, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
        enable_progress_bar=progress_bar, default_root_dir=str(run_dir), enable_model_summary=False,
    )
