"""``summary.json``: the schema of a run's summary and its two writers.

:class:`Summary` holds every key the training run writes, in the file's order;
:func:`summarize` fills it from the run's state.  Two keys follow it in the file:
``finished`` (written False with the artifacts when an export is to come, so that a run killed
while exporting is resumed, see :func:`hmqsearch.resume.run_finished`; True once the export is
done) and ``export`` (the export's figures and ``passed``, with ``timings.export_s``), both
written by :func:`record_export`, which ``train.py stage=export`` also uses on the summary of a
run finished earlier.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from hmqsearch.constrained.allocation import Sensitivity
from hmqsearch.export.verify import VerificationError
from hmqsearch.io import write_json
from hmqsearch.lit.ddp import world_size
from hmqsearch.run.load import SUMMARY
from hmqsearch.run.state import RunState

OMIT_IF_NONE = {"omit_if_none": True}  # a key left out of the summary of a method that does not search


@dataclass
class Summary:
    method: dict[str, Any]  # name, label, weight_bits, act_bits, calibration_batches, calibration, percentile
    float_top1: float
    search_top1: float  # after the assignment (and its batch-norm re-estimation), before fine-tuning
    quant_top1: float
    weight_bytes_packed: int
    budget_weight_bytes: float | None
    weight_bytes_container: int
    float_weight_bytes: int
    overhead_bytes_packed: int
    compression_packed: float
    model_float_bytes: int
    model_bytes_packed: int
    compression_model: float
    budget_scope: str
    float_parameters: list[dict[str, Any]]
    feasible: bool | None  # None for a method that does not search, which has no budgets
    latency_model: str | None
    expected_latency: float | None
    exact_latency: float | None
    budget_latency_ms: float | None
    bops: int
    compression_bops: float
    activation_bytes_max: int
    budgets: dict[str, dict[str, Any]]  # name -> budget, exact, unit
    search_start_weight_bits: dict[str, int] | None
    search_start_sensitivity: Sensitivity | None
    bn_reestimated_batches: int
    duals: dict[str, float]
    proximity_duals: dict[str, Any] | None
    search_moved_quantizers: int | None = field(metadata=OMIT_IF_NONE)
    search_moved: list[str] | None = field(metadata=OMIT_IF_NONE)
    search_end_costs: dict[str, dict[str, float]] | None = field(metadata=OMIT_IF_NONE)
    repair: list[dict[str, Any]]
    fill: list[dict[str, Any]]
    repair_changed_quantizers: int
    fill_changed_quantizers: int
    activation_ranges: dict[str, float]
    timings: dict[str, float]  # seconds per stage and total_s (export_s added by the export)
    pretrained: str | None
    world_size: int
    rank_disagreement: dict[str, float] | None

    def to_json(self) -> dict[str, Any]:
        """The summary as written to summary.json (and returned by the run)."""
        return {
            f.name: getattr(self, f.name) for f in fields(self)
            if not (f.metadata.get("omit_if_none") and getattr(self, f.name) is None)
        }


def summarize(state: RunState) -> Summary:
    """The summary of a run whose stages up to the cost accounting are done."""
    cfg, costs, search, method = state.cfg, state.costs, state.search, state.method
    budgets = state.budget_report
    return Summary(
        method={"name": method.name, "label": method.label, "weight_bits": method.weight_bits,
                "act_bits": method.act_bits, "calibration_batches": len(state.calib),
                "calibration": cfg.search.calibration.method if method.calibrates else None,
                "percentile": cfg.search.calibration.percentile if method.calibrates else None},
        float_top1=state.float_top1, search_top1=state.search_top1, quant_top1=state.quant_top1,
        weight_bytes_packed=costs["weight_bytes_packed"],
        budget_weight_bytes=budgets.get("weight_bytes", {}).get("budget"),
        weight_bytes_container=costs["weight_bytes_container"], float_weight_bytes=costs["float_weight_bytes"],
        overhead_bytes_packed=costs["overhead_bytes_packed"], compression_packed=costs["compression_packed"],
        model_float_bytes=costs["model_float_bytes"], model_bytes_packed=costs["model_bytes_packed"],
        compression_model=costs["compression_model"], budget_scope=state.budgets.scope,
        float_parameters=[t.__dict__ for t in state.qmodel.float_parameters()],
        feasible=None if not method.searches else all(c.satisfied() for c in state.constraints),
        latency_model=costs["latency_model"], expected_latency=costs["expected_latency"],
        exact_latency=costs["exact_latency"], budget_latency_ms=budgets.get("latency_ms", {}).get("budget"),
        bops=costs["bops"], compression_bops=costs["compression_bops"],
        activation_bytes_max=costs["activation_bytes_max"], budgets=budgets,
        search_start_weight_bits=search.start_bits, search_start_sensitivity=search.start_sensitivity,
        bn_reestimated_batches=search.bn_batches, duals=search.duals, proximity_duals=search.proximity_duals,
        search_moved_quantizers=None if search.moved is None else len(search.moved),
        search_moved=search.moved, search_end_costs=search.end_costs,
        repair=[s.__dict__ for s in search.repair], fill=[s.__dict__ for s in search.fill],
        repair_changed_quantizers=len({s.quantizer for s in search.repair}),
        fill_changed_quantizers=len({s.quantizer for s in search.fill}),
        activation_ranges=state.ranges, timings={**state.timings, "total_s": time.time() - state.started},
        pretrained=cfg.model.pretrained, world_size=world_size(), rank_disagreement=search.rank_disagreement,
    )


def record_export(summary: dict[str, Any], out_dir: Path, export: Callable[[], dict[str, Any]]) -> None:
    """Run ``export`` (returning ``{"export": figures}``), add its figures to ``summary`` and
    rewrite ``out_dir/summary.json`` once: marked finished, with ``timings.export_s`` where the
    summary keeps timings.  A failed verification is recorded too (``summary["export"]["passed"]
    = False``, the run left unfinished) before the :class:`VerificationError` propagates.
    """
    started = time.time()
    try:
        summary.update(export())
        summary["export"]["passed"] = True
        summary["finished"] = True
    except VerificationError as exc:
        summary["export"] = {"passed": False, "verify": exc.result, "error": str(exc)}
        raise
    finally:
        if "timings" in summary:
            summary["timings"]["export_s"] = time.time() - started
        write_json(Path(out_dir) / SUMMARY, summary)
