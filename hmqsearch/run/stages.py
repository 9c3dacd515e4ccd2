"""The run, stage by stage, over one :class:`~hmqsearch.run.state.RunState`:

validate -> build -> pretrain -> evaluate_float -> calibrate -> assign (the method's own
assignment, or for a method that searches start_search -> search -> repair_assignment ->
fill_assignment -> reestimate_batch_norms, or restart_weights) -> finetune -> account ->
summary -> write_artifacts -> export -> the final table.

The method (:mod:`hmqsearch.methods`) declares what the stages do around it: whether it
searches under the budgets, calibrates on training images, trains after the assignment.

Everything a user can get wrong in the configuration is checked before the first training
step (validate, build), including whether the budgets can be met at all.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from hmqsearch.constrained.budgets import build_constraints
from hmqsearch.constrained.constraints import check_enforce
from hmqsearch.constrained.repair import fill, repair
from hmqsearch.constrained.warm_start import check_start, warm_start
from hmqsearch.cost import compute, model_size, size
from hmqsearch.cost import latency as lat
from hmqsearch.errors import UserError
from hmqsearch.export.deploy import export_config, export_quantized
from hmqsearch.export.precision import write_precision
from hmqsearch.export.verify import first_batch
from hmqsearch.inputs import Inputs, named_tensors, run_model, take
from hmqsearch.io import atomic_write, write_json
from hmqsearch.lit.capture import check_capture
from hmqsearch.lit.ddp import is_rank_zero, rank_disagreement
from hmqsearch.lit.device import on_device, stage_device
from hmqsearch.lit.evaluate import evaluate
from hmqsearch.lit.trainer import run_loggers
from hmqsearch.lr_scaling import scale_learning_rates
from hmqsearch.methods import Prepared
from hmqsearch.methods.assigned import assign_widths, widths_of
from hmqsearch.models.fit import describe_misfit
from hmqsearch.models.pretrained import load_pretrained
from hmqsearch.quant.assignment import Assignment
from hmqsearch.quant.batch_norm import reestimate_batch_norm
from hmqsearch.quant.calibrate import calibrate_activations
from hmqsearch.quant.prepare import QuantModel, prepare
from hmqsearch.report.allocation import write_allocation_report
from hmqsearch.report.search_trace import write_search_trace
from hmqsearch.report.sensitivity import write_sensitivity_report
from hmqsearch.report.table import print_final_table
from hmqsearch.resume import Resume
from hmqsearch.run.config import (
    budget_spec, distill_spec, instantiate_node, latency_table, proximity_spec, quant_spec, ramp_spec,
    run_method,
)
from hmqsearch.run.load import PRECISION, QUANTIZED_STATE, SUMMARY
from hmqsearch.run.state import RunState
from hmqsearch.run.summary import record_export, summarize
from hmqsearch.run.training import train_finetune, train_float, train_search

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run every stage and write ``precision.yaml`` and ``summary.json`` into ``run_dir``;
    returns the summary."""
    state = validate(cfg, run_dir)
    build(state)
    exit_code = 1
    try:
        pretrain(state)
        evaluate_float(state)
        calibrate(state)
        with state.timed("search_s"):
            assign(state)
        state.search_top1 = evaluate(state.qmodel, state.test_loader, state.num_classes, state.device)
        finetune(state)
        account(state)
        summary = summarize(state).to_json()
        if is_rank_zero():  # DDP: rank 0 alone writes the artifacts
            write_artifacts(state, summary)
            export(state, summary)
            state.loggers.log_summary(summary)
            state.loggers.finish(0)  # before the table, which is the last thing a run prints
            print_final_table(state.qmodel, summary, state.costs["per_layer_weight_bytes_packed"])
        exit_code = 0
        return summary
    finally:
        state.loggers.finish(exit_code)


