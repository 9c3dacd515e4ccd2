"""A quantized model's deployment artifacts: ONNX graph + verification + packed checkpoint +
measured latency.

:func:`export_quantized` takes the model at its final assignment, example inputs and a loader
to verify on, and writes into a given folder; it knows no config, data module or run
directory (the run's export stage, :mod:`hmqsearch.run.export_stage`, ``hmqsearch export`` and
the Python API call it).  Its ``options``, all optional: their defaults and allowed values are
:class:`~hmqsearch.export.options.ExportOptions`.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

from hmqsearch.cost.latency import LatencyTable, exact_total_latency
from hmqsearch.errors import UserError
from hmqsearch.export.onnx_export import ExportInfo, export_onnx
from hmqsearch.export.options import ExportOptions
from hmqsearch.export.packed import packed_paths, save_packed
from hmqsearch.export.profiler import device_name, measure_graph_latency
from hmqsearch.export.verify import fail_export, verify_onnx
from hmqsearch.inputs import Inputs
from hmqsearch.quant.prepare import QuantModel, QuantSpec
from hmqsearch.settings import check_mapping, rules_of

log = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
PACKED_BASE = "model.packed"

DEFAULTS: dict[str, Any] = dataclasses.asdict(ExportOptions())

# keys of the ``export`` config node that say what to export, not how (hmqsearch/config_schema.py)
STAGE_KEYS = ("enabled", "run_dir", "checkpoint", "precision", "allow_over_budget")


def export_config(cfg_export: Mapping[str, Any] | None) -> dict[str, Any]:
    """``cfg_export`` over :data:`DEFAULTS`, checked against :class:`ExportOptions`' rules."""
    given = {k: v for k, v in dict(cfg_export or {}).items() if k not in STAGE_KEYS}
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise UserError(f"unknown export options {unknown}; allowed: {', '.join(DEFAULTS)}")
    cfg = {**DEFAULTS, **given}
    check_mapping({"export": cfg}, rules_of(ExportOptions, "export"))
    return cfg


def export_quantized(
    qmodel: QuantModel,
    out_dir: Path,
    example: Inputs,
    loader: Iterable[Any],
    options: Mapping[str, Any] | None,
    *,
    arch: Mapping[str, Any] | None,
    spec: QuantSpec,
    latency_table: LatencyTable | None = None,
) -> dict[str, Any]:
    """Export ``qmodel``'s argmax assignment into ``out_dir`` and return ``{"export": figures}``.

    Writes ``model.onnx`` (traced on ``example``, verified against ``qmodel`` on ``loader``) and
    ``model.packed.safetensors`` + ``model.packed.json``; measures the graph's latency on
    ``example``.  ``arch`` is the network's constructor (``{"_target_": ..., **kwargs}``; None
    for a model built in Python, which the packed checkpoint's loader then needs), ``spec`` its
    QuantSpec: both go into the packed checkpoint.  Inputs (a tensor, tuple or dict of tensors)
    are exported, verified and timed as they are, dtypes kept.  With a measured
    ``latency_table`` the graph is timed at the table's batch and threads and the table's
    prediction for the assignment is reported beside the measurement.
    """
    cfg = export_config(options)
    if latency_table is not None and latency_table.batch is not None:
        cfg["latency_batch"] = latency_table.batch
        cfg["latency_threads"] = latency_table.threads if latency_table.threads is not None else cfg["latency_threads"]
    out_dir = Path(out_dir)
    qmodel.set_state("fixed")
    qmodel.eval()
    onnx_path = out_dir / ONNX_NAME
    info = export_onnx(qmodel, onnx_path, example, form=cfg["form"])
    check = verify_onnx(
        onnx_path, qmodel, loader, cfg["tolerance_agreement"], cfg["verify_samples"], cfg["tolerance_runtime_agreement"]
    )
    if not check["passed"]:
        fail_export(onnx_path, check)
    meta = save_packed(out_dir / PACKED_BASE, qmodel, spec=spec, example=example, arch=None if arch is None else dict(arch))
    figures = _artifact_figures(info, meta, check, out_dir)
    figures.update(_latency_figures(qmodel, onnx_path, example, cfg, latency_table))
    log.info(
        "export: %s (%d bytes, %d of them weights), packed %d bytes, %.3f ms at batch %d",
        onnx_path, info.onnx_bytes, info.weight_bytes, meta["packed_bytes"], figures["measured_latency_ms"],
        cfg["latency_batch"],
    )
    return {"export": figures}


def _artifact_figures(info: ExportInfo, meta: dict[str, Any], check: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    return {
        "onnx_path": ONNX_NAME,
        "onnx_form": info.form,
        "onnx_bytes": info.onnx_bytes,
        "onnx_weight_bytes": info.weight_bytes,  # integer weight initializers, = weight_bytes_container
        "onnx_overhead_bytes": info.overhead_bytes,  # their float32 scales + biases
        "integer_kernel_layers": info.integer_kernel_layers,
        "packed_path": packed_paths(out_dir / PACKED_BASE)[0].name,
        "packed_bytes": meta["packed_bytes"],  # weight tensors, = summary's weight_bytes_packed
        "packed_overhead_bytes": meta["overhead_bytes"],  # int8 scale exponents + biases
        "packed_file_bytes": meta["file_bytes"],
        "verify": {k: v for k, v in check.items() if k != "passed"},
    }


def _latency_figures(
    qmodel: QuantModel, onnx_path: Path, example: Inputs, cfg: dict[str, Any], table: LatencyTable | None
) -> dict[str, Any]:
    """The graph's measured latency; beside it the float32 graph's (``compare_float``) and a
    measured table's prediction."""
    timing = dict(batch=cfg["latency_batch"], warmup=cfg["latency_warmup"], repeats=cfg["latency_repeats"], threads=cfg["latency_threads"])
    latency = measure_graph_latency(onnx_path, example=example, **timing)
    figures: dict[str, Any] = {
        "measured_latency_ms": latency,
        "measured_latency_batch": cfg["latency_batch"],
        "measured_latency_threads": cfg["latency_threads"],
        "measured_latency_device": device_name(),
    }
    if cfg["compare_float"]:
        with tempfile.TemporaryDirectory(dir=onnx_path.parent) as tmp:
            float_path = export_onnx(qmodel, Path(tmp) / "float.onnx", example, as_float=True).path
            figures["measured_float_latency_ms"] = measure_graph_latency(float_path, example=example, **timing)
        figures["measured_speedup_vs_float"] = figures["measured_float_latency_ms"] / latency
    if table is not None and table.batch is not None:
        predicted = exact_total_latency(qmodel, table)
        figures["table_latency_ms"] = predicted
        figures["measured_over_table"] = latency / predicted
    return figures
