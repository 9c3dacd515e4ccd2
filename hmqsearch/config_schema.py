"""The configuration's schema: hmqsearch's own settings, their types, defaults and allowed values.

:class:`TrainConfig` is registered in Hydra's ConfigStore as ``train_schema``, the first entry
of conf/train.yaml's defaults list, so every composed configuration is typed: Hydra refuses a
value of the wrong type as it composes, and :func:`check_config` checks ranges and choices
before a run starts.  The defaults of these settings live here and nowhere else, or, for the
settings the Python API shares, in the dataclasses of the layers that use them
(:class:`~hmqsearch.constrained.budgets.BudgetSpec`, ``RampSpec``, ``ProximitySpec``,
``DistillSpec``, :class:`~hmqsearch.export.options.ExportOptions`), which are nodes of this
schema; the YAML files under conf/ hold what differs from them (``search=hmq``,
experiments).  The groups whose nodes
are arguments of other libraries' objects (``data``, ``model``, ``trainer``, ``logger``,
``callbacks``) and ``method`` stay untyped: their YAML holds their values and ``_target_``, and
the objects check their own arguments; :data:`OPEN_RULES` lists the few checked here.

Import this module before composing conf/ with Hydra's compose API (train.py and the
``hmqsearch`` command do).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from omegaconf.errors import ValidationError

from hmqsearch.config_check import check_values, type_error_message
from hmqsearch.constrained.budgets import BudgetSpec
from hmqsearch.constrained.constraints import ENFORCE
from hmqsearch.constrained.proximity import ProximitySpec
from hmqsearch.constrained.ramp import RampSpec
from hmqsearch.constrained.warm_start import STARTS
from hmqsearch.cost.latency import LATENCY_MODELS
from hmqsearch.export.options import ExportOptions
from hmqsearch.lit.capture import CAPTURE_MODES
from hmqsearch.lit.distill import DistillSpec
from hmqsearch.lr_scaling import RULES as SCALE_RULES
from hmqsearch.quant.calibration import METHODS as CALIBRATION_METHODS
from hmqsearch.quant.hmq import MODES
from hmqsearch.settings import (
    AT_LEAST_ONE, COUNT, FRACTION_OPEN, NON_NEGATIVE, POSITIVE, Number, OneOf, Real, Rule, rules_of, setting,
)

SCHEMA_NAME = "train_schema"
STAGES = ("all", "export")


def _adam(**options: Any) -> dict[str, Any]:
    return {"_target_": "torch.optim.Adam", "_partial_": True, **options}


@dataclass
class CalibrationConfig:
    """The activation ranges measured before the search (and PTQ's thresholds)."""

    method: str = setting("max", OneOf(CALIBRATION_METHODS))
    percentile: Real = setting(99.99, Number(low=0, high=100, low_open=True))
    batches: int = setting(4, AT_LEAST_ONE)


@dataclass
class SearchConfig:
    """The HMQ search: candidates, relaxation, schedule (``search=hmq``: HMQ's reference schedule)."""

    weight_bits: list[int] = setting([2, 3, 4, 5, 6, 7, 8])  # candidate weight bit-widths (1..8)
    act_bits: list[int] = setting([4, 8])  # candidate input-activation bit-widths (1..8)
    embedding_bits: Optional[list[int]] = None  # candidate nn.Embedding table bit-widths (1..8); null: weight_bits
    n_thresholds: int = setting(8, AT_LEAST_ONE)  # power-of-two thresholds per bit-width: 2^(M+1) .. 2^(M+2-n)
    weight_per_channel: bool = True  # per-output-channel weight thresholds
    # the relaxed forward: expected step (default), mixture of candidates, hard (one-hot Gumbel sample)
    # or argmax (one-hot of the logits, no noise); hard and argmax pass the soft sample's gradient
    mode: str = setting("expected", OneOf(MODES))
    first_layer_act_bits: Optional[Union[int, str]] = 8  # pin the network input (int, 'float', or null to search it)
    pins: list[Any] = setting([])  # e.g. [{pattern: "linear", weight_bits: 8, act_bits: 8}]
    fold_bn: bool = True
    # kept BN (fold_bn: false): after the search, running statistics recomputed on this many training
    # batches for the chosen assignment (the search's average over sampled ones); 0: keep them
    bn_batches: int = setting(20, COUNT)
    # highest | feasible_uniform | sensitivity: initial mass on 8 bits, on the highest uniform weight
    # bit-width within the budgets, or on per-layer widths allocated by measured sensitivity
    start: str = setting("highest", OneOf(STARTS))
    init_mass: Real = setting(0.95, FRACTION_OPEN)  # initial probability of the start candidate: lower lets the argmax move sooner
    fill_budget: bool = True  # after the search, raise precision into any budget slack
    # margin | duals: lower first the smallest logit margins, or the smallest proximity duals
    repair_by: str = setting("margin", OneOf(("margin", "duals")))
    proximity: ProximitySpec = field(default_factory=ProximitySpec)  # per-layer constraints on the output error
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    epochs: int = setting(20, COUNT)
    lr: Real = setting(1.0e-3, POSITIVE)  # network weights during the search
    # The logits' rate, the duals' step, the ramp's end (search.ramp.until) and the end temperature were
    # measured together: from the 8-bit start the argmax must keep up with the ramping bounds, or the
    # duals wind up meanwhile and, once it crosses, push it far below the budget. The digits default at
    # 12x / 16x / 20x over 8 seeds: these settings 98.19 / 97.33 / 97.15 % (worst seed 97.22 / 95.56 /
    # 96.11 %); the earlier logits 0.02, duals 0.1, ramp until 0.5, end temperature 0.05 collapsed on
    # some seeds (89.54 / 84.17 / 83.66 % on the mean, 47.78 % at worst; docs/benchmark.md).
    logit_lr: Real = setting(0.1, POSITIVE)  # HMQ logits: their own optimizer (logit_optimizer), constant rate
    dual_lr: Real = setting(0.5, NON_NEGATIVE)  # dual ascent step: lambda <- max(0, lambda + dual_lr * v)
    dual_restart: bool = False  # a dual drops to 0 as soon as its budget holds (no wound-up dual pushing on)
    # after repair and fill, fine-tune the searched bit-widths from the weights the search started
    # from (thresholds re-chosen as for method=assigned), not from the search's own weights
    restart_weights: bool = False
    end_feasible: bool = False  # end on the last argmax of the final phase that met every budget (not the last step's)
    # argmax: the duals rise until the argmax's own cost meets each bound (and the expected cost's);
    # argmax_only: the argmax's cost alone (the search ends near the budget instead of under it);
    # expected: the expected cost only (the argmax can end over budget)
    enforce: str = setting("argmax", OneOf(ENFORCE))
    tau_start: Real = setting(1.0, POSITIVE)  # Gumbel-Softmax temperature, annealed exponentially (restarted with each ramp step)
    tau_end: Real = setting(0.5, POSITIVE)
    ramp: RampSpec = field(default_factory=RampSpec)  # budget ramp: each bound moves from the start's cost to its budget
    logit_optimizer: Any = setting(_adam())  # the logits' own optimizer (the weights use `optimizer` at `lr`)
    optimizer: Any = setting(_adam())


@dataclass
class TargetConfig:
    """The analytic latency model's device."""

    name: str = "edge_npu"
    int8_macs_per_s: Real = setting(1.0e12, POSITIVE)
    bytes_per_s: Real = setting(8.0e9, POSITIVE)


@dataclass
class CostConfig:
    """The latency model: analytic, max(BOPs / integer throughput, bytes / bandwidth) per layer, or a
    table measured by `hmqsearch profile` (cost=measured)."""

    latency: str = setting("analytic", OneOf(LATENCY_MODELS))
    target: Optional[TargetConfig] = field(default_factory=TargetConfig)
    latency_table: Optional[str] = None


@dataclass
class ExportConfig(ExportOptions):
    """Export: ONNX deployment graph + packed checkpoint, verified against PyTorch, latency measured.
    Every run ends with it; `python train.py stage=export export.run_dir=<finished run>` runs it alone."""

    enabled: bool = True
    # stage=export alone: a finished run directory, or a checkpoint + precision.yaml
    run_dir: Optional[str] = None
    checkpoint: Optional[str] = None  # quantized_state.pt or a Lightning .ckpt of the fine-tune stage
    precision: Optional[str] = None  # precision.yaml (its config section names model and data)
    allow_over_budget: bool = False  # export an assignment that breaks the run's budgets (an edited precision.yaml)


@dataclass
class StageConfig:
    """A training stage's epochs, learning rate and optimizer (a partial torch.optim class)."""

    epochs: int = setting(rule=COUNT)
    lr: Real = setting(rule=POSITIVE)
    optimizer: Any = setting(_adam())


@dataclass
class TrainConfig:
    """Everything `python train.py` reads (conf/train.yaml composes the groups onto it)."""

    seed: int = setting(0, Number(integer=True, low=0, high=2**32 - 1))
    stage: str = setting("all", OneOf(STAGES))  # all (pretrain .. export) | export (export.run_dir, or export.checkpoint + export.precision)
    resume: Optional[str] = None  # a run directory: continue that killed run (docs/reliability.md)
    ckpt_path: Optional[str] = None  # a checkpoint under <run dir>/checkpoints/<stage>/: continue from it
    # none | linear | sqrt: learning rates x (global batch / scale_lr_base), or its square root
    scale_lr: str = setting("none", OneOf(SCALE_RULES))
    scale_lr_base: int = setting(128, AT_LEAST_ONE)  # the global batch size the learning rates are for (hmqsearch/lr_scaling.py)
    # none | compile | cuda-graphs: the training step through torch.compile (hmqsearch/lit/capture.py)
    step_capture: str = setting("none", OneOf(CAPTURE_MODES))
    pretrain: StageConfig = field(default_factory=lambda: StageConfig(30, 0.01, _adam(weight_decay=1.0e-4)))  # float training; skipped when model.pretrained is set
    distill: DistillSpec = field(default_factory=DistillSpec)  # knowledge distillation from the float model
    finetune: StageConfig = field(default_factory=lambda: StageConfig(10, 1.0e-3))  # QAT with the searched assignment frozen
    # the groups of other libraries' objects and the method are untyped: their YAML holds their values
    data: Any = None
    model: Any = None
    method: Any = None
    search: SearchConfig = field(default_factory=SearchConfig)
    budget: BudgetSpec = field(default_factory=BudgetSpec)  # each null for none
    cost: CostConfig = field(default_factory=CostConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    trainer: Any = None
    logger: Any = None
    callbacks: Any = None


# settings of the untyped groups that are checked here (the others are their objects' to check)
OPEN_RULES: dict[str, Rule] = {
    "trainer.gradient_clip_val": Number(low=0, nullable=True),
    "trainer.log_every_n_steps": AT_LEAST_ONE,
    "callbacks.checkpoint_every_n_steps": COUNT,
}

RULES: dict[str, Rule] = {**rules_of(TrainConfig), **OPEN_RULES}


def check_config(cfg: DictConfig) -> None:
    """Raise a :class:`~hmqsearch.errors.UserError` for the first setting out of its range or
    choices, or any NaN or infinity in ``cfg``."""
    check_values(cfg, RULES)


def composition_error_message(error: ValidationError) -> str:
    """A type error Hydra raised while composing, as one line naming the key and what is allowed."""
    return type_error_message(error, TrainConfig)


ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)
