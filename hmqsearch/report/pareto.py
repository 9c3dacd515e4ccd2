"""Accuracy against packed weight size: a Markdown table and a PNG plot of a sweep's runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from adjustText import adjust_text  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from hmqsearch.report.runs import Run  # noqa: E402

STYLE = {  # method -> (marker, colour, legend name)
    "hmq": ("o", "tab:blue", "HMQ search"),
    "uniform": ("s", "tab:orange", "uniform QAT"),
    "ptq": ("^", "tab:green", "PTQ (no training)"),
    "spiq": ("D", "tab:purple", "SPIQ (data-free)"),
}


def _kib(run: Run) -> float:
    return run.summary["weight_bytes_packed"] / 1024


def baselines_at_least_as_large(run: Run, runs: list[Run]) -> list[Run]:
    """Complete baseline runs whose packed weights are at least as large as ``run``'s."""
    size = run.summary["weight_bytes_packed"]
    return [r for r in runs if r.complete and r.method != "hmq" and r.summary["weight_bytes_packed"] >= size]


def next_size_up(run: Run, runs: list[Run]) -> list[Run]:
    """The baselines of the smallest packed size at least ``run``'s: the ones it competes with."""
    rivals = baselines_at_least_as_large(run, runs)
    if not rivals:
        return []
    size = min(r.summary["weight_bytes_packed"] for r in rivals)
    return [r for r in rivals if r.summary["weight_bytes_packed"] == size]


def _verdict(run: Run, rivals: list[Run]) -> str:
    if run.method != "hmq":
        return ""
    if not rivals:
        return "no baseline this large"
    best = max(rivals, key=lambda r: r.summary["quant_top1"])
    margin = run.summary["quant_top1"] - best.summary["quant_top1"]
    verdict = "beats all" if margin > 0 else "does NOT beat all"
    return f"{verdict} {len(rivals)} (best: {best.name}, {best.summary['quant_top1']:.2f} %, {margin:+.2f})"


def _ordered(runs: list[Run]) -> list[Run]:
    order = {m: i for i, m in enumerate(STYLE)}
    return sorted(runs, key=lambda r: (order.get(r.method, 9), -r.summary["weight_bytes_packed"]))


def markdown_table(runs: list[Run]) -> str:
    """One row per complete run, then a list of the failed or incomplete ones."""
    done = _ordered([r for r in runs if r.complete])
    lines = [
        "| run | method | packed weight bytes | compression | test top-1 | vs float | before fine-tune "
        "| feasible | wall time | vs the baselines of the next size up | vs every baseline of equal or larger size |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | --- |",
    ]
    for r in done:
        s = r.summary
        budget = f" (budget {s['budget_weight_bytes']:,.0f})" if s.get("budget_weight_bytes") else ""
        feasible = {True: "yes", False: "NO", None: "no budget"}[s.get("feasible")]
        lines.append(
            f"| {r.path.name} | {r.name} | {s['weight_bytes_packed']:,}{budget} | {s['compression_packed']:.2f}x "
            f"| {s['quant_top1']:.2f} % | {s['quant_top1'] - s['float_top1']:+.2f} | {s['search_top1']:.2f} % "
            f"| {feasible} | {s['timings']['total_s'] / 60:.1f} min | {_verdict(r, next_size_up(r, runs))} "
            f"| {_verdict(r, baselines_at_least_as_large(r, runs))} |"
        )
    if done:
        lines.append(f"\nFloat model: {done[0].summary['float_top1']:.2f} % test top-1, "
                     f"{done[0].summary['float_weight_bytes']:,} weight bytes (float32).")
    failed = [r for r in runs if not r.complete]
    if failed:
        lines.append("\nFailed or incomplete runs:\n")
        lines += [f"- {r.path}: {r.problem}; overrides: {' '.join(r.overrides) or '(none)'}" for r in failed]
    return "\n".join(lines) + "\n"


def _labelled(runs: list[Run]) -> set[int]:
    """Runs whose points get a text label: every search and uniform run, and for PTQ only the
    best calibration at each size (a sweep holds up to six per size, their labels would pile up)."""
    keep = {id(r) for r in runs if r.method != "ptq"}
    best: dict[int, Run] = {}
    for r in runs:
        size = r.summary["weight_bytes_packed"]
        if r.method == "ptq" and (size not in best or r.summary["quant_top1"] > best[size].summary["quant_top1"]):
            best[size] = r
    return keep | {id(r) for r in best.values()}


def _draw(ax: Any, done: list[Run], floor: float, top: float, labelled: set[int]) -> None:
    texts = []
    for method, (marker, colour, name) in STYLE.items():
        pts = sorted((r for r in done if r.method == method), key=_kib)
        if not pts:
            continue
        xs, ys = [_kib(r) for r in pts], [r.summary["quant_top1"] for r in pts]
        ax.plot(xs, [max(y, floor) for y in ys], marker=marker, color=colour, label=name,
                linestyle="-" if method == "hmq" else "none", markersize=8, alpha=0.8)
        for r, x, y in zip(pts, xs, ys):
            if id(r) not in labelled:
                continue
            text = r.name.replace("PTQ ", "best PTQ " if method == "ptq" else "").replace("uniform ", "")
            text += f" ({y:.1f} %)" if y < floor else ""
            texts.append(ax.text(x, max(y, floor), text, fontsize=8, color=colour))
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_ylim(bottom=floor - 0.5, top=top)
    ax.set_xlabel("packed weight size (KiB, log scale)")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(True, which="both", alpha=0.3)
    # runs of one size crowd together (a search and the PTQ runs at 4x, uniform QAT at 3 and 6 epochs)
    adjust_text(texts, ax=ax, arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5})


def pareto_plot(runs: list[Run], path: Path, title: str = "Test top-1 vs packed weight size") -> Path:
    """Top-1 against packed weight KiB (log axis): the whole range, and beside it the region within
    three points of the float model, where the runs worth comparing crowd together. Points far
    below a panel's range sit on its bottom edge with their accuracy in brackets."""
    done = [r for r in runs if r.complete]
    fig, axes = plt.subplots(1, 2, figsize=(14, 6), dpi=120)
    float_top1 = done[0].summary["float_top1"] if done else None
    trained = [r.summary["quant_top1"] for r in done if r.method not in ("ptq", "spiq")] or [r.summary["quant_top1"] for r in done]
    floor = min(trained + [float_top1 or 100.0]) - 2.0
    reference = float_top1 or max(trained, default=100.0)
    top, near = reference + 1.0, reference - 3.0
    labelled = _labelled(done)
    _draw(axes[0], done, floor, top, labelled)
    _draw(axes[1], [r for r in done if r.summary["quant_top1"] >= near], near, top, labelled)
    for ax in axes:
        if float_top1 is not None:
            ax.axhline(float_top1, color="grey", linestyle="--", linewidth=1)
            ax.annotate(f"float32 {float_top1:.2f} %", (0.01, float_top1), xycoords=("axes fraction", "data"),
                        textcoords="offset points", xytext=(0, 4), fontsize=8, color="grey")
        ax.legend(loc="lower right")
    axes[0].set_title(title + ("\n(points below the axis are drawn on it, their accuracy in brackets)"
                               if any(r.summary["quant_top1"] < floor for r in done) else ""))
    axes[1].set_title(f"within 3 points of float ({near:.1f} % and up)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
