"""The Python API: the whole flow on any classifier in a few lines, without Hydra.

    result = hmqsearch.quantize(model, train_loader, test_loader, "out", budget=hmqsearch.Budget(weight_compression=8))
    qmodel = hmqsearch.load_packed("out/model.packed", MyModel())

``quantize`` runs :func:`prepare`, :func:`calibrate`, :func:`search` (the constrained search,
then the repair and fill of the argmax against the exact budgets), :func:`finetune` and
:func:`export_model` (ONNX graph verified in onnxruntime, packed checkpoint); each step is public
for finer control.  Loaders yield ``(inputs, labels)``; inputs are a tensor, a tuple or a dict of
tensors, as the model takes them (:mod:`hmqsearch.inputs`); the model returns logits (or a
``transformers`` output with ``.logits``).  Training runs in PyTorch Lightning with no logger
and no checkpoints.  Budgets default to the whole model's parameter bytes
(:class:`~hmqsearch.constrained.budgets.BudgetSpec`, ``scope="layers"`` for the quantized
layers alone).
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from hmqsearch.config_schema import SearchConfig
from hmqsearch.constrained.budgets import BudgetSpec, build_constraints
from hmqsearch.constrained.constraints import enforce_on
from hmqsearch.constrained.ramp import RampSpec
from hmqsearch.constrained.repair import RepairStep, fill, repair
from hmqsearch.constrained.warm_start import warm_start
from hmqsearch.cost import model_size, size
from hmqsearch.errors import UserError
from hmqsearch.export.deploy import export_config, export_quantized
from hmqsearch.export.verify import first_batch
from hmqsearch.inputs import Inputs, run_model, take
from hmqsearch.io import write_json
from hmqsearch.lit.classifier import ClassifierModule
from hmqsearch.lit.search import SearchModule
from hmqsearch.quant.batch_norm import reestimate_batch_norm
from hmqsearch.quant.calibrate import calibrate_activations
from hmqsearch.quant.prepare import QuantModel, QuantSpec
from hmqsearch.quant.prepare import prepare as _prepare

log = logging.getLogger(__name__)

Budget = BudgetSpec


def _inputs_of(batch: Any) -> Inputs:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _first_inputs(loader: Iterable[Any]) -> Inputs:
    batch = next(iter(loader), None)
    if batch is None:
        raise UserError("the data loader is empty")
    return _inputs_of(batch)


def _num_classes(model: nn.Module, example: Inputs) -> int:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = run_model(model, take(example, 2))
    model.train(was)
    if out.dim() != 2:
        raise UserError(f"the model's logits have shape {tuple(out.shape)}; a classifier's are (batch, classes)")
    return int(out.shape[1])


def _fit(module: pl.LightningModule, loader: Iterable[Any], epochs: int, progress: bool, accelerator: str) -> None:
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise UserError(f"epochs={epochs!r}; allowed: an integer >= 0")
    if epochs == 0:
        return
    trainer = pl.Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=progress,
        enable_model_summary=False, accelerator=accelerator, devices=1,
    )
    module.train()
    trainer.fit(module, train_dataloaders=loader)


def fit_float(
    model: nn.Module, loader: Iterable[Any], *, epochs: int = 5, lr: float = 1e-3,
    progress: bool = False, accelerator: str = "cpu",
) -> nn.Module:
    """Train a float classifier with Adam and cross-entropy (in place); returns it in eval mode."""
    module = ClassifierModule(model, _num_classes(model, _first_inputs(loader)), torch.optim.Adam, lr)
    _fit(module, loader, epochs, progress, accelerator)
    return model.eval()


def prepare(model: nn.Module, example: Inputs, spec: QuantSpec | None = None, **spec_fields: Any) -> QuantModel:
    """A quantized copy of ``model`` (the original is not modified).

    ``spec`` or its fields as keywords (``weight_bits=(2, 4, 8)``, ``act_bits=(4, 8)``,
    ``embedding_bits``, ``pins``, ...: :class:`~hmqsearch.quant.prepare.QuantSpec`).
    """
    if spec is not None and spec_fields:
        raise UserError(f"give a QuantSpec or its fields {sorted(spec_fields)}, not both")
    try:
        spec = spec or QuantSpec(**spec_fields)
    except TypeError as exc:
        raise UserError(f"{exc}; QuantSpec fields: {', '.join(QuantSpec.__dataclass_fields__)}") from exc
    return _prepare(model, spec, example)


def calibrate(qmodel: QuantModel, loader: Iterable[Any], batches: int = 4, method: str = "max") -> dict[str, float]:
    """Activation ranges from the first ``batches`` batches of ``loader`` (labels ignored)."""
    taken = [_inputs_of(b) for b in itertools.islice(loader, batches)]
    if not taken:
        raise UserError("the calibration loader is empty")
    return calibrate_activations(qmodel, taken, method)


@dataclass
class SearchReport:
    """What the search ended with: exact cost against each budget, duals, repair and fill steps."""

    budgets: dict[str, dict[str, Any]]
    feasible: bool
    duals: dict[str, float]
    repair: list[RepairStep] = field(default_factory=list)
    fill: list[RepairStep] = field(default_factory=list)


_SEARCH = SearchConfig()  # the search's defaults are train.py's: the schema holds them


def search(
    qmodel: QuantModel,
    loader: Iterable[Any],
    budget: BudgetSpec | None = None,
    *,
    epochs: int = 1,
    lr: float = _SEARCH.lr,
    logit_lr: float = _SEARCH.logit_lr,
    dual_lr: float = _SEARCH.dual_lr,
    tau: tuple[float, float] = (_SEARCH.tau_start, _SEARCH.tau_end),
    start: str = _SEARCH.start,
    ramp: RampSpec = RampSpec(),
    enforce: str = _SEARCH.enforce,
    dual_restart: bool = _SEARCH.dual_restart,
    end_feasible: bool = _SEARCH.end_feasible,
    fill_budget: bool = _SEARCH.fill_budget,
    bn_batches: int = _SEARCH.bn_batches,
    progress: bool = False,
    accelerator: str = "cpu",
) -> SearchReport:
    """Search bit-widths under ``budget`` (default 8x the whole model), then repair and fill the
    argmax against the exact budgets; leaves ``qmodel`` in the fixed state.  Calibrate first.

    The defaults are ``train.py``'s (``SearchConfig`` in hmqsearch/config_schema.py): from the highest precision,
    the bounds ramped to the budgets (``ramp``), the duals enforcing the argmax's cost too."""
    budget = budget or BudgetSpec()
    if budget.latency_ms is not None:
        raise UserError("the Python API's search takes weight budgets; budget.latency_ms needs train.py's latency models")
    constraints = build_constraints(qmodel, budget, None)
    example = _first_inputs(loader)
    calib = [_inputs_of(b) for b in itertools.islice(loader, 4)] if start == "sensitivity" else None
    warm_start(qmodel, constraints, start, calib, progress)
    qmodel.set_state("search")
    ramp.validate()
    enforce_on(constraints, qmodel, enforce)
    module = SearchModule(
        qmodel, _num_classes(qmodel, example), torch.optim.Adam, lr, logit_lr=logit_lr, constraints=constraints,
        dual_lr=dual_lr, tau_start=tau[0], tau_end=tau[1], ramp=ramp, dual_restart=dual_restart,
        end_feasible=end_feasible,
    )
    _fit(module, loader, epochs, progress, accelerator)
    module.restore_last_feasible()
    qmodel.set_state("fixed")
    steps = repair(qmodel, constraints)
    filled = fill(qmodel, constraints) if fill_budget else []
    reestimate_batch_norm(qmodel, loader, bn_batches)
    return SearchReport(
        {c.name: {"budget": c.budget, "exact": c.exact(), "unit": c.unit} for c in constraints},
        all(c.satisfied() for c in constraints), module.duals.as_dict(), steps, filled,
    )


