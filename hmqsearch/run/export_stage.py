"""``python train.py stage=export``: the export of a run finished earlier."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hmqsearch.cost.latency import LatencyTable, build_latency_table
from hmqsearch.errors import UserError
from hmqsearch.export.deploy import export_quantized
from hmqsearch.export.verify import first_batch
from hmqsearch.run.budget_check import check_budgets
from hmqsearch.run.load import PRECISION, FinishedRun, load_artifacts, load_run, read_summary
from hmqsearch.run.summary import record_export


def _source(cfg: DictConfig, out_dir: Path) -> tuple[FinishedRun, Path, Path]:
    """The run to export, the folder to write into and the precision.yaml it came from."""
    e = cfg.export
    if e.get("run_dir"):
        target = Path(e.run_dir)
        return load_run(target), target, target / PRECISION
    if e.get("checkpoint") and e.get("precision"):
        return load_artifacts(Path(e.precision), Path(e.checkpoint)), Path(out_dir), Path(e.precision)
    raise UserError(
        "stage=export needs export.run_dir=<a finished run directory>, "
        "or export.checkpoint=<quantized_state.pt or .ckpt> and export.precision=<precision.yaml>"
    )


def _measured_table(run: FinishedRun) -> LatencyTable | None:
    cost = run.cfg.get("cost", {})
    if cost.get("latency") != "measured":
        return None
    return build_latency_table(run.qmodel, "measured", None, cost.get("latency_table"))


def run_export_stage(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Export a finished run (``export.run_dir``, written into it) or a checkpoint +
    precision.yaml (``export.checkpoint``, ``export.precision``, written into ``out_dir``);
    returns the summary found there with the export figures."""
    run, target, source = _source(cfg, out_dir)
    check_budgets(run.qmodel, run.cfg, str(source), bool(cfg.export.get("allow_over_budget", False)))
    try:
        summary = read_summary(target) or {}
    except UserError as exc:
        raise UserError(f"{exc}; remove it to export anyway") from exc
    table = _measured_table(run)
    loader = run.datamodule.test_dataloader()
    record_export(summary, target, functools.partial(
        export_quantized, run.qmodel, target, first_batch(loader), loader,
        OmegaConf.to_container(cfg.export, resolve=True), arch=run.arch, spec=run.spec, latency_table=table,
    ))
    return summary
