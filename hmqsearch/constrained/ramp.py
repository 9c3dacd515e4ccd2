"""The budget ramp and the temperature schedule of the search.

HMQ's reference schedule (Habi et al. 2020, sony-si/ai-research HMQ/) starts every layer at the
highest precision, which violates a tight budget, and moves the target compression from the
start to the goal in a few steps; the Gumbel temperature restarts at each step and decays to a
floor. Here the ramp moves each constraint's *bound* and the duals enforce whatever the current
bound is, so the search ends on the final budget as a hard constraint rather than a penalty.

Bounds are interpolated in the reciprocal ("compression") domain, as HMQ ramps compression
rates linearly: step k of n has 1 / bound_k = 1 / start + k / n * (1 / budget - 1 / start).
Everything is a function of the training progress (global step / total steps), so a resumed
run continues the schedule exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hmqsearch.settings import COUNT, Number, Real, check_fields, setting


@dataclass
class RampSpec:
    """``steps``: how many steps the bounds take from the start's cost to the budgets (0: the
    budgets from the first step, no ramp). ``until``: the fraction of the search at which the
    last step (the budgets themselves) begins; they hold from there to the end, and the steps
    before it share [0, until) equally. ``tau_restart``: the temperature restarts at
    ``tau_start`` with each step and decays to ``tau_end`` within it."""

    steps: int = setting(4, COUNT)
    until: Real = setting(0.3, Number(low=0, high=1, high_open=True))
    tau_restart: bool = True

    def validate(self) -> None:
        check_fields(self, "search.ramp")

    @property
    def _width(self) -> float:
        return self.until / (self.steps - 1) if self.steps > 1 else 0.0

    def segment(self, progress: float) -> int:
        """The ramp step (1..steps) in force at ``progress`` in [0, 1]; 0 without a ramp."""
        if self.steps == 0:
            return 0
        if self.steps == 1 or progress >= self.until:
            return self.steps
        return 1 + int(progress / self._width)

    def segment_bounds(self, segment: int) -> tuple[float, float]:
        """(start, end) progress of ramp step ``segment``; the last one runs to the end."""
        start = (segment - 1) * self._width
        return start, (1.0 if segment == self.steps else segment * self._width)

    def bound(self, start_cost: float, budget: float, progress: float) -> float:
        """The constraint's bound at ``progress``: the budget, or a step between the start's cost
        and the budget (a start already within the budget is held to the budget)."""
        segment = self.segment(progress)
        if segment == 0 or start_cost <= budget:
            return budget
        frac = segment / self.steps
        return 1.0 / (1.0 / start_cost + frac * (1.0 / budget - 1.0 / start_cost))

    def temperature(self, tau_start: float, tau_end: float, progress: float) -> float:
        """Exponential decay from ``tau_start`` to ``tau_end`` over the search, or, with restarts,
        over each ramp step."""
        start, end = 0.0, 1.0
        if self.steps and self.tau_restart:
            start, end = self.segment_bounds(self.segment(progress))
        frac = min(1.0, max(0.0, (progress - start) / max(end - start, 1e-12)))
        return tau_start * math.exp(frac * math.log(tau_end / tau_start))
