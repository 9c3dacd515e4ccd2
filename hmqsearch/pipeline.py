"""The run: pretrain -> calibrate -> search -> repair -> finetune -> artifacts.

Everything a user can get wrong in the configuration is checked before the first training
step, including whether the budgets can be met at all.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from hmqsearch.baselines import Method, assign_fixed, baseline_spec, parse_method
from hmqsearch.constrained.budgets import BudgetSpec, build_constraints
from hmqsearch.constrained.constraints import Constraint, check_enforce, enforce_on
from hmqsearch.constrained.proximity import ProximityConstraints, ProximitySpec
from hmqsearch.constrained.ramp import RampSpec
from hmqsearch.constrained.repair import fill, repair
from hmqsearch.constrained.warm_start import check_start, warm_start
from hmqsearch.cost import compute
from hmqsearch.cost import latency as lat
from hmqsearch.cost import model_size, size
from hmqsearch.errors import UserError
from hmqsearch.export.precision import write_precision
from hmqsearch.export.stage import export_config, export_into_summary, export_run
from hmqsearch.inputs import Inputs, named_tensors, run_model, take, to_device
from hmqsearch.io import atomic_write, write_json
from hmqsearch.lit.capture import capture_forward, check_capture
from hmqsearch.lit.checkpointing import LAST
from hmqsearch.lit.classifier import ClassifierModule
from hmqsearch.lit.distill import DistillSpec, Distiller
from hmqsearch.lit.ddp import is_rank_zero, rank_disagreement, world_size
from hmqsearch.lit.device import on_device, stage_device
from hmqsearch.lit.search import SearchModule
from hmqsearch.lit.trainer import RunLoggers, make_trainer, run_loggers
from hmqsearch.lr_scaling import scale_learning_rates
from hmqsearch.models.fit import describe_misfit
from hmqsearch.models.pretrained import load_pretrained
from hmqsearch.quant.batch_norm import reestimate_batch_norm
from hmqsearch.quant.calibrate import calibrate_activations
from hmqsearch.quant.prepare import Pin, QuantModel, QuantSpec, prepare
from hmqsearch.report.allocation import write_allocation_report
from hmqsearch.report.search_trace import write_search_trace
from hmqsearch.report.sensitivity import write_sensitivity_report
from hmqsearch.report.table import print_final_table
from hmqsearch.resume import STAGES, Resume, load_checkpoint

log = logging.getLogger(__name__)


@dataclass
class Context:
    cfg: DictConfig
    run_dir: Path
    loggers: RunLoggers
    datamodule: pl.LightningDataModule
    num_classes: int
    resume: Resume
    distill: DistillSpec
    teacher: nn.Module | None = None  # the float model, set once it is trained or loaded

    def distiller(self, stage: str) -> Distiller | None:
        if self.teacher is None or not self.distill.applies_to(stage):
            return None
        return Distiller(self.teacher, self.distill.alpha, self.distill.temperature)


def run_method(cfg: DictConfig) -> Method:
    """The search or a baseline (``method=``); configs written before baselines existed mean the search."""
    method = cfg.get("method")
    return parse_method(method.name, method.get("precision")) if method else Method("hmq")


def quant_spec(cfg: DictConfig) -> QuantSpec:
    """The quantization spec of the run, narrowed to a baseline's single precision."""
    s = cfg.search
    pins = [Pin(**p) for p in (OmegaConf.to_container(s.pins, resolve=True) if s.get("pins") else [])]
    spec = QuantSpec(
        weight_bits=list(s.weight_bits), act_bits=list(s.act_bits), n_thresholds=s.n_thresholds,
        weight_per_channel=s.weight_per_channel, mode=s.mode, first_layer_act_bits=s.first_layer_act_bits,
        pins=pins, fold_bn=s.fold_bn, init_mass=s.get("init_mass", QuantSpec.init_mass),
        embedding_bits=list(s.embedding_bits) if s.get("embedding_bits") is not None else None,
    )
    spec.validate()
    return baseline_spec(spec, run_method(cfg))


