"""A budget-feasible weight bit-width per layer from measured layer sensitivity.

Used by ``search.start=sensitivity``: the search then starts from an assignment that already
spends the budget where it costs the network least, instead of a uniform one it rarely leaves
in a short schedule.

Sensitivity of layer l at b bits: the KL divergence of the network's output distribution when
only layer l's weights drop to b bits (at that width's lowest-MSE threshold), every other
quantizer at its argmax start, from the network with every weight at its highest width, on the
calibration images (no labels needed). Where the network keeps batch norm
(``search.fold_bn=false``), every measurement first re-estimates the batch-norm statistics on
those images: training re-centres and re-scales each quantized layer's output through its batch
norm from the first steps, so the error it leaves is what the measurement should count (on
ResNet-20 this divides the 2-bit KL of the two most sensitive layers by 30-35 and moves the 12x
allocation's 2-bit layers; docs/benchmark.md). The allocation treats these as additive (a
multiple-choice knapsack) and solves it greedily on the exact discrete costs, so any set of
budgets (size, latency) is handled as by :func:`~hmqsearch.constrained.repair.repair`:

1. lower: from the highest widths, repeatedly apply the drop of one layer to any lower width
   with the least sensitivity added per unit of normalised cost saved on the violated budgets,
   until every budget holds;
2. raise: then repeatedly apply the raise with the most sensitivity removed per unit of
   normalised cost added that keeps every budget, until none fits (the lowering overshoots).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from rich.progress import track
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn

from hmqsearch.constrained.constraints import Constraint, normalised_cost
from hmqsearch.constrained.repair import with_argmax
from hmqsearch.inputs import run_model, to_device
from hmqsearch.quant.hmq import HMQQuantizer
from hmqsearch.quant.prepare import QuantModel

log = logging.getLogger(__name__)

Sensitivity = dict[str, dict[int, float]]
T = TypeVar("T")


def _stored_statistics(model: nn.Module) -> list[tuple[_BatchNorm, dict[str, Tensor]]]:
    """Every batch norm with a copy of its running statistics, to put back after ``update_bn``."""
    return [(m, {k: v.clone() for k, v in m.state_dict().items()})
            for m in model.modules() if isinstance(m, _BatchNorm)]


@torch.no_grad()
def measure_sensitivity(
    qmodel: QuantModel, quantizers: dict[str, HMQQuantizer], batches: list[Tensor], progress: bool = False
) -> Sensitivity:
    """KL(reference || layer l alone at b bits) per layer name and candidate width, in nats.

    The reference has every quantizer of ``quantizers`` at its highest width; the other
    quantizers (activations) stay at their current argmax.  Batch-norm statistics are
    re-estimated on ``batches`` for each measurement.  The model's quantizer states, training
    flag, logits and batch-norm statistics are restored afterwards.
    """
    started = time.time()
    states = {id(q): q.state for _, q in qmodel.quantizers()}
    saved = {name: q.logits.detach().clone() for name, q in quantizers.items()}
    was_training = qmodel.training
    device = next(qmodel.parameters()).device
    batches = [to_device(x, device) for x in batches]
    stored = _stored_statistics(qmodel)
    qmodel.set_state("fixed")
    qmodel.eval()
    try:
        start_search_at(quantizers, {name: max(q.candidate_bits) for name, q in quantizers.items()})
        update_bn(batches, qmodel)  # a no-op without batch norm
        reference = [F.log_softmax(run_model(qmodel, x), dim=1) for x in batches]

        def divergence() -> float:
            update_bn(batches, qmodel)
            kl = [F.kl_div(F.log_softmax(run_model(qmodel, x), dim=1), ref, log_target=True, reduction="batchmean")
                  for x, ref in zip(batches, reference)]
            return float(torch.stack(kl).mean())

        sensitivity: Sensitivity = {}
        layers = track(quantizers.items(), description="layer sensitivity", disable=not progress, transient=True)
        for name, q in layers:
            highest = max(q.candidate_bits)
            sensitivity[name] = {highest: 0.0}
            for bits in q.candidate_bits:
                if bits != highest:
                    sensitivity[name][bits] = _with_bits(q, bits, divergence)
    finally:
        for name, q in quantizers.items():
            q.logits.data.copy_(saved[name])
        for _, q in qmodel.quantizers():
            q.state = states[id(q)]
        for norm, statistics in stored:
            norm.load_state_dict(statistics)
        qmodel.train(was_training)
    log.info("layer sensitivity: %d layers x widths measured in %.1f s", len(quantizers), time.time() - started)
    return sensitivity


def start_search_at(quantizers: dict[str, HMQQuantizer], widths: dict[str, int]) -> None:
    """Start each named quantizer's search at its width (that width's preferred threshold)."""
    for name, bits in widths.items():
        q = quantizers[name]
        q.fix(q.scheme_at(bits), start=True)


def _excess(constraints: list[Constraint]) -> float:
    """Normalised cost above the budgets, summed over the budgets (0 when all hold)."""
    return sum(max(0.0, c.exact() - c.budget) / c.budget for c in constraints)


def _with_bits(q: HMQQuantizer, bits: int, measure: Callable[[], T]) -> T:
    """``measure()`` with ``q`` at width ``bits`` (that width's preferred threshold), restored after."""
    return with_argmax(q, q.scheme_at(bits), measure)


def only_lowest_fits(quantizers: dict[str, HMQQuantizer], constraints: list[Constraint]) -> bool:
    """Whether every layer at its lowest width is the only assignment that meets every budget
    (then there is nothing to allocate). Leaves every quantizer started at its lowest width."""
    lowest = {name: min(q.candidate_bits) for name, q in quantizers.items()}
    start_search_at(quantizers, lowest)
    if not all(c.satisfied() for c in constraints):
        return False
    for name, q in quantizers.items():
        higher = [b for b in q.candidate_bits if b > lowest[name]]
        if higher and _with_bits(q, min(higher), lambda: all(c.satisfied() for c in constraints)):
            return False
    return True


def allocate(
    quantizers: dict[str, HMQQuantizer], constraints: list[Constraint], sensitivity: Sensitivity
) -> dict[str, int] | None:
    """Per-layer weight widths meeting every budget at low summed sensitivity (module docstring).

    Leaves each quantizer started at its width and returns the assignment, or None (every
    quantizer back at its highest width) when even the lowest widths break a budget.
    """
    assignment = {name: max(q.candidate_bits) for name, q in quantizers.items()}
    start_search_at(quantizers, assignment)
    if not _lower_until_feasible(quantizers, constraints, sensitivity, assignment):
        return None
    _raise_into_slack(quantizers, constraints, sensitivity, assignment)
    return assignment


def _lower_until_feasible(
    quantizers: dict[str, HMQQuantizer], constraints: list[Constraint], sensitivity: Sensitivity,
    assignment: dict[str, int],
) -> bool:
    """Lower the layer with the least sensitivity added per normalised excess removed, until
    every budget holds (True), or nothing lowers the excess (False, all back at the highest)."""
    while (before := _excess(constraints)) > 0:
        best: tuple[float, str, int] | None = None
        for name, q in quantizers.items():
            current = assignment[name]
            for bits in (b for b in q.candidate_bits if b < current):
                saved = before - _with_bits(q, bits, lambda: _excess(constraints))
                if saved <= 0:
                    continue
                added = max(0.0, sensitivity[name][bits] - sensitivity[name][current])
                if best is None or added / saved < best[0]:
                    best = (added / saved, name, bits)
        if best is None:
            start_search_at(quantizers, {name: max(q.candidate_bits) for name, q in quantizers.items()})
            return False
        _, name, bits = best
        assignment[name] = bits
        start_search_at(quantizers, {name: bits})
    return True


def _raise_into_slack(
    quantizers: dict[str, HMQQuantizer], constraints: list[Constraint], sensitivity: Sensitivity,
    assignment: dict[str, int],
) -> None:
    """Raise the layer with the most sensitivity removed per normalised cost added that keeps
    every budget, until no raise fits (the greedy lowering overshoots)."""
    while True:
        before = normalised_cost(constraints)
        best: tuple[float, str, int] | None = None
        for name, q in quantizers.items():
            current = assignment[name]
            for bits in (b for b in q.candidate_bits if b > current):
                removed = sensitivity[name][current] - sensitivity[name][bits]
                if removed <= 0:
                    continue
                costs = _with_bits(q, bits, lambda: [c.exact() for c in constraints])
                if any(cost > c.budget for cost, c in zip(costs, constraints)):
                    continue
                added = sum(cost / c.budget for cost, c in zip(costs, constraints)) - before
                score = math.inf if added <= 0 else removed / added
                if best is None or score > best[0]:
                    best = (score, name, bits)
        if best is None:
            return
        _, name, bits = best
        assignment[name] = bits
        start_search_at(quantizers, {name: bits})