def validate(cfg: DictConfig, run_dir: Path) -> RunState:
    """Check every part of the config that needs no data or model, then seed."""
    cfg = scale_learning_rates(cfg)
    method = run_method(cfg)
    spec, budgets = quant_spec(cfg, method), budget_spec(cfg)
    proximity_spec(cfg)
    ramp_spec(cfg)
    check_enforce(cfg.search.enforce)
    distill = distill_spec(cfg)
    check_start(cfg.search.start)
    export_config(OmegaConf.to_container(cfg.export, resolve=True))  # export options checked before training
    device = stage_device(cfg.trainer)
    check_capture(cfg.step_capture, device)
    pl.seed_everything(cfg.seed, workers=True)
    return RunState(cfg, Path(run_dir), method, spec, budgets, distill, device)


def build(state: RunState) -> None:
    """The data module, the network and the calibration batches, checked against each other and
    by the method; the budgets checked on the network's structure alone; the pretrained weights;
    the loggers."""
    cfg = state.cfg
    state.datamodule = instantiate_node(cfg.data)
    state.datamodule.setup("fit")
    state.num_classes = state.datamodule.num_classes
    state.net = instantiate_node(cfg.model.net)
    state.model_title = str(cfg.model.net._target_).rsplit(".", 1)[-1]
    state.calib, state.example = _calibration_batches(state)
    _check_data_fits_model(state.net, state.example, state.num_classes, cfg)
    state.method.check(state.net, *_input_normalisation(state.datamodule))
    if state.method.searches:  # can the budgets be met at all? known before any training
        probe = prepare(state.net, state.spec, state.example)
        build_constraints(probe, state.budgets, latency_table(probe, cfg))
    state.pretrained = load_pretrained(state.net, cfg.model.pretrained) if cfg.model.pretrained else None
    state.loggers = run_loggers(cfg.logger, state.run_dir, OmegaConf.to_container(cfg, resolve=True))
    state.resume = Resume.from_cfg(cfg, state.run_dir)


def _calibration_batches(state: RunState) -> tuple[list[Inputs], Inputs]:
    """The calibration batches and the 8 inputs prepare traces: the first batch's first 8, or
    for a data-free method no batch and 8 zero images of the data's input shape."""
    if state.method.calibrates:
        calib = state.datamodule.calibration_batches(state.cfg.search.calibration.batches)
        return calib, take(calib[0], 8)
    shape = getattr(state.datamodule, "input_shape", None)
    if shape is None:
        raise UserError(f"method={state.method.name} is data-free and needs the data's input_shape, "
                        f"which {state.cfg.data._target_} does not declare")
    return [], torch.zeros(8, *shape)


def _check_data_fits_model(net: nn.Module, example: Inputs, num_classes: int, cfg: DictConfig) -> None:
    try:
        with torch.no_grad():
            out = run_model(net.eval(), example)
    except RuntimeError as exc:
        shapes = tuple(example.shape[1:]) if isinstance(example, Tensor) else ", ".join(
            f"{name} {tuple(t.shape[1:])}" for name, t in named_tensors(example)
        )
        raise UserError(
            f"data {cfg.data._target_} (input shape {shapes}) does not fit model {cfg.model.net._target_}: "
            + (describe_misfit(net, example) if isinstance(example, Tensor) else str(exc).splitlines()[0])
        ) from exc
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise UserError(
            f"model {cfg.model.net._target_} outputs shape {tuple(out.shape[1:])} but the data has "
            f"{num_classes} classes; set model.net.num_classes={num_classes}"
        )


def pretrain(state: RunState) -> None:
    """Float training, unless the model came with pretrained weights."""
    if state.pretrained is None:
        with state.timed("pretrain_s"):
            train_float(state)


def evaluate_float(state: RunState) -> None:
    state.test_loader = state.datamodule.test_dataloader()
    log.info("evaluation, calibration and batch-norm passes on %s", state.device)
    state.float_top1 = evaluate(state.net, state.test_loader, state.num_classes, state.device)
    log.info("float test top-1: %.2f %%", state.float_top1)
    if state.distill.enabled:
        state.teacher = state.net  # prepare() works on a copy: net stays the float model


def calibrate(state: RunState) -> None:
    """Prepare the quantized model, calibrate its input ranges, build the budgets' constraints."""
    with state.timed("calibrate_s"):
        _prepare_calibrated(state)
        state.latency_table = latency_table(state.qmodel, state.cfg)
        if state.method.searches:
            state.constraints = build_constraints(state.qmodel, state.budgets, state.latency_table)


