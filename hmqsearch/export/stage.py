"""The export stage: ONNX graph + verification + packed checkpoint + measured latency.

``export_run`` is what the pipeline (and ``hmqsearch export``) calls once the assignment is
final.  Its ``cfg_export`` keys, all optional (defaults and allowed values:
:class:`~hmqsearch.export.options.ExportOptions`):

* ``form``: ``onnxruntime`` (tuned for onnxruntime's integer kernels) or ``portable``
  (DequantizeLinear on every integer weight), see :mod:`hmqsearch.export.onnx_export`;
* ``tolerance_agreement``: minimum top-1 agreement (percent) between the graph (run without
  graph optimizations) and PyTorch, ``tolerance_runtime_agreement``: the same for onnxruntime
  with its integer kernels (see :mod:`hmqsearch.export.verify`); below either, the graph is
  renamed ``model.FAILED-verification.onnx`` and a
  :class:`~hmqsearch.export.verify.VerificationError` (a UserError) is raised;
* ``verify_samples``: how many samples of ``loader`` the verification uses;
* ``latency_batch``, ``latency_warmup``, ``latency_repeats``, ``latency_threads``: the whole-graph
  latency measurement (median); ``compare_float``: also time the float32 graph of the same
  network (not kept on disk) and report the speed-up.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from hmqsearch.config_check import check_values, rules_of
from hmqsearch.cost.latency import LatencyTable, build_latency_table, exact_total_latency
from hmqsearch.cost.profiler import device_name, measure_graph_latency
from hmqsearch.errors import UserError
from hmqsearch.export.budget_check import check_budgets
from hmqsearch.export.onnx_export import export_onnx
from hmqsearch.export.options import ExportOptions
from hmqsearch.export.packed import packed_paths, save_packed
from hmqsearch.export.precision import apply_precision, read_precision
from hmqsearch.export.verify import VerificationError, fail_export, first_batch, verify_onnx
from hmqsearch.inputs import take
from hmqsearch.io import write_json
from hmqsearch.quant.prepare import QuantModel, QuantSpec

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
    check_values({"export": cfg}, rules_of(ExportOptions, "export"))
    return cfg


def export_run(
    qmodel: QuantModel,
    run_dir: Path,
    loader: Iterable[Any],
    cfg_export: Mapping[str, Any] | None,
    *,
    arch: Mapping[str, Any] | None,
    spec: QuantSpec,
    latency_table: LatencyTable | None = None,
) -> dict[str, Any]:
    """Export ``qmodel``'s argmax assignment into ``run_dir`` and return ``{"export": figures}``.

    Writes ``model.onnx`` (verified against ``qmodel`` on ``loader``) and
    ``model.packed.safetensors`` + ``model.packed.json``; measures the graph's latency.
    ``arch`` is the network's Hydra node (``cfg.model.net`` as a dict; None for a model built in
    Python, which the packed checkpoint's loader then needs), ``spec`` its QuantSpec: both go
    into the packed checkpoint.  The loader's inputs (a tensor, tuple or dict of tensors) are
    exported, verified and timed as they are, dtypes kept.  With a measured
    ``latency_table`` the graph is timed at the table's batch and threads and the table's
    prediction for the assignment is reported beside the measurement.
    """
    cfg = export_config(cfg_export)
    measured_table = latency_table is not None and latency_table.batch is not None
    if measured_table:
        cfg["latency_batch"] = latency_table.batch
        cfg["latency_threads"] = latency_table.threads if latency_table.threads is not None else cfg["latency_threads"]
    run_dir = Path(run_dir)
    qmodel.set_state("fixed")
    qmodel.eval()
    example = first_batch(loader)

    onnx_path = run_dir / ONNX_NAME
    info = export_onnx(qmodel, onnx_path, example, form=cfg["form"])
    check = verify_onnx(
        onnx_path, qmodel, loader, cfg["tolerance_agreement"], cfg["verify_samples"], cfg["tolerance_runtime_agreement"]
    )
    if not check["passed"]:
        fail_export(onnx_path, check)

    meta = save_packed(run_dir / PACKED_BASE, qmodel, spec=spec, example=example, arch=None if arch is None else dict(arch))
    timing = dict(batch=cfg["latency_batch"], warmup=cfg["latency_warmup"], repeats=cfg["latency_repeats"], threads=cfg["latency_threads"])
    latency = measure_graph_latency(onnx_path, example=example, **timing)
    figures: dict[str, Any] = {
        "onnx_path": ONNX_NAME,
        "onnx_form": info.form,
        "onnx_bytes": info.onnx_bytes,
        "onnx_weight_bytes": info.weight_bytes,  # integer weight initializers, = weight_bytes_container
        "onnx_overhead_bytes": info.overhead_bytes,  # their float32 scales + biases
        "integer_kernel_layers": info.integer_kernel_layers,
        "packed_path": packed_paths(run_dir / PACKED_BASE)[0].name,
        "packed_bytes": meta["packed_bytes"],  # weight tensors, = summary's weight_bytes_packed
        "packed_overhead_bytes": meta["overhead_bytes"],  # int8 scale exponents + biases
        "packed_file_bytes": meta["file_bytes"],
        "verify": {k: v for k, v in check.items() if k != "passed"},
        "measured_latency_ms": latency,
        "measured_latency_batch": cfg["latency_batch"],
        "measured_latency_threads": cfg["latency_threads"],
        "measured_latency_device": device_name(),
    }
    if cfg["compare_float"]:
        with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
            float_path = export_onnx(qmodel, Path(tmp) / "float.onnx", example, as_float=True).path
            figures["measured_float_latency_ms"] = measure_graph_latency(float_path, example=example, **timing)
        figures["measured_speedup_vs_float"] = figures["measured_float_latency_ms"] / latency
    if measured_table:
        predicted = exact_total_latency(qmodel, latency_table)
        figures["table_latency_ms"] = predicted
        figures["measured_over_table"] = latency / predicted
    log.info(
        "export: %s (%d bytes, %d of them weights), packed %d bytes, %.3f ms at batch %d",
        onnx_path, info.onnx_bytes, info.weight_bytes, meta["packed_bytes"], latency, cfg["latency_batch"],
    )
    return {"export": figures}


def export_into_summary(summary: dict[str, Any], run_dir: Path, export: Callable[[], dict[str, Any]]) -> None:
    """Run ``export`` (an :func:`export_run` call), add its figures to ``summary`` and rewrite
    ``run_dir/summary.json`` once: marked finished, with ``timings.export_s`` where the summary
    keeps timings.  A failed verification is recorded too (``summary["export"]["passed"] =
    False``, the run left unfinished) before the :class:`VerificationError` propagates.
    """
    started = time.time()
    try:
        summary.update(export())
        summary["export"]["passed"] = True
        summary["finished"] = True
    except VerificationError as exc:
        summary["export"] = {"passed": False, "verify": exc.result, "error": str(exc)}
        raise
    finally:
        if "timings" in summary:
            summary["timings"]["export_s"] = time.time() - started
        write_json(Path(run_dir) / "summary.json", summary)


# --------------------------------------------------------- a finished run's artifacts
def run_config(run_dir: Path) -> tuple[dict[str, Any], Any]:
    """A run's precision.yaml and the resolved config recorded in it (a DictConfig)."""
    return read_run_config(Path(run_dir) / "precision.yaml")