def finetune(
    qmodel: QuantModel, loader: Iterable[Any], *, epochs: int = 1, lr: float = 1e-4,
    progress: bool = False, accelerator: str = "cpu",
) -> QuantModel:
    """Quantization-aware training of the weights with the assignment frozen (Adam)."""
    qmodel.set_state("fixed")
    for p in qmodel.logit_parameters():
        p.requires_grad_(False)
    module = ClassifierModule(qmodel, _num_classes(qmodel, _first_inputs(loader)), torch.optim.Adam, lr)
    _fit(module, loader, epochs, progress, accelerator)
    return qmodel.eval()


def export_model(
    qmodel: QuantModel, out_dir: str | Path, loader: Iterable[Any], *, arch: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Write ``model.onnx`` (verified against ``qmodel`` on ``loader``: raises
    :class:`~hmqsearch.export.verify.VerificationError` below the tolerances) and
    ``model.packed.safetensors`` + ``.json`` into ``out_dir``; returns the export figures.

    ``options``: the export options (:class:`~hmqsearch.export.options.ExportOptions`:
    ``tolerance_agreement``, ``verify_samples``, ``compare_float``, ``latency_repeats``, ...).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return export_quantized(
        qmodel, out, first_batch(loader), loader, export_config(options), arch=arch, spec=qmodel.spec
    )["export"]


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable[Any]) -> float:
    """Top-1 accuracy in percent on ``loader`` (eval mode, on the CPU)."""
    correct = total = 0
    was = model.training
    model.eval()
    for x, y in loader:
        correct += int((run_model(model, x).argmax(1) == y).sum())
        total += len(y)
    model.train(was)
    if total == 0:
        raise UserError("the evaluation loader is empty")
    return 100.0 * correct / total


