"""Whether the search moved: each quantizer's argmax bit-width over the search, as a heat map
(``search_bits.png``) beside the raw records (``search_trace.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after selecting the non-interactive backend
import numpy as np  # noqa: E402

from hmqsearch.io import atomic_write, write_json  # noqa: E402

TRACE_NAME, CHART_NAME = "search_trace.json", "search_bits.png"


def _step_records(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in history if r.get("step") is not None]


def write_search_trace(
    start: dict[str, tuple[int, float]], history: list[dict[str, Any]], final: dict[str, int],
    run_dir: str | Path, title: str = "",
) -> tuple[Path, Path | None]:
    """``search_trace.json`` and, when steps were recorded, ``search_bits.png``: one heat-map row
    per searched quantizer (weights above inputs), one column per record, the colour its argmax
    bit-width; the last column is the final assignment after repair and fill."""
    run_dir = Path(run_dir)
    trace = write_json(run_dir / TRACE_NAME, {"start": start, "history": history, "final": final})
    records = _step_records(history)
    if not records or not start:
        return trace, None
    panels = [(kind, [n for n in start if n.endswith(f".{kind}")]) for kind in ("weight", "input")]
    panels = [(kind, names) for kind, names in panels if names]
    x = [100.0 * r["progress"] for r in records]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(9, 0.16 * len(start) + 2.2), squeeze=False, layout="constrained",
        height_ratios=[len(names) for _, names in panels],
    )
    all_bits = sorted({b for r in records for b, _ in r["assignment"].values()} | set(final.values()))
    vmin, vmax = min(all_bits), max(all_bits)
    for ax, (kind, names) in zip(axes[:, 0], panels):
        grid = np.array([[r["assignment"][n][0] for r in records] + [final.get(n, np.nan)] for n in names], float)
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_yticks(range(len(names)), [n.rsplit(".", 1)[0] for n in names], fontsize=6)
        ticks = np.unique(np.linspace(0, len(x) - 1, min(5, len(x))).round().astype(int))
        if len(x) > 2:
            ticks = ticks[ticks < len(x) - 1]  # room for the final column's label
        ax.set_xticks(list(ticks) + [len(x)], [f"{x[t]:.0f}%" for t in ticks] + ["final"], fontsize=7)
        ax.set_ylabel(f"{kind} quantizers", fontsize=8)
        fig.colorbar(image, ax=ax, label="argmax bits", ticks=all_bits)
    axes[-1, 0].set_xlabel("progress of the search (last column: after repair and fill)")
    axes[0, 0].set_title(f"Argmax bit-width over the search{': ' + title if title else ''}", fontsize=9)
    chart = atomic_write(run_dir / CHART_NAME, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    return trace, chart
