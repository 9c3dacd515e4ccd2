"""Per-layer bit-width chart (weights and layer inputs) of one run, from its precision.yaml."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hmqsearch.export.precision import read_precision  # noqa: E402


def _bits(entry: dict) -> int | None:
    return None if entry.get("bits") == "float" else int(entry["bits"])


def bitwidth_chart(precision_path: Path, out: Path, title: str | None = None) -> Path:
    """Grouped bars per layer, in execution order: weight bits and input-activation bits.

    A tensor left in float is drawn as an empty bar labelled ``fp``.
    """
    layers = read_precision(precision_path)["layers"]
    names = list(layers)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.42 * len(names) + 2), 4.5), dpi=120)
    for offset, key, colour, label in ((-0.2, "weight", "tab:blue", "weights"), (0.2, "input", "tab:orange", "input activations")):
        bits = [_bits(layers[n][key]) for n in names]
        ax.bar(x + offset, [b or 0 for b in bits], width=0.4, color=colour, label=label)
        for xi, b in zip(x + offset, bits):
            ax.annotate("fp" if b is None else str(b), (xi, b or 0), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(0, 9))
    ax.set_ylim(0, 10)
    ax.set_ylabel("bits")
    ax.set_title(title or f"Per-layer bit-widths: {precision_path.parent.name}")
    ax.legend(loc="upper right", fontsize=8, ncols=2)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
