"""The state one run's stages share.

:func:`~hmqsearch.run.stages.validate` creates it from the config; every later stage reads
what the stages before it left and sets its own fields (marked below with the stage that sets
them).  A field read before its stage ran raises AttributeError, not a silent None.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import nn

from hmqsearch.constrained.allocation import Sensitivity
from hmqsearch.constrained.budgets import BudgetSpec
from hmqsearch.constrained.constraints import Constraint
from hmqsearch.constrained.repair import RepairStep
from hmqsearch.cost.latency import LatencyTable
from hmqsearch.inputs import Inputs
from hmqsearch.lit.distill import DistillSpec, Distiller
from hmqsearch.lit.search import SearchModule
from hmqsearch.lit.trainer import RunLoggers
from hmqsearch.methods import Method
from hmqsearch.quant.prepare import QuantModel, QuantSpec
from hmqsearch.resume import Resume


@dataclass
class SearchOutcome:
    """What the search and its repair left for the summary; the defaults are those of a method
    that does not search."""

    start_bits: dict[str, int] | None = None
    start_sensitivity: Sensitivity | None = None
    module: SearchModule | None = None
    duals: dict[str, float] = field(default_factory=dict)
    proximity_duals: dict[str, Any] | None = None
    rank_disagreement: dict[str, float] | None = None
    moved: list[str] | None = None  # quantizers the search's own argmax moved from the start
    end_costs: dict[str, dict[str, float]] | None = None  # that argmax's exact costs and the budgets
    repair: list[RepairStep] = field(default_factory=list)
    fill: list[RepairStep] = field(default_factory=list)
    bn_batches: int = 0


@dataclass
class RunState:
    cfg: DictConfig  # with the learning rates scaled
    run_dir: Path
    method: Method
    spec: QuantSpec
    budgets: BudgetSpec
    distill: DistillSpec
    device: torch.device  # where evaluation, calibration and batch-norm passes run
    started: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)
    # build
    datamodule: pl.LightningDataModule = field(init=False)
    num_classes: int = field(init=False)
    net: nn.Module = field(init=False)  # the float model
    model_title: str = field(init=False)
    calib: list[Inputs] = field(init=False)  # calibration batches; none for a data-free method
    example: Inputs = field(init=False)  # 8 calibration inputs (zeros for a data-free method): what prepare traces
    pretrained: dict[str, Any] | None = None  # the loaded checkpoint's metadata; None: pretrain
    loggers: RunLoggers = field(init=False)
    resume: Resume = field(init=False)
    # evaluate_float
    test_loader: Any = field(init=False)
    float_top1: float = field(init=False)
    teacher: nn.Module | None = None  # the float model when distilling
    # calibrate
    qmodel: QuantModel = field(init=False)
    ranges: dict[str, float] = field(init=False)
    latency_table: LatencyTable | None = None
    constraints: list[Constraint] = field(default_factory=list)  # none unless the method searches
    # assign: warm start, search, repair, fill, batch-norm re-estimation (or the method's assignment)
    search: SearchOutcome = field(default_factory=SearchOutcome)
    search_top1: float = field(init=False)
    # finetune
    quant_top1: float = field(init=False)
    # account
    costs: dict[str, Any] = field(init=False)  # the exact costs of the final assignment
    budget_report: dict[str, dict[str, Any]] = field(init=False)  # constraint name -> budget, exact, unit

    def distiller(self, stage: str) -> Distiller | None:
        if self.teacher is None or not self.distill.applies_to(stage):
            return None
        return Distiller(self.teacher, self.distill.alpha, self.distill.temperature)

    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Record the wall time of the block as ``timings[key]``."""
        t0 = time.time()
        yield
        self.timings[key] = time.time() - t0
