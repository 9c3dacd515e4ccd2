"""Layer sensitivity read out from the proximity duals: a Markdown table and a bar chart."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after selecting the non-interactive backend
import numpy as np  # noqa: E402

from hmqsearch.io import atomic_write, atomic_write_text  # noqa: E402

TABLE_NAME, CHART_NAME = "sensitivity.md", "sensitivity.png"


def ranked(duals: dict[str, float]) -> list[tuple[str, float]]:
    """Layers by dual, largest first (ties keep the layer order)."""
    return sorted(duals.items(), key=lambda kv: -kv[1])


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two paired sequences (average ranks for ties)."""
    ra, rb = _ranks(np.asarray(a, dtype=float)), _ranks(np.asarray(b, dtype=float))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):  # ties share their mean rank
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def markdown_table(duals: dict[str, float]) -> str:
    lines = ["| rank | layer | final dual |", "| --- | --- | --- |"]
    lines += [f"| {i} | {name} | {value:.4g} |" for i, (name, value) in enumerate(ranked(duals), 1)]
    return "\n".join(lines) + "\n"


def write_sensitivity_report(duals: dict[str, float], run_dir: str | Path, title: str = "") -> tuple[Path, Path]:
    """``sensitivity.md`` (layers ranked by final dual) and ``sensitivity.png`` into ``run_dir``."""
    run_dir = Path(run_dir)
    heading = f"# Layer sensitivity (final proximity duals){': ' + title if title else ''}\n\n"
    table = atomic_write_text(run_dir / TABLE_NAME, heading + markdown_table(duals))
    names, values = zip(*ranked(duals)) if duals else ((), ())
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(names) + 1.5), 4.5), layout="constrained")
    ax.bar(range(len(names)), values, color="tab:red")
    ax.set_xticks(range(len(names)), names, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("final dual")
    ax.set_title(f"Layer sensitivity{': ' + title if title else ''}", fontsize=9)
    chart = atomic_write(run_dir / CHART_NAME, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
    return table, chart
