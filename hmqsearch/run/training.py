"""The run's three Lightning stages (pretrain, search, finetune), resumable from their checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from hmqsearch.constrained.constraints import enforce_on
from hmqsearch.constrained.proximity import ProximityConstraints
from hmqsearch.lit.capture import capture_forward
from hmqsearch.lit.checkpointing import LAST
from hmqsearch.lit.classifier import ClassifierModule
from hmqsearch.lit.search import SearchModule
from hmqsearch.lit.trainer import make_trainer
from hmqsearch.resume import STAGES, load_checkpoint
from hmqsearch.run.config import proximity_spec, ramp_spec
from hmqsearch.run.state import RunState

log = logging.getLogger(__name__)


def _optimizer(state: RunState, stage: str) -> Any:
    return instantiate(state.cfg[stage].optimizer)


def fit(state: RunState, module: pl.LightningModule, stage: str, monitor: str | None) -> None:
    """Train ``module`` for the stage, or load it where a resumed run had finished the stage;
    with ``monitor``, keep the best checkpoint's weights."""
    cfg = state.cfg
    pl.seed_everything(cfg.seed + STAGES.index(stage), workers=True)  # a stage's noise does not depend on skipped stages
    plan = state.resume.plan(stage)
    if plan.action == "done":
        if plan.checkpoint is not None:
            module.load_state_dict(load_checkpoint(plan.checkpoint, module, stage)["state_dict"])
        log.info("%s: finished before the resume; loaded %s", stage, plan.checkpoint)
        return
    if plan.checkpoint is not None:
        load_checkpoint(plan.checkpoint, module, stage)
        log.info("%s: continuing from %s", stage, plan.checkpoint)
    trainer = make_trainer(
        cfg.trainer, cfg.callbacks, stage, state.run_dir, state.loggers.for_stage(stage), cfg[stage].epochs, monitor,
    )
    module.train()  # prepared models come back in eval mode; Lightning keeps the mode it finds
    capture_forward(module, cfg.step_capture)
    # Our own checkpoints hold the numpy RNG state, which torch's weights-only loader refuses.
    trainer.fit(module, datamodule=state.datamodule, ckpt_path=plan.checkpoint, weights_only=False)
    best = trainer.checkpoint_callback.best_model_path if monitor else ""
    if best:
        module.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
        log.info("%s: restored best checkpoint %s", stage, best)
    if trainer.is_global_zero:
        final = Path(best) if best else state.resume.stage_dir(stage) / LAST
        state.resume.mark_done(stage, final.name if final.is_file() else None)


def train_float(state: RunState) -> None:
    module = ClassifierModule(state.net, state.num_classes, _optimizer(state, "pretrain"), state.cfg.pretrain.lr)
    fit(state, module, "pretrain", "val/acc")


def train_search(state: RunState) -> SearchModule:
    """The constrained search over the calibrated model; leaves it in the fixed state."""
    cfg, qmodel = state.cfg.search, state.qmodel
    qmodel.set_state("search")
    enforce_on(state.constraints, qmodel, cfg.enforce)
    prox = proximity_spec(state.cfg)
    module = SearchModule(
        qmodel, state.num_classes, _optimizer(state, "search"), cfg.lr, cfg.logit_lr, state.constraints,
        cfg.dual_lr, cfg.tau_start, cfg.tau_end, ProximityConstraints(qmodel, prox) if prox.enabled else None,
        state.distiller("search"), logit_optimizer=instantiate(cfg.logit_optimizer), ramp=ramp_spec(state.cfg),
        dual_restart=cfg.dual_restart, end_feasible=cfg.end_feasible,
    )
    fit(state, module, "search", None)
    if module.restore_last_feasible():
        log.info("search: ends on the last argmax of its final phase that met every budget")
    qmodel.set_state("fixed")
    return module


def train_finetune(state: RunState) -> None:
    """Quantization-aware training with the assignment frozen."""
    qmodel = state.qmodel
    qmodel.set_state("fixed")
    for p in qmodel.logit_parameters():
        p.requires_grad_(False)
    module = ClassifierModule(
        qmodel, state.num_classes, _optimizer(state, "finetune"), state.cfg.finetune.lr, state.distiller("finetune")
    )
    fit(state, module, "finetune", "val/acc")
