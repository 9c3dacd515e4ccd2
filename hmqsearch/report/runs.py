"""Collect the runs of one or more Hydra (multi)run folders: summary, overrides, status."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hmqsearch.errors import UserError
from hmqsearch.run.load import is_run_dir, read_overrides, read_summary


@dataclass
class Run:
    """One run folder. ``summary`` is None for a failed or unfinished run (no summary.json)."""

    path: Path
    overrides: list[str] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    problem: str | None = None
    detail: str = ""  # the overrides that tell this run from others of the same label (see collect_runs)

    @property
    def complete(self) -> bool:
        return self.summary is not None

    @property
    def method(self) -> str:
        return (self.summary or {}).get("method", {}).get("name", "hmq")

    @property
    def label(self) -> str:
        """Short name in tables and plots: the budget for the search, precision (+ calibration) for baselines."""
        s = self.summary or {}
        m = s.get("method", {})
        if self.method == "hmq":
            budget = s.get("budget_weight_bytes")
            compression = s.get("float_weight_bytes", 0) / budget if budget else None
            return f"HMQ {compression:.0f}x" if compression else "HMQ"
        precision = f"W{m.get('weight_bits')}A{m.get('act_bits')}"
        if self.method == "uniform":
            return f"uniform {precision}"
        if self.method == "spiq":
            return f"SPIQ {precision}"
        calib = m.get("calibration", "")
        if calib == "percentile":
            calib = f"p{m.get('percentile')}"
        return f"PTQ {precision} {calib}"

    @property
    def name(self) -> str:
        """The label, with the overrides that set it apart from runs of the same label."""
        return f"{self.label} ({self.detail})" if self.detail else self.label


def _read_run(path: Path) -> Run:
    run = Run(path, read_overrides(path))
    try:
        run.summary = read_summary(path)
    except UserError as exc:
        run.problem = f"unreadable summary.json: {exc}"
        return run
    if run.summary is None:
        run.problem = "no summary.json (failed or still running)"
    return run


def collect_runs(folders: list[Path]) -> list[Run]:
    """Every run in ``folders``: each folder is a run itself or holds runs one level down."""
    runs: list[Run] = []
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"run folder {folder} does not exist")
        paths = [folder] if is_run_dir(folder) else sorted(
            (p for p in folder.iterdir() if p.is_dir() and is_run_dir(p)), key=lambda p: (len(p.name), p.name)
        )
        if not paths:
            raise UserError(f"{folder} holds no run (no summary.json or .hydra/ in it or its subfolders)")
        runs.extend(_read_run(p) for p in paths)
    _set_details(runs)
    return runs


def _set_details(runs: list[Run]) -> None:
    """Give each run that shares its label with another the overrides only some of them have
    (e.g. uniform W2A8 with 3 and with ``finetune.epochs=6``), so tables and plots tell them apart."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        if run.complete:
            groups.setdefault(run.label, []).append(run)
    for group in groups.values():
        if len(group) < 2:
            continue
        common = set.intersection(*(set(r.overrides) for r in group))
        for run in group:
            run.detail = ", ".join(o for o in run.overrides if o not in common)