def budget_spec(cfg: DictConfig) -> BudgetSpec:
    spec = BudgetSpec(**OmegaConf.to_container(cfg.budget, resolve=True))
    spec.validate()
    return spec


def proximity_spec(cfg: DictConfig) -> ProximitySpec:
    spec = ProximitySpec(**OmegaConf.to_container(cfg.search.get("proximity") or {}, resolve=True))
    spec.validate()
    repair_by = cfg.search.get("repair_by", "margin")
    if repair_by not in ("margin", "duals"):
        raise UserError(f"search.repair_by={repair_by!r}; allowed: margin, duals")
    if repair_by == "duals" and not spec.enabled:
        raise UserError("search.repair_by=duals needs the proximity duals: set search.proximity.enabled=true")
    return spec


def ramp_spec(cfg: DictConfig) -> RampSpec:
    spec = RampSpec(**OmegaConf.to_container(cfg.search.get("ramp") or {"steps": 0}, resolve=True))
    spec.validate()
    return spec


def distill_spec(cfg: DictConfig) -> DistillSpec:
    raw = OmegaConf.to_container(cfg.get("distill") or {}, resolve=True)
    unknown = sorted(set(raw) - {"enabled", "alpha", "temperature", "stages"})
    if unknown:
        raise UserError(f"distill.{unknown[0]} is not an option; allowed: enabled, alpha, temperature, stages")
    spec = DistillSpec(**{**raw, "stages": tuple(raw.get("stages", DistillSpec.stages))})
    spec.validate()
    return spec


def _check_counts(cfg: DictConfig) -> None:
    for key in ("pretrain.epochs", "search.epochs", "finetune.epochs", "search.bn_batches"):
        value = OmegaConf.select(cfg, key, default=0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f"{key}={value!r}; allowed: an integer >= 0")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, num_classes: int, device: torch.device | None = None) -> float:
    """Top-1 accuracy in percent, computed on ``device`` (default: the CPU); the model is left
    in eval mode where it was."""
    device = device or torch.device("cpu")
    acc = MulticlassAccuracy(num_classes=num_classes, average="micro").to(device)
    with on_device(model, device):
        model.eval()
        for x, y in loader:
            acc.update(run_model(model, to_device(x, device)), y.to(device))
    return 100.0 * float(acc.compute())


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


def _instantiate(node: DictConfig) -> Any:
    """Hydra's instantiate, letting a constructor's UserError through as itself (Hydra wraps it)."""
    try:
        return instantiate(node)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, UserError):
            raise exc.__cause__ from None
        raise


def _optimizer(cfg: DictConfig, stage: str) -> Any:
    return instantiate(cfg[stage].optimizer)


def _fit(ctx: Context, module: pl.LightningModule, stage: str, monitor: str | None) -> None:
    cfg = ctx.cfg
    pl.seed_everything(cfg.seed + STAGES.index(stage), workers=True)  # a stage's noise does not depend on skipped stages
    plan = ctx.resume.plan(stage)
    if plan.action == "done":
        if plan.checkpoint is not None:
            module.load_state_dict(load_checkpoint(plan.checkpoint, module, stage)["state_dict"])
        log.info("%s: finished before the resume; loaded %s", stage, plan.checkpoint)
        return
    if plan.checkpoint is not None:
        load_checkpoint(plan.checkpoint, module, stage)
        log.info("%s: continuing from %s", stage, plan.checkpoint)
    trainer = make_trainer(
        cfg.trainer, cfg.callbacks, stage, ctx.run_dir, ctx.loggers.for_stage(stage), cfg[stage].epochs, monitor,
    )
    module.train()  # prepared models come back in eval mode; Lightning keeps the mode it finds
    capture_forward(module, cfg.get("step_capture", "none"))
    # Our own checkpoints hold the numpy RNG state, which torch's weights-only loader refuses.
    trainer.fit(module, datamodule=ctx.datamodule, ckpt_path=plan.checkpoint, weights_only=False)
    best = trainer.checkpoint_callback.best_model_path if monitor else ""
    if best:
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
        log.info("%s: restored best checkpoint %s", stage, best)
    if trainer.is_global_zero:
        final = Path(best) if best else ctx.resume.stage_dir(stage) / LAST
        ctx.resume.mark_done(stage, final.name if final.is_file() else None)


