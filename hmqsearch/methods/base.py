"""The interface every method of the run implements, and what the run hands a method.

A method turns the prepared model into an :class:`~hmqsearch.quant.assignment.Assignment`.
It declares what the run's stages do around it:

* ``searches``: the run's search stages (warm start, constrained search, repair, fill,
  batch-norm re-estimation) make the assignment under the budgets; the budgets' constraints
  are built and the summary reports feasibility.  A method that does not search makes its
  assignment in :meth:`Method.assign` and is not held to the budgets.
* ``calibrates``: the activation ranges are measured on calibration batches of training
  images before :meth:`Method.assign`; a data-free method draws no calibration batch.
* ``trains``: the fine-tune stage (quantization-aware training at the assignment) follows.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar, NamedTuple

from torch import nn

from hmqsearch.constrained.constraints import Constraint
from hmqsearch.errors import UserError
from hmqsearch.inputs import Inputs
from hmqsearch.quant.assignment import Assignment
from hmqsearch.quant.prepare import QuantModel, QuantSpec

_PRECISION = re.compile(r"^W([1-8])A([1-8])$", re.IGNORECASE)


class Precision(NamedTuple):
    """One weight and one input bit-width (``WxAy``)."""

    weight_bits: int
    act_bits: int

    @classmethod
    def parse(cls, text: object) -> Precision:
        """``WxAy`` with bits 1..8 (any case), or a :class:`UserError` naming ``method.precision``."""
        match = _PRECISION.match(str(text or ""))
        if match is None:
            raise UserError(f"method.precision={text!r}; expected WxAy with bits 1..8, e.g. W4A8")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"W{self.weight_bits}A{self.act_bits}"


def as_precision(value: Precision | str | None) -> Precision:
    """``value`` as a :class:`Precision` (a ``WxAy`` string is parsed)."""
    return value if isinstance(value, Precision) else Precision.parse(value)


@dataclass(frozen=True)
class Prepared:
    """What the run hands :meth:`Method.assign`: the prepared model and what it came from."""

    qmodel: QuantModel  # prepared; its activation ranges calibrated when the method calibrates
    net: nn.Module  # the float network, batch norms not folded
    calib: Sequence[Inputs] = ()  # the calibration batches; none for a data-free method
    constraints: Sequence[Constraint] = ()  # the budgets' constraints; none unless the method searches
    input_mean: Sequence[float] | None = None  # the data's per-channel input normalisation, if known
    input_std: Sequence[float] | None = None


@dataclass(frozen=True)
class Method(ABC):
    """One way of choosing each layer's weight and input scheme (``method=`` on the command line)."""

    name: ClassVar[str]
    searches: ClassVar[bool] = False
    calibrates: ClassVar[bool] = True
    trains: ClassVar[bool] = False
    precision: Precision | None = field(default=None)

    @property
    def label(self) -> str:
        """The method in tables: its name, and its precision where it has one."""
        return self.name if self.precision is None else f"{self.name} {self.precision}"

    @property
    def weight_bits(self) -> int | None:
        return None if self.precision is None else self.precision.weight_bits

    @property
    def act_bits(self) -> int | None:
        return None if self.precision is None else self.precision.act_bits

    def quant_spec(self, spec: QuantSpec) -> QuantSpec:
        """The run's quantization spec, narrowed to this method's candidates.

        A fixed precision keeps one weight and one input bit-width; pins (the first layer's
        8-bit input by default, user pins) stay as for the search; embedding tables take the
        weight bit-width.
        """
        if self.precision is None:
            return spec
        return replace(spec, weight_bits=[self.weight_bits], act_bits=[self.act_bits], embedding_bits=None)

    def check(self, net: nn.Module, input_mean: Sequence[float] | None, input_std: Sequence[float] | None) -> None:
        """Refuse (:class:`UserError`) a network or data this method cannot work on, before any
        training; ``net`` may still be untrained.  Every method so far but SPIQ takes any."""

    @abstractmethod
    def assign(self, prepared: Prepared) -> Assignment:
        """Write this method's assignment into ``prepared.qmodel`` and return it."""
