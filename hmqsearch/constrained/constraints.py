"""Budget constraints c_j(alpha) <= B_j with expected (differentiable) and exact (discrete) costs."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from hmqsearch.errors import UserError
from hmqsearch.quant.hmq import HMQQuantizer, argmax_costs
from hmqsearch.quant.prepare import QuantModel


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
    argmax: Callable[[], Tensor] | None = None  # the current argmax's cost, on the device
    argmax_only: bool = False  # enforce the argmax's cost alone (with E[c]'s gradient)

    def violation(self) -> Tensor:
        """Normalised violation v = c / bound - 1 (positive when over the current bound).

        c is the expected cost E[c], or, with ``argmax``, the larger of E[c] and the argmax's
        cost with E[c]'s gradient (straight through): the duals then keep rising until the
        argmax itself meets the bound, so the search ends with its own argmax within budget
        rather than only its expectation. With ``argmax_only`` c is the argmax's cost alone (E[c]'s
        gradient, straight through): once the argmax fits, the duals fall again although E[c],
        which keeps mass on wider candidates, is still over the bound, so the search does not
        overshoot below the budget.
        """
        cost = self.expected()
        if self.argmax is not None:
            target = self.argmax() if self.argmax_only else torch.maximum(cost, self.argmax())
            cost = cost + (target - cost).detach()
        return cost / (self.budget if self.bound is None else self.bound) - 1.0

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


ENFORCE = ("argmax", "argmax_only", "expected")


def check_enforce(what: str) -> None:
    if what not in ENFORCE:
        raise UserError(f"search.enforce={what!r}; allowed: {', '.join(ENFORCE)}")


def enforce_on(constraints: list[Constraint], qmodel: QuantModel, what: str) -> None:
    """What the duals enforce: ``expected`` costs only, also the ``argmax``'s cost, or the
    argmax's cost alone (``argmax_only``)."""
    check_enforce(what)
    quantizers = [q for _, q in qmodel.quantizers()]
    for c in constraints:
        c.argmax = None if what == "expected" else functools.partial(_argmax_cost, c.expected, quantizers)
        c.argmax_only = what == "argmax_only"


def _argmax_cost(expected: Callable[[], Tensor], quantizers: list[HMQQuantizer]) -> Tensor:
    with argmax_costs(quantizers):
        return expected().detach()


def normalised_cost(constraints: list[Constraint]) -> float:
    """Sum over the budgets of the exact cost as a fraction of its budget."""
    return sum(c.exact() / c.budget for c in constraints)
