"""Resuming a killed run.

``python train.py resume=RUN_DIR`` re-runs the command with the run's original overrides
(``RUN_DIR/.hydra/overrides.yaml``) into the same directory. Stages that finished (marked by
``checkpoints/<stage>/done.json``) are not trained again: their final checkpoint is loaded. The
interrupted stage continues from its ``last.ckpt`` through Lightning's ``ckpt_path`` (weights,
logits, thresholds, duals, optimizer and scheduler, loop progress, RNG and data position).
``ckpt_path=FILE`` (a checkpoint under ``RUN_DIR/checkpoints/<stage>/``) picks that checkpoint
for the interrupted stage instead.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from hmqsearch.errors import UserError
from hmqsearch.io import write_json
from hmqsearch.lit.checkpointing import LAST

STAGES = ("pretrain", "search", "finetune")
DONE = "done.json"
# What may change when a run is resumed: how it is executed, not what it computes.
RESUME_MAY_CHANGE = ("trainer", "callbacks", "logger", "hydra")


def _value(args: list[str], key: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{key}=")]
    return values[-1] if values else None


def _stage_of(ckpt: Path) -> tuple[Path, str]:
    """``RUN_DIR/checkpoints/<stage>/x.ckpt`` -> (RUN_DIR, stage)."""
    if ckpt.parent.parent.name != "checkpoints" or ckpt.parent.name not in STAGES:
        raise UserError(f"ckpt_path={ckpt}: expected a checkpoint inside <run dir>/checkpoints/<{'|'.join(STAGES)}>/")
    return ckpt.parent.parent.parent, ckpt.parent.name


def run_finished(run_dir: Path) -> bool:
    """A run is finished once its summary is final: the run writes ``summary.json`` with
    ``"finished": false`` before the export and rewrites it with ``true`` after, so a run killed
    while exporting is resumed (its stages load from their checkpoints, the export runs again)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("finished", True) is not False
    except (json.JSONDecodeError, AttributeError):
        return True  # not ours to overwrite


def original_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        raise UserError(f"resume={run_dir}: not a hmqsearch run directory ({path} is missing)")
    try:
        overrides = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is corrupt: {str(exc).splitlines()[0]}") from exc
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise UserError(f"{path} is corrupt: expected a list of override strings")
    return overrides


def resume_argv(argv: list[str]) -> list[str]:
    """Rewrite ``train.py resume=DIR [ckpt_path=FILE] [trainer.x=...]`` into the original command
    plus those overrides, running in ``DIR``. Anything else is returned unchanged."""
    args = argv[1:]
    resume, ckpt = _value(args, "resume"), _value(args, "ckpt_path")
    if (resume is None and ckpt is None) or os.environ.get("LOCAL_RANK", "0") != "0":
        return argv  # not a resume, or a DDP worker that Lightning started with the rewritten argv
    if "-m" in args or "--multirun" in args:
        raise UserError("resume= and ckpt_path= continue one run; they cannot be used with -m (multirun)")
    ckpt_path = Path(ckpt).resolve() if ckpt else None
    if ckpt_path is not None:
        if not ckpt_path.is_file():
            raise UserError(f"ckpt_path={ckpt}: no such file")
        ckpt_dir, _ = _stage_of(ckpt_path)
        if resume is not None and ckpt_dir != Path(resume).resolve():
            raise UserError(f"ckpt_path={ckpt} is not inside resume={resume}")
    run_dir = Path(resume).resolve() if resume is not None else ckpt_dir
    if not run_dir.is_dir():
        raise UserError(f"resume={resume}: no such run directory")
    overrides = original_overrides(run_dir)
    if run_finished(run_dir):
        raise UserError(f"resume={run_dir}: the run already finished (summary.json is there); nothing to resume")
    extra = [a for a in args if not a.startswith(("resume=", "ckpt_path="))]
    changed = [a for a in extra if not a.startswith("-") and a.lstrip("+~").split("=")[0].split(".")[0] not in RESUME_MAY_CHANGE]
    if changed:
        raise UserError(
            f"resume continues {run_dir} with its own overrides ({run_dir / '.hydra' / 'overrides.yaml'}); "
            f"only {', '.join(RESUME_MAY_CHANGE)} settings may change, not: {' '.join(changed)}"
        )
    attempt = f"resume-{time.strftime('%Y%m%d-%H%M%S')}"  # this attempt's config and log
    return [
        argv[0], *overrides, *extra, f"resume={run_dir}", *([f"ckpt_path={ckpt_path}"] if ckpt_path else []),
        # hydra.mode=RUN: a job of a sweep preset (hparams_search=..., which sets MULTIRUN) would
        # otherwise start a new multirun elsewhere instead of continuing in run_dir
        "hydra.mode=RUN", f"hydra.run.dir={run_dir}", f"hydra.output_subdir=.hydra/{attempt}",
        f"hydra.job_logging.handlers.file.filename={run_dir / attempt}.log",
    ]


def load_checkpoint(path: Path, module: nn.Module, stage: str) -> dict[str, Any]:
    """Read a Lightning checkpoint and check it fits ``module``; a clear error naming the file
    otherwise."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for truncated / foreign files
        raise UserError(f"checkpoint {path} is unreadable (corrupt or truncated): {str(exc).splitlines()[0]}") from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise UserError(f"checkpoint {path} is not a Lightning checkpoint (no state_dict)")
    expected, got = module.state_dict(), ckpt["state_dict"]
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    reshaped = [
        f"{k} {tuple(got[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
        if k in got and hasattr(got[k], "shape") and tuple(got[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or reshaped:
        problems = [
            f"{len(items)} {what} (first: {items[0]})"
            for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("tensors of another shape", reshaped))
            if items
        ]
        raise UserError(f"checkpoint {path} does not match the {stage} model: {'; '.join(problems)}")
    return ckpt


@dataclass
class StagePlan:
    action: str  # "fresh" | "continue" | "done"
    checkpoint: Path | None = None


@dataclass
class Resume:
    """Decides, per stage, whether to train from scratch, continue a checkpoint or load the
    finished stage, and marks stages finished."""

    run_dir: Path
    enabled: bool = False
    ckpt_path: Path | None = None
    _restarted: bool = field(default=False, repr=False)

    @classmethod
    def from_cfg(cls, cfg: Any, run_dir: Path) -> "Resume":
        return cls(run_dir, enabled=bool(cfg.resume), ckpt_path=Path(cfg.ckpt_path) if cfg.ckpt_path else None)

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / "checkpoints" / stage

    def plan(self, stage: str) -> StagePlan:
        if not self.enabled or self._restarted:
            return StagePlan("fresh")
        done = self.stage_dir(stage) / DONE
        if self.ckpt_path is not None and self.ckpt_path.parent.name == stage:
            if done.is_file():
                raise UserError(f"ckpt_path={self.ckpt_path}: stage {stage} already finished; give a checkpoint of the interrupted stage")
            self._restarted = True  # later stages start from scratch on the new result
            return StagePlan("continue", self.ckpt_path)
        if done.is_file():
            try:
                name = json.loads(done.read_text())["checkpoint"]
            except (ValueError, KeyError, TypeError) as exc:
                raise UserError(f"{done} is corrupt: {exc}") from exc
            return StagePlan("done", self.stage_dir(stage) / name if name else None)
        last = self.stage_dir(stage) / LAST
        return StagePlan("continue", last) if last.is_file() else StagePlan("fresh")

    def mark_done(self, stage: str, checkpoint: str | None) -> None:
        write_json(self.stage_dir(stage) / DONE, {"checkpoint": checkpoint})
