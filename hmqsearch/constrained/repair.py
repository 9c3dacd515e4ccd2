"""Feasibility repair: lower precision where it costs least until every budget holds exactly."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from hmqsearch.constrained.constraints import Constraint, normalised_cost
from hmqsearch.quant.hmq import HMQQuantizer
from hmqsearch.quant.prepare import QuantModel
from hmqsearch.quant.scheme import Scheme

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class RepairStep:
    quantizer: str
    from_bits: int
    to_bits: int
    evidence: float  # repair: logit margin given up (or layer dual); fill: probability of the new bit-width


def _lowered(q: HMQQuantizer) -> tuple[Scheme, float] | None:
    """The best candidate one bit-width below the argmax (that width's preferred threshold), and
    its logit margin below the argmax."""
    b = q.chosen_index()[0]
    if b == 0:
        return None
    logits = q.logits.detach()
    return q.scheme_at(q.candidate_bits[b - 1]), float(logits.max() - logits[b - 1].max())


def _raised(q: HMQQuantizer) -> tuple[Scheme, float] | None:
    """The best candidate one bit-width above the argmax, and the probability of that width."""
    b = q.chosen_index()[0]
    if b + 1 >= len(q.candidate_bits):
        return None
    return q.scheme_at(q.candidate_bits[b + 1]), float(q.bit_probs().detach()[b + 1])


def with_argmax(q: HMQQuantizer, scheme: Scheme, measure: Callable[[], T]) -> T:
    """``measure()`` with ``scheme`` (on ``q``'s grid) made ``q``'s argmax; ``q``'s logits are
    restored after."""
    saved = q.logits.detach().clone()
    q.fix(scheme)
    try:
        return measure()
    finally:
        with torch.no_grad():
            q.logits.copy_(saved)


def repair(
    qmodel: QuantModel, constraints: list[Constraint], sensitivity: dict[str, float] | None = None
) -> list[RepairStep]:
    """Greedy repair of the argmax assignment.

    Each step lowers the one quantizer with the smallest logit margin per unit of normalised
    cost saved on the violated budgets (the search's own sensitivity read-out), then re-checks
    every budget with the exact discrete costs.  With ``sensitivity`` (layer name -> final
    proximity dual) the dual of the quantizer's layer replaces the logit margin, so the
    layers with the smallest duals are lowered first.  Returns the steps taken (empty if
    feasible).
    """
    steps: list[RepairStep] = []
    quantizers = [(n, q) for n, q in qmodel.quantizers() if not q.float_pinned]
    while True:
        violated = [c for c in constraints if not c.satisfied()]
        if not violated:
            return steps
        best: tuple[float, str, HMQQuantizer, Scheme, float] | None = None
        before = {c.name: c.exact() for c in violated}
        for name, q in quantizers:
            lowered = _lowered(q)
            if lowered is None:
                continue
            low, margin = lowered
            if sensitivity is not None:
                margin = sensitivity[name.rsplit(".", 1)[0]]
            gain = with_argmax(q, low, lambda: sum((before[c.name] - c.exact()) / c.budget for c in violated))
            if gain <= 0:
                continue
            score = margin / gain
            if best is None or score < best[0]:
                best = (score, name, q, low, margin)
        if best is None:
            raise RuntimeError(
                "repair cannot lower any quantizer further although "
                + ", ".join(f"{c.name}={c.exact():.6g} > {c.budget:.6g}" for c in violated)
                + " (the pre-training feasibility check should have caught this)"
            )
        _, name, q, low, margin = best
        step = RepairStep(name, q.argmax().bits, low.bits, margin)
        q.fix(low)
        log.info(
            "repair: %s %d -> %d bits (%s %.3f)", name, step.from_bits, step.to_bits,
            "layer dual" if sensitivity is not None else "logit margin", margin,
        )
        steps.append(step)


def fill(qmodel: QuantModel, constraints: list[Constraint]) -> list[RepairStep]:
    """Spend budget slack left by the argmax: raise precision while every budget still holds.

    The expected costs the search constrains average over the logits' mass, so the argmax of
    a converged search usually lands below its budgets.  Each step raises by one bit-width the
    quantizer with the most probability on its next-higher bit-width (the search's own second
    choice) per unit of normalised cost that raise adds, the mirror of :func:`repair`; a raise
    that adds no cost goes first.  A raise that would break a budget blocks that quantizer.
    Ranking by mass alone spends the slack on whichever large layer the search leaned on
    slightly more, where the same bytes lift several small layers (the first convolution,
    the classifier) by several bit-widths.
    """
    steps: list[RepairStep] = []
    quantizers = [(n, q) for n, q in qmodel.quantizers() if not q.float_pinned]
    blocked: set[str] = set()
    while True:
        before = normalised_cost(constraints)
        best: tuple[float, float, str, HMQQuantizer, Scheme] | None = None
        for name, q in quantizers:
            raised = None if name in blocked else _raised(q)
            if raised is None:
                continue
            high, mass = raised
            added = with_argmax(q, high, lambda: normalised_cost(constraints)) - before
            score = math.inf if added <= 0 else mass / added
            if best is None or (score, mass) > best[:2]:
                best = (score, mass, name, q, high)
        if best is None:
            return steps
        _, mass, name, q, high = best
        if not with_argmax(q, high, lambda: all(c.satisfied() for c in constraints)):
            blocked.add(name)
            continue
        step = RepairStep(name, q.argmax().bits, high.bits, mass)
        q.fix(high)
        steps.append(step)
        log.info("fill: %s %d -> %d bits (probability %.3f)", name, step.from_bits, step.to_bits, mass)