@dataclass
class Result:
    """The outcome of :func:`quantize` (also written to ``out_dir/summary.json``)."""

    qmodel: QuantModel
    out_dir: Path
    float_top1: float
    quant_top1: float
    model_float_bytes: int  # the float model's parameters at 32 bits
    model_bytes_packed: int  # the quantized model's: quantized weights packed, other parameters at 32 bits
    compression_model: float
    weight_bytes_packed: int  # the quantized layers' weights alone
    compression_layers: float
    search: SearchReport
    export: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        keys = ("float_top1", "quant_top1", "model_float_bytes", "model_bytes_packed", "compression_model",
                "weight_bytes_packed", "compression_layers")
        return {k: getattr(self, k) for k in keys} | {
            "feasible": self.search.feasible, "budgets": self.search.budgets,
            "onnx_agreement": self.export["verify"]["agreement"],
            "float_parameters": [t.__dict__ for t in self.qmodel.float_parameters()],
        }

    def __str__(self) -> str:
        return (
            f"top-1 float {self.float_top1:.2f} % -> quantized {self.quant_top1:.2f} %; whole model "
            f"{self.model_bytes_packed:,} of {self.model_float_bytes:,} bytes ({self.compression_model:.2f}x), "
            f"quantized layers {self.compression_layers:.2f}x; onnxruntime agreement "
            f"{self.export['verify']['agreement']:.2f} %; written to {self.out_dir}"
        )


def quantize(
    model: nn.Module,
    train_loader: Iterable[Any],
    test_loader: Iterable[Any],
    out_dir: str | Path,
    *,
    budget: BudgetSpec | None = None,
    spec: QuantSpec | None = None,
    search_epochs: int = 1,
    finetune_epochs: int = 1,
    search_options: dict[str, Any] | None = None,
    finetune_options: dict[str, Any] | None = None,
    export_options: dict[str, Any] | None = None,
    seed: int = 0,
) -> Result:
    """The whole flow: prepare, calibrate, search under ``budget`` (default 8x the whole model),
    repair, fine-tune, export and verify (raises when the graph disagrees).  ``model`` (a trained
    float classifier) is not modified."""
    pl.seed_everything(seed, workers=True)
    float_top1 = accuracy(model, test_loader)
    qmodel = prepare(model, take(_first_inputs(train_loader), 8), spec)
    calibrate(qmodel, train_loader)
    report = search(qmodel, train_loader, budget, epochs=search_epochs, **(search_options or {}))
    finetune(qmodel, train_loader, epochs=finetune_epochs, **(finetune_options or {}))
    figures = export_model(qmodel, out_dir, test_loader, **(export_options or {}))
    packed = sum(size.exact_weight_bytes(qmodel, "packed").values())
    result = Result(
        qmodel, Path(out_dir), float_top1, accuracy(qmodel, test_loader), qmodel.model_float_bytes,
        model_size.model_bytes(qmodel), model_size.model_compression(qmodel), packed,
        size.float_weight_bytes(qmodel) / packed, report, figures,
    )
    write_json(Path(out_dir) / "summary.json", json.loads(json.dumps(result.summary(), default=str)))
    log.info("%s", result)
    return result


__all__: Sequence[str] = (
    "Budget", "Result", "SearchReport", "accuracy", "calibrate", "export_model", "finetune", "fit_float", "prepare",
    "quantize", "search",
)