def _prepare_calibrated(state: RunState) -> None:
    """A trainable quantized copy of the float model as ``state.qmodel``, its input ranges calibrated."""
    calibration = state.cfg.search.calibration
    state.qmodel = prepare(state.net, state.spec, state.example)
    state.qmodel.requires_grad_(True)  # the copy trains, also once the float model is the frozen distillation teacher
    state.ranges = {}
    if state.method.calibrates:
        with on_device(state.qmodel, state.device):
            state.ranges = calibrate_activations(state.qmodel, state.calib, calibration.method, calibration.percentile)


def assign(state: RunState) -> None:
    """The final assignment: the method's own, or for a method that searches the search from
    its warm start, repaired and filled against the exact budgets."""
    if not state.method.searches:
        state.method.assign(Prepared(
            state.qmodel, state.net, state.calib, state.constraints, *_input_normalisation(state.datamodule)
        ))
        state.qmodel.set_state("fixed")
        return
    start_search(state)
    search(state)
    repair_assignment(state)
    fill_assignment(state)
    if is_rank_zero():
        trace = state.search.module.trace
        write_search_trace(trace.start, trace.history, trace.argmax_bits(), state.run_dir, state.model_title)
    if state.cfg.search.restart_weights:
        restart_weights(state)
    else:
        reestimate_batch_norms(state)


def _input_normalisation(datamodule: Any) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """The data's per-channel input normalisation (mean, std), where the data module declares
    it (one number stands for every channel)."""
    mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
    if mean is None or std is None:
        return None, None
    return _per_channel(mean), _per_channel(std)


def _per_channel(value: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),)


def start_search(state: RunState) -> None:
    """Put the search's initial mass on its start widths (``search.start``)."""
    cfg = state.cfg
    with on_device(state.qmodel, state.device):
        start = warm_start(
            state.qmodel, state.constraints, cfg.search.start, state.calib, cfg.callbacks.progress_bar
        )
    state.search.start_bits, state.search.start_sensitivity = start.bits, start.sensitivity
    if start.sensitivity is not None and is_rank_zero():
        write_allocation_report(start.sensitivity, start.bits, state.run_dir, state.model_title)


def search(state: RunState) -> None:
    """The constrained search; records its duals and where its own argmax ended, with that
    argmax's exact costs, before repair and fill."""
    outcome = state.search
    module = outcome.module = train_search(state)
    outcome.duals = module.duals.as_dict()
    outcome.rank_disagreement = rank_disagreement({
        "logits": torch.cat([p.reshape(-1) for p in state.qmodel.logit_parameters()]),
        "duals": module.duals.values, "tau": torch.tensor([module.tau]),
    })
    if module.proximity is not None:
        outcome.proximity_duals = module.proximity.duals.as_dict()
        module.proximity.remove()
        write_sensitivity_report(outcome.proximity_duals, state.run_dir, state.model_title)
    outcome.moved = module.trace.moved(module.trace.argmax_bits())
    log.info("the search moved %d of %d searched quantizers from the start", len(outcome.moved), len(module.trace.quantizers))
    outcome.end_costs = {c.name: {"exact": c.exact(), "budget": c.budget} for c in state.constraints}


def repair_assignment(state: RunState) -> None:
    """Lower bit-widths until the argmax meets every budget exactly (``search.repair_by``)."""
    by_duals = state.cfg.search.repair_by == "duals"
    state.search.repair = repair(state.qmodel, state.constraints, state.search.proximity_duals if by_duals else None)


def fill_assignment(state: RunState) -> None:
    """Raise bit-widths into the budgets' slack (``search.fill_budget``)."""
    if state.cfg.search.fill_budget:
        state.search.fill = fill(state.qmodel, state.constraints)


def reestimate_batch_norms(state: RunState) -> None:
    """Batch-norm statistics of the assigned model (``search.bn_batches`` training batches)."""
    with on_device(state.qmodel, state.device):
        state.search.bn_batches = reestimate_batch_norm(
            state.qmodel, state.datamodule.train_dataloader(), state.cfg.search.bn_batches
        )


