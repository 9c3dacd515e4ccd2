"""Budget constraints c_j(alpha) <= B_j with expected (differentiable) and exact (discrete) costs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from hmqsearch.errors import UserError


@dataclass
class Constraint:
    """One budget.  ``expected()`` is differentiable in the logits; ``exact()`` reads the argmax."""

    name: str
    unit: str
    budget: float
    expected: Callable[[], Tensor]
    exact: Callable[[], float]
    minimum: float  # cost with the lowest precision everywhere
    bound: float | None = None  # the bound the duals enforce now (a ramp step); None: the budget

    def violation(self) -> Tensor:
        """Normalised violation v = E[c] / bound - 1 (positive when over the current bound)."""
        return self.expected() / (self.budget if self.bound is None else self.bound) - 1.0

    def satisfied(self) -> bool:
        return self.exact() <= self.budget

    def check_feasible(self) -> None:
        """An infeasible budget is reported before any training starts."""
        if self.minimum > self.budget:
            raise UserError(
                f"{self.name} budget {self.budget:.6g} {self.unit} cannot be met: even the lowest "
                f"candidate precision everywhere costs {self.minimum:.6g} {self.unit}. "
                f"Allowed: a budget >= {self.minimum:.6g} {self.unit}, or add lower bit-widths to the search."
            )


def normalised_cost(constraints: list[Constraint]) -> float:
    """Sum over the budgets of the exact cost as a fraction of its budget."""
    return sum(c.exact() / c.budget for c in constraints)