def pretrain(ctx: Context, net: nn.Module) -> None:
    cfg = ctx.cfg.pretrain
    module = ClassifierModule(net, ctx.num_classes, _optimizer(ctx.cfg, "pretrain"), cfg.lr)
    _fit(ctx, module, "pretrain", "val/acc")


def search(ctx: Context, qmodel: QuantModel, constraints: list[Constraint]) -> SearchModule:
    cfg = ctx.cfg.search
    qmodel.set_state("search")
    enforce_on(constraints, qmodel, cfg.get("enforce", "expected"))
    prox = proximity_spec(ctx.cfg)
    module = SearchModule(
        qmodel, ctx.num_classes, _optimizer(ctx.cfg, "search"), cfg.lr, cfg.logit_lr, constraints,
        cfg.dual_lr, cfg.tau_start, cfg.tau_end, ProximityConstraints(qmodel, prox) if prox.enabled else None,
        ctx.distiller("search"), logit_optimizer=instantiate(cfg.logit_optimizer), ramp=ramp_spec(ctx.cfg),
    )
    _fit(ctx, module, "search", None)
    qmodel.set_state("fixed")
    return module


def finetune(ctx: Context, qmodel: QuantModel) -> None:
    cfg = ctx.cfg.finetune
    qmodel.set_state("fixed")
    for p in qmodel.logit_parameters():
        p.requires_grad_(False)
    module = ClassifierModule(
        qmodel, ctx.num_classes, _optimizer(ctx.cfg, "finetune"), cfg.lr, ctx.distiller("finetune")
    )
    _fit(ctx, module, "finetune", "val/acc")


def search_outcome(module: SearchModule, constraints: list[Constraint]) -> dict[str, Any]:
    """Where the search itself ended, before repair and fill: how many quantizers its argmax
    moved from the start, and the exact costs of that argmax against the budgets."""
    moved = module.trace.moved(module.trace.argmax_bits())
    log.info("the search moved %d of %d searched quantizers from the start", len(moved), len(module.trace.quantizers))
    return {
        "search_moved_quantizers": len(moved),
        "search_moved": moved,
        "search_end_costs": {c.name: {"exact": c.exact(), "budget": c.budget} for c in constraints},
    }


def _latency_table(qmodel: QuantModel, cfg: DictConfig) -> lat.LatencyTable | None:
    return lat.build_latency_table(qmodel, cfg.cost.latency, cfg.cost.get("target"), cfg.cost.get("latency_table"))


