"""Fixed-precision methods in the search's harness: uniform QAT and PTQ.

* :class:`UniformQAT` (``method=uniform``): every quantizer fixed to one precision ``WxAy``,
  each threshold the lowest-MSE power of two on the calibration data (the prior the search
  starts from), then the fine-tune stage (same epochs and recipe as after the search).
* :class:`PTQ` (``method=ptq``): the same fixed precision without any training, as in the
  integer-inference workflow (Wu et al., arXiv 2004.09602): per-channel weights at their max
  range, per-tensor activations at the range from ``search.calibration`` (max, percentile,
  MSE, entropy), each threshold the smallest power of two covering its range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hmqsearch.methods.base import Method, Precision, Prepared, as_precision
from hmqsearch.quant.assignment import Assignment, LayerSchemes
from hmqsearch.quant.hmq import HMQQuantizer
from hmqsearch.quant.prepare import QuantModel
from hmqsearch.quant.scheme import Scheme

COVERING_THRESHOLD = 1
"""Threshold index of 2^ceil(log2 r), the smallest power of two >= the range r (index 0 is 2^(M+1))."""


def fixed_scheme(q: HMQQuantizer, covering: bool) -> Scheme | None:
    """``q``'s single bit-width at its covering threshold, or at its preferred (lowest-MSE) one;
    None for a quantizer pinned to float."""
    if q.float_pinned:
        return None
    threshold = min(COVERING_THRESHOLD, q.n_thresholds - 1) if covering else None
    return q.scheme_at(q.candidate_bits[0], threshold)


def assign_fixed(qmodel: QuantModel, weights_covering: bool, inputs_covering: bool) -> Assignment:
    """Fix every quantizer to its single bit-width, each tensor's threshold the covering one
    or the preferred one; returns the assignment written."""
    assignment = Assignment({
        name: LayerSchemes(fixed_scheme(layer.wq, weights_covering), fixed_scheme(layer.aq, inputs_covering))
        for name, layer in qmodel.layers()
    })
    assignment.apply(qmodel)
    return assignment


@dataclass(frozen=True)
class UniformQAT(Method):
    """Uniform-precision quantization-aware training at ``precision`` (``WxAy``)."""

    name: ClassVar[str] = "uniform"
    trains: ClassVar[bool] = True

    precision: Precision | str = "W4A8"

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", as_precision(self.precision))

    def assign(self, prepared: Prepared) -> Assignment:
        """Every threshold the calibrated lowest-MSE one (the argmax of the initial logits)."""
        return assign_fixed(prepared.qmodel, weights_covering=False, inputs_covering=False)


@dataclass(frozen=True)
class PTQ(Method):
    """Post-training quantization at ``precision`` (``WxAy``): no training at all."""

    name: ClassVar[str] = "ptq"

    precision: Precision | str = "W8A8"

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", as_precision(self.precision))

    def assign(self, prepared: Prepared) -> Assignment:
        """Every threshold the smallest power of two covering the calibrated range."""
        return assign_fixed(prepared.qmodel, weights_covering=True, inputs_covering=True)