def restart_weights(state: RunState) -> None:
    """The searched bit-widths on a new copy of the weights the search started from
    (``search.restart_weights``), each threshold re-chosen on the calibration as for
    ``method=assigned``: the fine-tune then trains every epoch at the final assignment instead of
    continuing from weights trained under the relaxed, moving one."""
    widths = widths_of(Assignment.of(state.qmodel))
    _prepare_calibrated(state)
    state.constraints = build_constraints(state.qmodel, state.budgets, state.latency_table)
    assign_widths(state.qmodel, widths, "the search's assignment")
    state.qmodel.set_state("fixed")
    log.info("fine-tuning the searched bit-widths from the search's starting weights (search.restart_weights)")


def finetune(state: RunState) -> None:
    """Quantization-aware training at the assignment (not for PTQ) and the final test accuracy."""
    if not state.method.trains:
        state.quant_top1 = state.search_top1
        return
    with state.timed("finetune_s"):
        train_finetune(state)
    state.quant_top1 = evaluate(state.qmodel, state.test_loader, state.num_classes, state.device)


def account(state: RunState) -> None:
    """The exact costs of the final assignment, and of each budget."""
    state.costs = exact_costs(state.qmodel, state.latency_table)
    state.budget_report = {c.name: {"budget": c.budget, "exact": c.exact(), "unit": c.unit} for c in state.constraints}


def exact_costs(qmodel: QuantModel, table: lat.LatencyTable | None) -> dict[str, Any]:
    """Bytes, compressions, latency, BOPs and activation size of ``qmodel``'s argmax assignment."""
    packed = size.exact_weight_bytes(qmodel, "packed")
    float_bytes = size.float_weight_bytes(qmodel)
    return {
        "weight_bytes_packed": sum(packed.values()),
        "weight_bytes_container": sum(size.exact_weight_bytes(qmodel, "container").values()),
        "float_weight_bytes": float_bytes,
        "overhead_bytes_packed": size.overhead_bytes(qmodel, "packed"),
        "compression_packed": float_bytes / sum(packed.values()),
        "model_float_bytes": qmodel.model_float_bytes,
        "model_bytes_packed": model_size.model_bytes(qmodel, "packed"),
        "compression_model": model_size.model_compression(qmodel, "packed"),
        "latency_model": table.source if table else None,
        "expected_latency": float(lat.expected_latency(qmodel, table)) if table else None,
        "exact_latency": lat.exact_total_latency(qmodel, table) if table else None,
        "bops": compute.exact_bops(qmodel),
        "compression_bops": compute.float_bops(qmodel) / compute.exact_bops(qmodel),
        "activation_bytes_max": compute.exact_activation_bytes(qmodel),
        "per_layer_weight_bytes_packed": packed,
    }


def write_artifacts(state: RunState, summary: dict[str, Any]) -> None:
    """precision.yaml, quantized_state.pt and summary.json (unfinished while an export is to come)."""
    cfg, qmodel = state.cfg, state.qmodel
    write_precision(
        state.run_dir / PRECISION, Assignment.of(qmodel),
        budgets=state.budget_report,
        costs={k: v for k, v in state.costs.items() if k != "per_layer_weight_bytes_packed"},
        accuracy={"float_top1": state.float_top1, "quant_top1": state.quant_top1},
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    atomic_write(state.run_dir / QUANTIZED_STATE, lambda p: torch.save(qmodel.state_dict(), p))
    summary["finished"] = not cfg.export.enabled  # a run killed while exporting is resumed
    write_json(state.run_dir / SUMMARY, summary)


def export(state: RunState, summary: dict[str, Any]) -> None:
    """The ONNX graph and the packed checkpoint, verified on the test set and timed, into the
    run directory and the summary (``export.enabled``)."""
    cfg = state.cfg
    if not cfg.export.enabled:
        return
    record_export(summary, state.run_dir, functools.partial(
        export_quantized, state.qmodel, state.run_dir, first_batch(state.test_loader), state.test_loader,
        OmegaConf.to_container(cfg.export, resolve=True), arch=OmegaConf.to_container(cfg.model.net, resolve=True),
        spec=state.spec, latency_table=state.latency_table,
    ))
