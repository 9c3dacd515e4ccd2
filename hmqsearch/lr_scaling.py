"""Learning rates scaled with the batch size (``scale_lr``), for larger batches on a GPU.

The configured learning rates are for a global batch of ``scale_lr_base`` images (the CIFAR-10
recipe's 128; set 64 for the digits default). With ``scale_lr=linear`` every rate is
multiplied by ``global batch / scale_lr_base``, with ``sqrt`` by its square root; the global
batch is ``data.batch_size`` times the DDP processes (``trainer.devices`` x
``trainer.num_nodes`` under a ddp strategy). Scaled: the weights' rates of every stage
(``pretrain.lr``, ``search.lr``, ``finetune.lr``), the logits' (``search.logit_lr``) and the
duals' (``search.dual_lr``: the dual ascent takes one step per batch too, so the linear rule
keeps its change per epoch).

    python train.py experiment=cifar10_resnet20 ... data.batch_size=512 scale_lr=linear
"""

from __future__ import annotations

import copy
import logging
import math

from omegaconf import DictConfig, ListConfig, OmegaConf

from hmqsearch.errors import UserError

log = logging.getLogger(__name__)

RULES = ("none", "linear", "sqrt")
SCALED = ("pretrain.lr", "search.lr", "search.logit_lr", "search.dual_lr", "finetune.lr")


def processes(trainer_cfg: DictConfig) -> int:
    """How many processes share a step: 1 unless the strategy is DDP, then devices x nodes."""
    if "ddp" not in str(trainer_cfg.get("strategy", "auto")):
        return 1
    devices = trainer_cfg.get("devices", "auto")
    if isinstance(devices, str) and "," in devices:  # "0,1": device indices
        devices = len([d for d in devices.split(",") if d.strip()])
    elif isinstance(devices, (list, ListConfig)):
        devices = len(devices)
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise UserError(
            f"scale_lr needs the number of DDP processes, but trainer.devices={devices!r}; "
            "give trainer.devices as a number or a list of device indices"
        )
    return devices * int(trainer_cfg.get("num_nodes", 1))


def lr_factor(cfg: DictConfig) -> float:
    """The factor ``scale_lr`` applies to the configured learning rates (1.0 for none); the
    schema (:mod:`hmqsearch.config_schema`) checks ``scale_lr`` and ``scale_lr_base``."""
    if cfg.scale_lr == "none":
        return 1.0
    ratio = cfg.data.batch_size * processes(cfg.trainer) / cfg.scale_lr_base
    return ratio if cfg.scale_lr == "linear" else math.sqrt(ratio)


def scale_learning_rates(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` with the learning rates of :data:`SCALED` multiplied by :func:`lr_factor`
    (``cfg`` itself when the factor is 1); the new rates are logged."""
    factor = lr_factor(cfg)
    if factor == 1.0:
        return cfg
    scaled = copy.deepcopy(cfg)
    changes = []
    for key in SCALED:
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        OmegaConf.update(scaled, key, value * factor)
        changes.append(f"{key} {value:g} -> {value * factor:g}")
    log.info("scale_lr=%s: learning rates x %.4g for a global batch of %d (base %d): %s", cfg.scale_lr, factor,
             cfg.data.batch_size * processes(cfg.trainer), cfg.scale_lr_base, ", ".join(changes))
    return scaled
