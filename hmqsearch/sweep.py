"""Sweeps: a failed job is recorded in its run directory instead of stopping the multirun, and
``sweep_status.json`` / ``sweep_status.md`` list every job's overrides and outcome at the end."""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from hmqsearch.io import atomic_write_text, write_json

FAILURE = "failure.json"


def record_failure(run_dir: Path, exc: BaseException) -> None:
    """Write ``failure.json`` (error message, type, traceback) into a failed job's directory."""
    write_json(run_dir / FAILURE, {
        "status": "failed", "error": str(exc), "type": type(exc).__name__,
        "traceback": "".join(traceback.format_exception(exc)),
    })


def job_status(job_dir: Path) -> dict[str, Any]:
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    entry: dict[str, Any] = {"job": job_dir.name, "overrides": overrides}
    if (job_dir / FAILURE).is_file():
        failure = json.loads((job_dir / FAILURE).read_text())
        entry.update(status="failed", error=failure["error"])
    elif (job_dir / "summary.json").is_file():
        summary = json.loads((job_dir / "summary.json").read_text())
        entry.update(status="ok", quant_top1=summary.get("quant_top1"), feasible=summary.get("feasible"),
                     weight_bytes_packed=summary.get("weight_bytes_packed"))
    else:
        entry.update(status="incomplete")  # killed, or still running under another launcher
    return entry


def sweep_status(sweep_dir: Path) -> list[dict[str, Any]]:
    jobs = [d for d in Path(sweep_dir).iterdir() if d.is_dir() and (d / ".hydra").is_dir()]
    return [job_status(d) for d in sorted(jobs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))]


def status_markdown(jobs: list[dict[str, Any]]) -> str:
    counts = {s: sum(j["status"] == s for j in jobs) for s in ("ok", "failed", "incomplete")}
    lines = [
        f"# Sweep status: {counts['ok']} ok, {counts['failed']} failed, {counts['incomplete']} incomplete", "",
        "| job | overrides | status | quant top-1 | detail |", "| --- | --- | --- | --- | --- |",
    ]
    for j in jobs:
        top1 = f"{j['quant_top1']:.2f} %" if j.get("quant_top1") is not None else ""
        detail = j.get("error", "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {j['job']} | {' '.join(j['overrides'])} | {j['status']} | {top1} | {detail} |")
    return "\n".join(lines) + "\n"


class SweepStatus(Callback):
    """Hydra callback: at the end of a multirun, writes the status of every job into the sweep
    directory (it reads the job directories, so it works with any launcher)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        jobs = sweep_status(sweep_dir)
        write_json(sweep_dir / "sweep_status.json", jobs)
        text = status_markdown(jobs)
        atomic_write_text(sweep_dir / "sweep_status.md", text)
        print(text, end="")
