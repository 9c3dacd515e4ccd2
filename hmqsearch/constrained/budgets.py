"""Budget configuration -> constraints on a prepared model."""

from __future__ import annotations

from dataclasses import dataclass

from hmqsearch.settings import BUDGET, OneOf, Real, check_fields, setting
from hmqsearch.constrained.constraints import Constraint
from hmqsearch.cost import compute
from hmqsearch.cost import latency as lat
from hmqsearch.cost import model_size, size
from hmqsearch.errors import UserError
from hmqsearch.quant.prepare import QuantModel


SCOPES = ("model", "layers")


@dataclass
class BudgetSpec:
    """``weight_kb`` (absolute, KiB = 1024 bytes) wins over ``weight_compression`` (x float32).

    ``scope``: ``model`` budgets the whole model's parameter bytes (quantized weights at their
    bit-widths, every other parameter at 32 bits, against all float parameters:
    :mod:`hmqsearch.cost.model_size`); ``layers`` the quantized layers' weights alone.
    ``bops_compression``: bit operations per sample <= the float32 model's (32 x 32 bits a MAC)
    / this (W8A8 is 16, W4A8 32, W4A4 64). ``activation_kb``: the largest layer input, at its
    bits, per sample, in KiB.
    """

    weight_compression: Real | None = setting(8, BUDGET)  # weight bytes <= float32 bytes / weight_compression
    weight_kb: Real | None = setting(None, BUDGET)  # absolute, wins over weight_compression
    latency_ms: Real | None = setting(None, BUDGET)  # against the latency model in ``cost``
    basis: str = setting("packed", OneOf(size.BASES))  # which byte count the weight budget applies to
    bops_compression: Real | None = setting(None, BUDGET)
    activation_kb: Real | None = setting(None, BUDGET)
    scope: str = setting("model", OneOf(SCOPES))

    def validate(self) -> None:
        check_fields(self, "budget")

    def weight_budget_bytes(self, qmodel: QuantModel) -> float | None:
        if self.weight_kb is not None:
            return self.weight_kb * 1024.0
        if self.weight_compression is not None:
            reference = qmodel.model_float_bytes if self.scope == "model" else size.float_weight_bytes(qmodel)
            return reference / self.weight_compression
        return None

    def fixed_bytes(self, qmodel: QuantModel) -> int:
        """Bytes the weight budget covers beyond the quantized weights (the float parameters)."""
        return model_size.fixed_float_bytes(qmodel) if self.scope == "model" else 0


def build_constraints(qmodel: QuantModel, spec: BudgetSpec, table: lat.LatencyTable | None) -> list[Constraint]:
    """One constraint per budget that is set; each checked for feasibility here."""
    spec.validate()
    constraints = []
    weight_budget = spec.weight_budget_bytes(qmodel)
    if weight_budget is not None:
        fixed = spec.fixed_bytes(qmodel)
        constraints.append(Constraint(
            name="weight_bytes",
            unit=f"bytes ({spec.basis}, {'whole model' if spec.scope == 'model' else 'quantized layers'})",
            budget=weight_budget,
            expected=lambda: size.expected_weight_bytes(qmodel, spec.basis) + fixed,
            exact=lambda: float(sum(size.exact_weight_bytes(qmodel, spec.basis).values()) + fixed),
            minimum=float(size.min_weight_bytes(qmodel, spec.basis) + fixed),
        ))
    if spec.latency_ms is not None:
        if table is None:
            raise UserError("budget.latency_ms is set but no latency model is configured (cost.latency)")
        constraints.append(Constraint(
            name="latency_ms",
            unit=f"ms ({table.source})",
            budget=float(spec.latency_ms),
            expected=lambda: lat.expected_latency(qmodel, table),
            exact=lambda: lat.exact_total_latency(qmodel, table),
            minimum=lat.min_latency(qmodel, table),
        ))
    if spec.bops_compression is not None:
        constraints.append(Constraint(
            name="bops",
            unit="bit operations per sample",
            budget=compute.float_bops(qmodel) / spec.bops_compression,
            expected=lambda: compute.expected_bops(qmodel),
            exact=lambda: compute.exact_bops(qmodel),
            minimum=compute.min_bops(qmodel),
        ))
    if spec.activation_kb is not None:
        constraints.append(Constraint(
            name="activation_bytes",
            unit="bytes (largest layer input per sample)",
            budget=spec.activation_kb * 1024.0,
            expected=lambda: compute.expected_activation_bytes(qmodel),
            exact=lambda: compute.exact_activation_bytes(qmodel),
            minimum=compute.min_activation_bytes(qmodel),
        ))
    for c in constraints:
        c.check_feasible()
    return constraints
