"""The sensitivity start of one run: the KL measured per layer and weight width, and the width
allocated to each layer, as a Markdown table and a heat map."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after selecting the non-interactive backend
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from hmqsearch.constrained.allocation import Sensitivity  # noqa: E402
from hmqsearch.io import atomic_write, atomic_write_text  # noqa: E402

TABLE_NAME, CHART_NAME = "allocation.md", "allocation.png"


def _widths(sensitivity: Sensitivity) -> list[int]:
    return sorted({bits for row in sensitivity.values() for bits in row})


def markdown_table(sensitivity: Sensitivity, allocated: dict[str, int] | None) -> str:
    """One row per layer: the KL (nats) at each candidate width, the allocated one in bold."""
    widths = _widths(sensitivity)
    lines = ["| layer | allocated | " + " | ".join(f"{b} bits" for b in widths) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in widths) + " |"]
    for name, row in sensitivity.items():
        chosen = (allocated or {}).get(name)
        cells = ["-" if b not in row else (f"**{row[b]:.4g}**" if b == chosen else f"{row[b]:.4g}") for b in widths]
        lines.append(f"| {name} | {chosen if chosen is not None else '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_allocation_report(
    sensitivity: Sensitivity, allocated: dict[str, int] | None, run_dir: str | Path, title: str = ""
) -> tuple[Path, Path]:
    """``allocation.md`` and ``allocation.png`` (KL heat map, allocated widths boxed) into ``run_dir``."""
    run_dir = Path(run_dir)
    heading = ("# Sensitivity start: KL divergence (nats) of the output when one layer's weights drop to a "
               f"width, and the width allocated{': ' + title if title else ''}\n\n")
    table = atomic_write_text(run_dir / TABLE_NAME, heading + markdown_table(sensitivity, allocated))
    names, widths = list(sensitivity), _widths(sensitivity)
    kl = np.array([[sensitivity[n].get(b, np.nan) for b in widths] for n in names], dtype=float)
    shown = np.ma.masked_where(~(kl > 0), kl)  # the reference width (0) and missing widths stay blank
    fig, ax = plt.subplots(figsize=(0.7 * len(widths) + 3.5, 0.3 * len(names) + 1.6), layout="constrained")
    if shown.count():
        image = ax.imshow(shown, aspect="auto", cmap="viridis",
                          norm=LogNorm(vmin=float(shown.min()), vmax=float(shown.max())))
        fig.colorbar(image, ax=ax, label="KL divergence (nats)")
    else:
        ax.imshow(np.zeros_like(kl), aspect="auto", cmap="Greys", vmin=0, vmax=1)
    for i, name in enumerate(names):
        chosen = (allocated or {}).get(name)
        if chosen in widths:
            j = widths.index(chosen)
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(widths)), [str(b) for b in widths])
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("weight bits (allocated width boxed; the highest is the reference: KL 0, blank)")
    ax.set_title(f"Sensitivity start{': ' + title if title else ''}", fontsize=9)
    chart = atomic_write(run_dir / CHART_NAME, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
    return table, chart
