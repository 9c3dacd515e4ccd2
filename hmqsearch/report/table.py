"""The short table printed at the end of a run."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from hmqsearch.quant.assignment import Assignment
from hmqsearch.quant.prepare import QuantModel


def _bits(entry: dict[str, Any]) -> str:
    if entry["bits"] == "float":
        return "fp32"
    return f"{entry['bits']}{'' if entry['signed'] else 'u'}"


def print_final_table(qmodel: QuantModel, summary: dict[str, Any], layer_bytes: dict[str, int]) -> None:
    """Per-layer bits and bytes, then size against budget and accuracy against float."""
    console = Console()
    layers = Table(title="Precision assignment", title_justify="left")
    for col in ("layer", "W bits", "A bits", "packed bytes"):
        layers.add_column(col, justify="left" if col == "layer" else "right")
    for name, entry in Assignment.of(qmodel).to_dict().items():
        layers.add_row(name, _bits(entry["weight"]), _bits(entry["input"]), f"{layer_bytes[name]:,}")
    console.print(layers)

    result = Table(title="Result", title_justify="left")
    result.add_column("quantity")
    result.add_column("value", justify="right")
    budget = summary.get("budget_weight_bytes")
    whole_model = summary.get("budget_scope", "layers") == "model" and "model_bytes_packed" in summary
    layer_budget = "" if budget is None or whole_model else f" / budget {budget:,.0f}"
    result.add_row("weight bytes (packed)", f"{summary['weight_bytes_packed']:,}{layer_budget}")
    result.add_row("compression, quantized layers", f"{summary['compression_packed']:.2f}x")
    if "model_bytes_packed" in summary:
        model_budget = f" / budget {budget:,.0f}" if budget is not None and whole_model else ""
        result.add_row("model bytes (packed)", f"{summary['model_bytes_packed']:,}{model_budget}")
        result.add_row("compression, whole model", f"{summary['compression_model']:.2f}x")
    if summary.get("expected_latency") is not None:
        budget_ms = summary.get("budget_latency_ms")
        result.add_row(f"latency ({summary['latency_model']})", f"{summary['exact_latency']:.4g} ms"
                       + (f" / budget {budget_ms:.4g} ms" if budget_ms is not None else ""))
    budgets = summary.get("budgets") or {}
    if "bops" in budgets:
        result.add_row("BOPs per sample", f"{summary['bops']:.4g} / budget {budgets['bops']['budget']:.4g}"
                       f" ({summary['compression_bops']:.0f}x < fp32)")
    if "activation_bytes" in budgets:
        result.add_row("largest layer input", f"{summary['activation_bytes_max']:,.0f} bytes"
                       f" / budget {budgets['activation_bytes']['budget']:,.0f}")
    result.add_row("method", summary["method"]["label"])
    if "search_moved_quantizers" in summary:
        result.add_row("search moved", f"{summary['search_moved_quantizers']} quantizers "
                       f"(then repair {summary['repair_changed_quantizers']}, fill {summary['fill_changed_quantizers']})")
    result.add_row("feasible", {True: "yes", False: "NO", None: "no budget (baseline)"}[summary["feasible"]])
    result.add_row("test top-1 float", f"{summary['float_top1']:.2f} %")
    result.add_row("test top-1 quantized", f"{summary['quant_top1']:.2f} %"
                   f" ({summary['quant_top1'] - summary['float_top1']:+.2f})")
    for row in export_rows(summary.get("export")):
        result.add_row(*row)
    console.print(result)


def export_rows(figures: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The export's figures as (quantity, value) rows: sizes, verification, latency."""
    if not figures or "onnx_bytes" not in figures:
        return []
    v = figures["verify"]
    top1 = "" if v.get("onnx_top1") is None else f" (top-1 {v['onnx_top1']:.2f} / {v['torch_top1']:.2f} %)"
    rows = [
        ("model.onnx", f"{figures['onnx_bytes']:,} bytes ({figures['onnx_weight_bytes']:,} weight bytes)"),
        ("packed checkpoint", f"{figures['packed_file_bytes']:,} bytes ({figures['packed_bytes']:,} weight bytes)"),
        ("onnxruntime agreement", f"{v['agreement']:.2f} % of {v['samples']:,}{top1}"),
        ("max |logit diff|", f"{v['max_abs_logit_diff']:.3g}"),
    ]
    rows.append(("latency, onnxruntime", f"{figures['measured_latency_ms']:.3f} ms at batch {figures['measured_latency_batch']}"))
    speedup = figures.get("measured_speedup_vs_float")
    if speedup is not None:  # the float32 graph of the same network, timed the same way
        relation = f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"
        rows.append(("float32 graph, same timing", f"{figures['measured_float_latency_ms']:.3f} ms (quantized {relation})"))
    if figures.get("table_latency_ms") is not None:
        rows.append(("latency table prediction", f"{figures['table_latency_ms']:.3f} ms "
                     f"(measured / table = {figures['measured_over_table']:.2f})"))
    return rows


def print_export_table(figures: dict[str, Any]) -> None:
    """The export figures alone (``stage=export``)."""
    table = Table(title="Export", title_justify="left")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for row in export_rows(figures):
        table.add_row(*row)
    Console().print(table)
