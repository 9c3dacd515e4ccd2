"""The bit-widths of an earlier run, trained again: ``method=assigned method.path=<precision.yaml>``.

Fine-tunes another run's allocation from this run's starting weights, e.g. a searched
allocation from the pretrained weights for as many epochs as the knapsack ablation gets, which
separates what an allocation is worth from what the search's own weight training is worth
(docs/benchmark.md). Only the bit-widths are taken: each threshold is the lowest-MSE power of
two on this run's calibration, as for uniform QAT, since the file's thresholds were learned
for the other run's weights.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import ClassVar

from hmqsearch.errors import UserError
from hmqsearch.export.precision import read_precision
from hmqsearch.methods.base import Method, Prepared
from hmqsearch.quant.assignment import Assignment, LayerSchemes, check_same_layers
from hmqsearch.quant.hmq import HMQQuantizer
from hmqsearch.quant.prepare import QuantModel, QuantSpec
from hmqsearch.quant.scheme import Scheme

Widths = dict[str, dict[str, int | None]]  # layer -> {"weight": bits, "input": bits}; None: float


@dataclass(frozen=True)
class Assigned(Method):
    """Every layer at the weight and input bit-widths of the precision file ``path``."""

    name: ClassVar[str] = "assigned"
    trains: ClassVar[bool] = True

    path: str = ""

    @property
    def label(self) -> str:
        return f"{self.name} {self.path}"

    def widths(self) -> Widths:
        """The file's bit-widths per layer."""
        return self._widths

    @cached_property
    def _widths(self) -> Widths:
        """Read once: the spec and the assignment both need it (a frozen dataclass's
        ``cached_property`` writes the instance dict, not a field)."""
        if not self.path:
            raise UserError("method=assigned needs method.path=<a run's precision.yaml>")
        widths = widths_of(Assignment.from_dict(read_precision(self.path)["layers"], self.path))
        for name, parts in widths.items():
            for part, bits in parts.items():
                if bits is not None and not 1 <= bits <= 8:
                    raise UserError(f"{self.path}: {name}.{part}: bits={bits}; allowed: 1..8 or float")
        return widths

    def quant_spec(self, spec: QuantSpec) -> QuantSpec:
        """The candidates are the file's bit-widths, so every layer's can be fixed."""
        widths = self.widths().values()
        weight = sorted({w["weight"] for w in widths if w["weight"] is not None})
        act = sorted({w["input"] for w in widths if w["input"] is not None})
        return replace(spec, weight_bits=weight or spec.weight_bits, act_bits=act or spec.act_bits, embedding_bits=None)

    def assign(self, prepared: Prepared) -> Assignment:
        return assign_widths(prepared.qmodel, self.widths(), self.path)


def widths_of(assignment: Assignment) -> Widths:
    """``assignment``'s bit-widths per layer (its thresholds dropped)."""
    return {name: {"weight": _bits(s.weight), "input": _bits(s.input)} for name, s in assignment.items()}


def assign_widths(qmodel: QuantModel, widths: Widths, source: str) -> Assignment:
    """Fix every layer of ``qmodel`` at ``widths``, each threshold the lowest-MSE power of two
    on ``qmodel``'s calibration; errors name ``source``."""
    check_same_layers(qmodel, widths, source)
    assignment = Assignment({
        name: LayerSchemes(_scheme(layer.wq, widths[name]["weight"], f"{source}: {name}.weight"),
                           _scheme(layer.aq, widths[name]["input"], f"{source}: {name}.input"))
        for name, layer in qmodel.layers()
    })
    assignment.apply(qmodel, source)
    return assignment


def _bits(scheme: Scheme | None) -> int | None:
    return None if scheme is None else scheme.bits


def _scheme(q: HMQQuantizer, bits: int | None, where: str) -> Scheme | None:
    """``bits`` at its lowest-MSE threshold; None where this run keeps the tensor in float."""
    if q.float_pinned:
        return None
    if bits is None:
        raise UserError(f"{where} is float in the file but quantized in this run; pin it with search.pins")
    if bits not in q.candidate_bits:
        raise UserError(f"{where}: {bits} bits is not a candidate here ({list(q.candidate_bits)}); a pin fixes it")
    return q.scheme_at(bits)
