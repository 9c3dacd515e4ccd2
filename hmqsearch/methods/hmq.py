"""The HMQ search as a method: learned per-layer bit-widths and thresholds under the budgets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hmqsearch.methods.base import Method, Prepared
from hmqsearch.quant.assignment import Assignment


@dataclass(frozen=True)
class HMQSearch(Method):
    """The constrained search over every candidate of ``search.weight_bits`` x ``search.act_bits``.

    Its assignment is made by the run's search stages (warm start, the primal-dual search,
    repair and fill against the exact budgets, batch-norm re-estimation; see
    :mod:`hmqsearch.run.stages`), which drive the Lightning trainer; the fine-tune stage follows.
    """

    name: ClassVar[str] = "hmq"
    searches: ClassVar[bool] = True
    trains: ClassVar[bool] = True

    def assign(self, prepared: Prepared) -> Assignment:
        """The assignment the search stages left in ``prepared.qmodel`` (its argmax)."""
        return Assignment.of(prepared.qmodel)