def _costs(qmodel: QuantModel, budgets: BudgetSpec, table: lat.LatencyTable | None) -> dict[str, Any]:
    packed = size.exact_weight_bytes(qmodel, "packed")
    container = size.exact_weight_bytes(qmodel, "container")
    float_bytes = size.float_weight_bytes(qmodel)
    costs: dict[str, Any] = {
        "weight_bytes_packed": sum(packed.values()),
        "weight_bytes_container": sum(container.values()),
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
    return costs


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run every stage and write ``precision.yaml`` and ``summary.json`` into ``run_dir``."""
    started = time.time()
    cfg = scale_learning_rates(cfg)
    method = run_method(cfg)
    spec, budgets = quant_spec(cfg), budget_spec(cfg)
    proximity_spec(cfg)
    ramp_spec(cfg)
    check_enforce(cfg.search.get("enforce", "expected"))
    distill = distill_spec(cfg)
    check_start(cfg.search.get("start", "highest"))
    _check_counts(cfg)
    export_config(OmegaConf.to_container(cfg.export, resolve=True))  # export options checked before training
    device = stage_device(cfg.trainer)
    check_capture(cfg.get("step_capture", "none"), device)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = _instantiate(cfg.data)
    datamodule.setup("fit")
    num_classes = datamodule.num_classes
    net: nn.Module = _instantiate(cfg.model.net)
    model_title = str(cfg.model.net._target_).rsplit(".", 1)[-1]
    calib = datamodule.calibration_batches(cfg.search.calibration.batches)
    example = take(calib[0], 8)
    _check_data_fits_model(net, example, num_classes, cfg)

    if not method.is_baseline:  # budgets are checked on the structure alone, before any training
        probe = prepare(net, spec, example)
        build_constraints(probe, budgets, _latency_table(probe, cfg))
        del probe

    pretrained_meta = load_pretrained(net, cfg.model.pretrained) if cfg.model.pretrained else None
    loggers = run_loggers(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True))
    ctx = Context(cfg, run_dir, loggers, datamodule, num_classes, Resume.from_cfg(cfg, run_dir), distill)
    timings: dict[str, float] = {}
    exit_code = 1
    try:
        if pretrained_meta is None:
            t0 = time.time()
            pretrain(ctx, net)
            timings["pretrain_s"] = time.time() - t0
        test_loader = datamodule.test_dataloader()
        log.info("evaluation, calibration and batch-norm passes on %s", device)
        float_top1 = evaluate(net, test_loader, num_classes, device)
        log.info("float test top-1: %.2f %%", float_top1)
        if distill.enabled:
            ctx.teacher = net  # prepare() works on a copy: net stays the float model

        t0 = time.time()
        qmodel = prepare(net, spec, example)
        with on_device(qmodel, device):
            ranges = calibrate_activations(
                qmodel, calib, cfg.search.calibration.method, cfg.search.calibration.percentile
            )
        table = _latency_table(qmodel, cfg)
        constraints = [] if method.is_baseline else build_constraints(qmodel, budgets, table)
        timings["calibrate_s"] = time.time() - t0

        t0 = time.time()
        if method.is_baseline:
            assign_fixed(qmodel, method)
            qmodel.set_state("fixed")
            duals, steps, filled, disagreement, proximity_duals, search_end = {}, [], [], None, None, {}
            start_bits = start_sensitivity = None
            bn_batches = 0
        else:
            with on_device(qmodel, device):
                start = warm_start(
                    qmodel, constraints, cfg.search.get("start", "highest"), calib, cfg.callbacks.progress_bar
                )
            start_bits, start_sensitivity = start.bits, start.sensitivity
            if start_sensitivity is not None and is_rank_zero():
                write_allocation_report(start_sensitivity, start_bits, run_dir, model_title)
            search_module = search(ctx, qmodel, constraints)
            duals = search_module.duals.as_dict()
            disagreement = rank_disagreement({
                "logits": torch.cat([p.reshape(-1) for p in qmodel.logit_parameters()]),
                "duals": search_module.duals.values, "tau": torch.tensor([search_module.tau]),
            })
            proximity_duals = search_module.proximity.duals.as_dict() if search_module.proximity else None
            if proximity_duals is not None:
                search_module.proximity.remove()
                write_sensitivity_report(proximity_duals, run_dir, model_title)
            search_end = search_outcome(search_module, constraints)
            by_duals = cfg.search.get("repair_by", "margin") == "duals"
            steps = repair(qmodel, constraints, proximity_duals if by_duals else None)
            filled = fill(qmodel, constraints) if cfg.search.fill_budget else []
            if is_rank_zero():
                trace = search_module.trace
                write_search_trace(trace.start, trace.history, trace.argmax_bits(), run_dir, model_title)
            with on_device(qmodel, device):
                bn_batches = reestimate_batch_norm(
                    qmodel, ctx.datamodule.train_dataloader(), cfg.search.get("bn_batches", 0)
                )
        timings["search_s"] = time.time() - t0
        search_top1 = evaluate(qmodel, test_loader, num_classes, device)

        t0 = time.time()
        if method.trains:
            finetune(ctx, qmodel)
            timings["finetune_s"] = time.time() - t0
        quant_top1 = evaluate(qmodel, test_loader, num_classes, device) if method.trains else search_top1

        costs = _costs(qmodel, budgets, table)
        budget_entries = {c.name: {"budget": c.budget, "exact": c.exact(), "unit": c.unit} for c in constraints}
        feasible = None if method.is_baseline else all(c.satisfied() for c in constraints)
        summary = {
            "method": {"name": method.name, "label": method.label, "weight_bits": method.weight_bits,
                       "act_bits": method.act_bits, "calibration": cfg.search.calibration.method,
                       "percentile": cfg.search.calibration.percentile},
            "float_top1": float_top1,
            "search_top1": search_top1,
            "quant_top1": quant_top1,
            "weight_bytes_packed": costs["weight_bytes_packed"],
            "budget_weight_bytes": budget_entries.get("weight_bytes", {}).get("budget"),
            "weight_bytes_container": costs["weight_bytes_container"],
            "float_weight_bytes": costs["float_weight_bytes"],
            "overhead_bytes_packed": costs["overhead_bytes_packed"],
            "compression_packed": costs["compression_packed"],
            "model_float_bytes": costs["model_float_bytes"],
            "model_bytes_packed": costs["model_bytes_packed"],
            "compression_model": costs["compression_model"],
            "budget_scope": budgets.scope,
            "float_parameters": [t.__dict__ for t in qmodel.float_parameters()],
            "feasible": feasible,
            "latency_model": costs["latency_model"],
            "expected_latency": costs["expected_latency"],
            "exact_latency": costs["exact_latency"],
            "budget_latency_ms": budget_entries.get("latency_ms", {}).get("budget"),
            "bops": costs["bops"],
            "compression_bops": costs["compression_bops"],
            "activation_bytes_max": costs["activation_bytes_max"],
            "budgets": budget_entries,
            "search_start_weight_bits": start_bits,
            "search_start_sensitivity": start_sensitivity,
            "bn_reestimated_batches": bn_batches,
            "duals": duals,
            "proximity_duals": proximity_duals,
            **search_end,
            "repair": [s.__dict__ for s in steps],
            "fill": [s.__dict__ for s in filled],
            "repair_changed_quantizers": len({s.quantizer for s in steps}),
            "fill_changed_quantizers": len({s.quantizer for s in filled}),
            "activation_ranges": ranges,
            "timings": {**timings, "total_s": time.time() - started},
            "pretrained": cfg.model.pretrained,
            "world_size": world_size(),
            "rank_disagreement": disagreement,
        }
        if not is_rank_zero():  # DDP: rank 0 alone writes the artifacts
            exit_code = 0
            return summary
        write_precision(
            run_dir / "precision.yaml", qmodel,
            budgets=budget_entries,
            costs={k: v for k, v in costs.items() if k != "per_layer_weight_bytes_packed"},
            accuracy={"float_top1": float_top1, "quant_top1": quant_top1},
            config=OmegaConf.to_container(cfg, resolve=True),
        )
        atomic_write(run_dir / "quantized_state.pt", lambda p: torch.save(qmodel.state_dict(), p))
        summary["finished"] = not cfg.export.enabled  # until the export is done: a run killed while exporting can resume
        write_json(run_dir / "summary.json", summary)

        # export: ONNX graph + packed checkpoint, verified on the test set, latency measured
        if cfg.export.enabled:
            export_into_summary(summary, run_dir, functools.partial(
                export_run, qmodel, run_dir, test_loader, OmegaConf.to_container(cfg.export, resolve=True),
                arch=OmegaConf.to_container(cfg.model.net, resolve=True), spec=spec, latency_table=table,
            ))
        loggers.log_summary(summary)
        loggers.finish(0)  # before the table, which is the last thing a run prints
        print_final_table(qmodel, summary, costs["per_layer_weight_bytes_packed"])
        exit_code = 0
        return summary
    finally:
        loggers.finish(exit_code)
