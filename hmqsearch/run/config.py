"""The run's specs read from its Hydra config, each checked before the first training step."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from hmqsearch.constrained.budgets import BudgetSpec
from hmqsearch.constrained.proximity import ProximitySpec
from hmqsearch.constrained.ramp import RampSpec
from hmqsearch.cost import latency as lat
from hmqsearch.errors import UserError
from hmqsearch.lit.distill import DistillSpec
from hmqsearch.methods import HMQSearch, Method, by_name
from hmqsearch.quant.prepare import Pin, QuantModel, QuantSpec


def run_method(cfg: DictConfig) -> Method:
    """The run's method (``method=``, its ``_target_`` instantiated).  A run directory's config
    written before ``_target_`` names it by ``name``; one written before methods existed means
    the search."""
    node = cfg.get("method")
    if not node:
        return HMQSearch()
    if "_target_" in node:
        return instantiate_node(node)
    options = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    return by_name(options.pop("name"), **options)


def quant_spec(cfg: DictConfig, method: Method | None = None) -> QuantSpec:
    """The quantization spec of the run, narrowed to the candidates of ``method`` (the run's own
    when not given)."""
    s = cfg.search
    pins = [Pin(**p) for p in (OmegaConf.to_container(s.pins, resolve=True) if s.get("pins") else [])]
    spec = QuantSpec(
        weight_bits=list(s.weight_bits), act_bits=list(s.act_bits), n_thresholds=s.n_thresholds,
        weight_per_channel=s.weight_per_channel, mode=s.mode, first_layer_act_bits=s.first_layer_act_bits,
        pins=pins, fold_bn=s.fold_bn, init_mass=s.get("init_mass", QuantSpec.init_mass),
        embedding_bits=list(s.embedding_bits) if s.get("embedding_bits") is not None else None,
    )
    spec.validate()
    return (method or run_method(cfg)).quant_spec(spec)


def budget_spec(cfg: DictConfig) -> BudgetSpec:
    spec = BudgetSpec(**OmegaConf.to_container(cfg.budget, resolve=True))
    spec.validate()
    return spec


def proximity_spec(cfg: DictConfig) -> ProximitySpec:
    spec = ProximitySpec(**OmegaConf.to_container(cfg.search.get("proximity") or {}, resolve=True))
    spec.validate()
    if cfg.search.get("repair_by", "margin") == "duals" and not spec.enabled:
        raise UserError("search.repair_by=duals needs the proximity duals: set search.proximity.enabled=true")
    return spec


def ramp_spec(cfg: DictConfig) -> RampSpec:
    spec = RampSpec(**OmegaConf.to_container(cfg.search.get("ramp") or {"steps": 0}, resolve=True))
    spec.validate()
    return spec


def distill_spec(cfg: DictConfig) -> DistillSpec:
    raw = OmegaConf.to_container(cfg.get("distill") or {}, resolve=True)
    spec = DistillSpec(**{**raw, "stages": tuple(raw.get("stages", DistillSpec.stages))})
    spec.validate()
    return spec


def latency_table(qmodel: QuantModel, cfg: DictConfig) -> lat.LatencyTable | None:
    """The latency cost model ``cfg.cost`` names for ``qmodel`` (None without one)."""
    return lat.build_latency_table(qmodel, cfg.cost.latency, cfg.cost.get("target"), cfg.cost.get("latency_table"))


def instantiate_node(node: DictConfig) -> Any:
    """Hydra's instantiate, letting a constructor's UserError through as itself (Hydra wraps it)."""
    try:
        return instantiate(node)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, UserError):
            raise exc.__cause__ from None
        raise
