"""Where the search starts: the highest precision, or the best uniform assignment that fits.

Started from the highest precision, a tight weight budget makes the duals grow until their
pull (proportional to each layer's size) outweighs the task loss, so the largest layers are
pushed to the lowest bit-widths first, whatever their sensitivity. Started from the highest
uniform weight bit-width that already meets every budget, the duals stay near zero and the
search only trades precision between layers where the task loss asks for it.
"""

from __future__ import annotations

import logging

from hmqsearch.constrained.constraints import Constraint
from hmqsearch.errors import UserError
from hmqsearch.quant.hmq import HMQQuantizer
from hmqsearch.quant.prepare import QuantModel

log = logging.getLogger(__name__)

STARTS = ("highest", "feasible_uniform")


def check_start(start: str) -> None:
    if start not in STARTS:
        raise UserError(f"search.start={start!r}; allowed: {', '.join(STARTS)}")


def _searched_weight_quantizers(qmodel: QuantModel) -> list[HMQQuantizer]:
    return [layer.wq for _, layer in qmodel.layers() if not layer.wq.float_pinned and len(layer.wq.bits) > 1]


def warm_start(qmodel: QuantModel, constraints: list[Constraint], start: str) -> int | None:
    """Put every searched weight quantizer's initial mass on the start bit-width.

    ``feasible_uniform``: the highest weight bit-width that, taken by every searched weight
    quantizer (activations at their highest), meets every budget exactly. Returns it, or
    None for ``highest`` or when no uniform choice fits (the search then starts at the highest).
    """
    check_start(start)
    if start == "highest" or not constraints:
        return None
    searched = _searched_weight_quantizers(qmodel)
    common = set.intersection(*({int(b) for b in q.bits.tolist()} for q in searched)) if searched else set()
    for bits in sorted(common, reverse=True):
        for q in searched:
            q.start_at(bits)
        if all(c.satisfied() for c in constraints):
            log.info("search starts at uniform %d-bit weights, the highest that meets every budget", bits)
            return bits
    for q in searched:
        q.start_at(int(q.bits.max()))
    log.info("no uniform weight bit-width meets every budget: the search starts at the highest")
    return None
