"""Every numeric setting of a run checked before any work: finite, of the right kind, in range.

A NaN or an infinity anywhere in the configuration is refused (Hydra reads ``nan`` and ``inf``
as floats, which pass every ``<`` and ``>`` comparison the other checks make); the settings in
:data:`RULES` are also checked against their range.  Settings whose range depends on the data
or the model (batch sizes, subset sizes, widths) are checked where those are built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from hmqsearch.errors import UserError


def _bound(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class Number:
    """A number (or an integer) between ``low`` and ``high``; open bounds exclude the end."""

    integer: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        kinds = (int,) if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low == 0 and self.low_open and self.high is None and not self.integer:
            text = "a positive number"
        elif self.low is not None and self.high is not None:
            text = f"{kind} in {'(' if self.low_open else '['}{_bound(self.low)}, {_bound(self.high)}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {_bound(self.low)}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {_bound(self.high)}"
        else:
            text = f"a finite {'integer' if self.integer else 'number'}"
        return text + (", or null" if self.nullable else "")


POSITIVE = Number(low=0, low_open=True)
NON_NEGATIVE = Number(low=0)
COUNT = Number(integer=True, low=0)
AT_LEAST_ONE = Number(integer=True, low=1)
BUDGET = Number(low=0, low_open=True, nullable=True)
_ABSENT = object()

RULES: dict[str, Number] = {
    "seed": Number(integer=True, low=0, high=2**32 - 1),
    "pretrain.epochs": COUNT,
    "pretrain.lr": POSITIVE,
    "search.epochs": COUNT,
    "search.lr": POSITIVE,
    "search.logit_lr": POSITIVE,
    "search.dual_lr": NON_NEGATIVE,
    "search.tau_start": POSITIVE,
    "search.tau_end": POSITIVE,
    "search.n_thresholds": AT_LEAST_ONE,
    "search.init_mass": Number(low=0, high=1, low_open=True, high_open=True),
    "search.bn_batches": COUNT,
    "search.calibration.batches": AT_LEAST_ONE,
    "search.calibration.percentile": Number(low=0, high=100, low_open=True),
    "search.proximity.tolerance": POSITIVE,
    "search.proximity.dual_lr": NON_NEGATIVE,
    "finetune.epochs": COUNT,
    "finetune.lr": POSITIVE,
    "budget.weight_compression": BUDGET,
    "budget.weight_kb": BUDGET,
    "budget.latency_ms": BUDGET,
    "budget.bops_compression": BUDGET,
    "budget.activation_kb": BUDGET,
    "search.ramp.steps": COUNT,
    "search.ramp.until": Number(low=0, high=1, high_open=True),
    "distill.alpha": Number(low=0, high=1),
    "distill.temperature": POSITIVE,
    "cost.target.int8_macs_per_s": POSITIVE,
    "cost.target.bytes_per_s": POSITIVE,
    "trainer.gradient_clip_val": Number(low=0, nullable=True),
    "trainer.log_every_n_steps": AT_LEAST_ONE,
    "callbacks.checkpoint_every_n_steps": COUNT,
    "data.num_workers": COUNT,
    "data.eval_batch_size": AT_LEAST_ONE,
}


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every scalar in a plain container."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        path = f"{prefix}[{key}]" if isinstance(key, int) else f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, (dict, list)):
            yield from _leaves(value, path)
        else:
            yield path, value


def check_numbers(cfg: DictConfig) -> None:
    """Raise a :class:`UserError` for the first non-finite number or out-of-range setting."""
    for key, value in _leaves(OmegaConf.to_container(cfg, resolve=True)):
        if isinstance(value, float) and not math.isfinite(value):
            allowed = RULES[key].describe() if key in RULES else "a finite number"
            raise UserError(f"{key}={value}; allowed: {allowed}")
    for key, rule in RULES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue  # a setting this config does not have (another data module or cost model)
        if not rule.accepts(value):
            raise UserError(f"{key}={value!r}; allowed: {rule.describe()}")