def read_run_config(precision_path: Path) -> tuple[dict[str, Any], Any]:
    """A precision.yaml and the resolved config recorded in it (a DictConfig)."""
    from omegaconf import OmegaConf

    precision = read_precision(precision_path)
    if not isinstance(precision.get("config"), dict):
        raise UserError(f"{precision_path} has no 'config' section; it was not written by a hmqsearch run")
    return precision, OmegaConf.create(precision["config"])


def eval_loader(cfg: Any) -> Any:
    """The test-set loader of the data module a run's config names."""
    from hydra.utils import instantiate

    try:
        datamodule = instantiate(cfg.data)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a config that no longer builds
        raise UserError(f"cannot build the run's data module {cfg.data.get('_target_')}: {exc}") from exc
    datamodule.setup("fit")
    return datamodule.test_dataloader()


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    """A quantized model's state dict: ``quantized_state.pt``, or a Lightning checkpoint of a
    quantized stage (``checkpoints/finetune/last.ckpt``: its ``model.`` prefix is dropped)."""
    if not path.is_file():
        raise UserError(f"quantized state {path} does not exist; is this the run directory of a finished run?")
    try:
        state = torch.load(path, map_location="cpu", weights_only=path.suffix != ".ckpt")
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise UserError(f"quantized state {path} cannot be read (corrupt or truncated?): {str(exc).splitlines()[0]}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    if not isinstance(state, dict) or not state:
        raise UserError(f"quantized state {path} holds no state_dict of a quantized model")
    return state


@dataclass
class LoadedRun:
    """What the export stage needs, rebuilt from a finished run's directory."""

    qmodel: QuantModel
    loader: Any  # the run's test loader
    arch: dict[str, Any]  # cfg.model.net as a plain dict
    spec: QuantSpec
    cfg: Any  # the run's resolved config (DictConfig)


def load_run(run_dir: Path) -> LoadedRun:
    """A finished run's directory: ``precision.yaml`` + ``quantized_state.pt``."""
    run_dir = Path(run_dir)
    return load_artifacts(run_dir / "precision.yaml", run_dir / "quantized_state.pt")


def load_artifacts(precision_path: Path, checkpoint: Path) -> LoadedRun:
    """Rebuild the fixed-state model from a ``precision.yaml`` and a quantized model's checkpoint.

    The assignment in precision.yaml wins over the one in the checkpoint, so an edited
    precision.yaml exports as edited.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from hmqsearch.pipeline import quant_spec
    from hmqsearch.quant.prepare import prepare

    precision_path, checkpoint = Path(precision_path), Path(checkpoint)
    precision, cfg = read_run_config(precision_path)
    spec = quant_spec(cfg)
    net = instantiate(cfg.model.net)
    loader = eval_loader(cfg)
    qmodel = prepare(net, spec, take(first_batch(loader), 8))
    try:
        qmodel.load_state_dict(_load_state(checkpoint))
    except RuntimeError as exc:
        raise UserError(f"{checkpoint} does not fit the model of {precision_path}: {str(exc).splitlines()[0]}") from exc
    apply_precision(qmodel, precision, source=str(precision_path))
    qmodel.set_state("fixed")
    return LoadedRun(qmodel.eval(), loader, OmegaConf.to_container(cfg.model.net, resolve=True), spec, cfg)


def run_export_stage(cfg: Any, out_dir: Path) -> dict[str, Any]:
    """``python train.py stage=export``: export a finished run (``export.run_dir``, written into it)
    or a checkpoint + precision.yaml (``export.checkpoint``, ``export.precision``, written into
    ``out_dir``); returns the summary with the export figures."""
    from omegaconf import OmegaConf

    e = cfg.export
    if e.get("run_dir"):
        target = Path(e.run_dir)
        run = load_run(target)
        source = target / "precision.yaml"
    elif e.get("checkpoint") and e.get("precision"):
        target = Path(out_dir)
        run = load_artifacts(Path(e.precision), Path(e.checkpoint))
        source = Path(e.precision)
    else:
        raise UserError(
            "stage=export needs export.run_dir=<a finished run directory>, "
            "or export.checkpoint=<quantized_state.pt or .ckpt> and export.precision=<precision.yaml>"
        )
    check_budgets(run.qmodel, run.cfg, str(source), bool(e.get("allow_over_budget", False)))
    summary: dict[str, Any] = {}
    if (target / "summary.json").is_file():
        try:
            summary = json.loads((target / "summary.json").read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{target / 'summary.json'} is not valid JSON ({exc}); remove it to export anyway") from exc
    cost = run.cfg.get("cost", {})
    table = None
    if cost.get("latency") == "measured":
        table = build_latency_table(run.qmodel, "measured", None, cost.get("latency_table"))
    export_into_summary(summary, target, functools.partial(
        export_run, run.qmodel, target, run.loader, OmegaConf.to_container(e, resolve=True),
        arch=run.arch, spec=run.spec, latency_table=table,
    ))
    return summary
