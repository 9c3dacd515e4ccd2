"""An exported assignment held to the budgets of the run it came from.

A precision.yaml edited by hand (one layer 4 -> 5 bits) can break the weight or latency budget
the run was searched under; the export refuses it unless ``export.allow_over_budget=true``.
"""

from __future__ import annotations

import logging
from typing import Any

from hmqsearch.constrained.budgets import build_constraints
from hmqsearch.cost.latency import build_latency_table
from hmqsearch.errors import UserError
from hmqsearch.quant.prepare import QuantModel
from hmqsearch.run.config import budget_spec, run_method

log = logging.getLogger(__name__)


def budget_overruns(qmodel: QuantModel, run_cfg: Any) -> list[str]:
    """Each budget of ``run_cfg`` (the run's resolved config) that ``qmodel``'s assignment breaks,
    with its exact cost; none for a method that does not search under the budgets."""
    if not run_method(run_cfg).searches:
        return []
    budgets = budget_spec(run_cfg)
    cost = run_cfg.get("cost") or {}
    table = None
    if budgets.latency_ms is not None:
        table = build_latency_table(qmodel, cost.get("latency"), cost.get("target"), cost.get("latency_table"))
    return [
        f"{c.name} {c.exact():,.6g} {c.unit} against its budget {c.budget:,.6g}"
        for c in build_constraints(qmodel, budgets, table) if not c.satisfied()
    ]


def check_budgets(qmodel: QuantModel, run_cfg: Any, source: str, allow_over_budget: bool) -> None:
    """Refuse (a :class:`UserError`) an assignment over its run's budgets unless allowed; an
    allowed one is exported with a warning."""
    over = budget_overruns(qmodel, run_cfg)
    if not over:
        return
    text = f"{source} breaks the run's budget: {'; '.join(over)}"
    if not allow_over_budget:
        raise UserError(f"{text}; allowed: an assignment within the budgets, or export.allow_over_budget=true "
                        "to export it anyway")
    log.warning("%s; exported anyway (export.allow_over_budget=true)", text)
