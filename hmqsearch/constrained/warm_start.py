"""Where the search starts: the highest precision, the best uniform assignment that fits, or a
per-layer assignment that fits, allocated by measured layer sensitivity.

Started from the highest precision, a tight weight budget makes the duals grow until their
pull (proportional to each layer's size) outweighs the task loss, so the largest layers are
pushed to the lowest bit-widths first, whatever their sensitivity. Started from the highest
uniform weight bit-width that already meets every budget, the duals stay near zero and the
search only trades precision between layers where the task loss asks for it. A short search
rarely leaves a uniform start, so ``sensitivity`` starts it from a mixed assignment that already
spends the budget where it hurts least (:mod:`hmqsearch.constrained.allocation`).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from torch import Tensor

from hmqsearch.constrained.allocation import (
    Sensitivity, allocate, measure_sensitivity, only_lowest_fits, start_search_at,
)
from hmqsearch.constrained.constraints import Constraint
from hmqsearch.errors import UserError
from hmqsearch.quant.hmq import HMQQuantizer
from hmqsearch.quant.prepare import QuantModel

log = logging.getLogger(__name__)

STARTS = ("highest", "feasible_uniform", "sensitivity")


class Start(NamedTuple):
    """The start width per searched layer (None: the highest), and the layer sensitivity it
    was allocated from (None unless measured)."""

    bits: dict[str, int] | None
    sensitivity: Sensitivity | None = None


def check_start(start: str) -> None:
    if start not in STARTS:
        raise UserError(f"search.start={start!r}; allowed: {', '.join(STARTS)}")


def _searched_weight_quantizers(qmodel: QuantModel) -> dict[str, HMQQuantizer]:
    return {name: layer.wq for name, layer in qmodel.layers() if not layer.wq.float_pinned and len(layer.wq.bits) > 1}


def warm_start(
    qmodel: QuantModel, constraints: list[Constraint], start: str, batches: list[Tensor] | None = None,
    progress: bool = False,
) -> Start:
    """Put every searched weight quantizer's initial mass on its start bit-width.

    ``feasible_uniform``: the highest weight bit-width that, taken by every searched weight
    quantizer (activations at their highest), meets every budget exactly. ``sensitivity``: a
    per-layer width from the layer sensitivity measured on ``batches`` (calibration images),
    allocated to meet every budget (``progress``: a progress bar over the layers measured).
    Returns the start width per layer name, or None for ``highest`` or when no start fits
    (the search then starts at the highest), with the sensitivity where it was measured.
    """
    check_start(start)
    if start == "highest" or not constraints:
        return Start(None)
    searched = _searched_weight_quantizers(qmodel)
    if start == "sensitivity":
        if not batches:
            raise ValueError("search.start=sensitivity needs calibration batches")
        if only_lowest_fits(searched, constraints):
            log.info("search starts at the lowest weight bit-widths, the only ones that meet every budget")
            return Start({name: int(q.bits.min()) for name, q in searched.items()})
        sensitivity = measure_sensitivity(qmodel, searched, batches, progress)
        assignment = allocate(searched, constraints, sensitivity)
        if assignment is None:
            log.info("no weight bit-widths meet every budget: the search starts at the highest")
        else:
            log.info("search starts at the sensitivity allocation: %s",
                     ", ".join(f"{name} {bits}" for name, bits in assignment.items()))
        return Start(assignment, sensitivity)
    widths = [set(q.candidate_bits) for q in searched.values()]
    common = set.intersection(*widths) if widths else set()
    for bits in sorted(common, reverse=True):
        start_search_at(searched, dict.fromkeys(searched, bits))
        if all(c.satisfied() for c in constraints):
            log.info("search starts at uniform %d-bit weights, the highest that meets every budget", bits)
            return Start(dict.fromkeys(searched, bits))
    start_search_at(searched, {name: max(q.candidate_bits) for name, q in searched.items()})
    log.info("no uniform weight bit-width meets every budget: the search starts at the highest")
    return Start(None)
