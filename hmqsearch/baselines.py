"""Reference methods run in the same harness as the search (``method=uniform|ptq``).

* ``uniform``: every quantizer fixed to one precision ``WxAy`` (e.g. W4A8), each threshold
  the lowest-MSE power of two on the calibration data (the prior the search starts from),
  then the search's fine-tune stage (same epochs and recipe): uniform-precision QAT.
* ``ptq``: the same fixed precision without any training, as in the integer-inference
  workflow (Wu et al., arXiv 2004.09602): per-channel weights at their max range,
  per-tensor activations at the range from ``search.calibration`` (max, percentile, MSE,
  entropy), each threshold the smallest power of two covering its range.

The run prepares and calibrates the model as for the search, with the candidates
narrowed to the method's bit-widths, then calls :func:`assign_fixed` in place of the search.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from hmqsearch.errors import UserError
from hmqsearch.quant.assignment import Assignment, LayerSchemes
from hmqsearch.quant.hmq import HMQQuantizer
from hmqsearch.quant.prepare import QuantModel, QuantSpec
from hmqsearch.quant.scheme import Scheme

METHODS = ("hmq", "uniform", "ptq")
_PRECISION = re.compile(r"^W([1-8])A([1-8])$", re.IGNORECASE)
COVERING_THRESHOLD = 1
"""Threshold index of 2^ceil(log2 r), the smallest power of two >= the range r (index 0 is 2^(M+1))."""


@dataclass(frozen=True)
class Method:
    """What replaces the search: ``hmq`` (the search itself) or a fixed-precision baseline."""

    name: str
    weight_bits: int | None = None
    act_bits: int | None = None

    @property
    def is_baseline(self) -> bool:
        return self.name != "hmq"

    @property
    def trains(self) -> bool:
        """Whether the fine-tune stage runs (PTQ has no training at all)."""
        return self.name != "ptq"

    @property
    def label(self) -> str:
        return self.name if not self.is_baseline else f"{self.name} W{self.weight_bits}A{self.act_bits}"


def parse_method(name: str, precision: str | None) -> Method:
    """Validate ``method.name`` and, for baselines, ``method.precision`` (``WxAy``, bits 1..8)."""
    if name not in METHODS:
        raise UserError(f"method={name!r}; allowed: {', '.join(METHODS)}")
    if name == "hmq":
        return Method(name)
    match = _PRECISION.match(str(precision or ""))
    if match is None:
        raise UserError(f"method.precision={precision!r}; expected WxAy with bits 1..8, e.g. W4A8")
    return Method(name, int(match.group(1)), int(match.group(2)))


def baseline_spec(spec: QuantSpec, method: Method) -> QuantSpec:
    """The search's quantization spec narrowed to the method's single weight and input bit-width.

    Pins (the first layer's 8-bit input by default, user pins) are kept as for the search.
    Embedding tables take the weight bit-width.
    """
    if not method.is_baseline:
        return spec
    return replace(spec, weight_bits=[method.weight_bits], act_bits=[method.act_bits], embedding_bits=None)


def _fixed_scheme(q: HMQQuantizer, method: Method) -> Scheme | None:
    if q.float_pinned:
        return None
    threshold = min(COVERING_THRESHOLD, q.n_thresholds - 1) if method.name == "ptq" else None
    return q.scheme_at(q.candidate_bits[0], threshold)


def assign_fixed(qmodel: QuantModel, method: Method) -> Assignment:
    """Fix every quantizer to its single bit-width with the method's threshold rule; returns
    the assignment written.

    ``uniform`` keeps the calibrated lowest-MSE threshold (the argmax of the initial logits);
    ``ptq`` takes the smallest power of two covering the calibrated range.
    """
    assignment = Assignment({
        name: LayerSchemes(_fixed_scheme(layer.wq, method), _fixed_scheme(layer.aq, method))
        for name, layer in qmodel.layers()
    })
    assignment.apply(qmodel)
    return assignment
