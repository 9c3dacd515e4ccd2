"""A run's directory read back: its summary and overrides, and for a finished run its config,
data module and quantized model at its final assignment.

One loader for ``train.py stage=export``, ``hmqsearch export``/``verify`` and the report
(``python -m hmqsearch.report``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from hmqsearch.errors import UserError
from hmqsearch.export.precision import apply_precision, read_precision
from hmqsearch.export.verify import first_batch
from hmqsearch.inputs import take
from hmqsearch.quant.prepare import QuantModel, QuantSpec, prepare
from hmqsearch.quant.spiq import restore_input_scales
from hmqsearch.run.config import quant_spec

if TYPE_CHECKING:  # Lightning is not imported to read a summary (the report)
    import pytorch_lightning as pl

SUMMARY = "summary.json"
PRECISION = "precision.yaml"
QUANTIZED_STATE = "quantized_state.pt"
HYDRA = ".hydra"
OVERRIDES = "overrides.yaml"


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a run's directory (finished or not)."""
    return (path / HYDRA).is_dir() or (path / SUMMARY).is_file()


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary.json; None where there is none (a failed or unfinished run)."""
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from exc


def read_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides the run was started with (none recorded: an empty list)."""
    path = Path(run_dir) / HYDRA / OVERRIDES
    return [str(o) for o in (yaml.safe_load(path.read_text()) or [])] if path.is_file() else []


def read_run_config(precision_path: Path) -> tuple[dict[str, Any], DictConfig]:
    """A precision.yaml and the resolved config recorded in it."""
    precision = read_precision(precision_path)
    if not isinstance(precision.get("config"), dict):
        raise UserError(f"{precision_path} has no 'config' section; it was not written by a hmqsearch run")
    return precision, OmegaConf.create(precision["config"])


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """The data module a run's config names, set up for fitting (its test set included)."""
    try:
        datamodule = instantiate(cfg.data)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a config that no longer builds
        raise UserError(f"cannot build the run's data module {cfg.data.get('_target_')}: {exc}") from exc
    datamodule.setup("fit")
    return datamodule


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
class FinishedRun:
    """A finished run rebuilt from its artifacts."""

    cfg: DictConfig  # the run's resolved config
    precision: dict[str, Any]  # its precision.yaml
    datamodule: pl.LightningDataModule
    qmodel: QuantModel  # in the fixed state at precision.yaml's assignment, in eval mode
    spec: QuantSpec

    @property
    def arch(self) -> dict[str, Any]:
        """The network's constructor (``cfg.model.net`` as a plain dict)."""
        return OmegaConf.to_container(self.cfg.model.net, resolve=True)


def load_run(run_dir: Path) -> FinishedRun:
    """A finished run's directory: ``precision.yaml`` + ``quantized_state.pt``."""
    run_dir = Path(run_dir)
    return load_artifacts(run_dir / PRECISION, run_dir / QUANTIZED_STATE)


def load_artifacts(precision_path: Path, checkpoint: Path) -> FinishedRun:
    """Rebuild the fixed-state model from a ``precision.yaml`` and a quantized model's checkpoint.

    The assignment in precision.yaml wins over the one in the checkpoint, so an edited
    precision.yaml exports as edited.
    """
    precision_path, checkpoint = Path(precision_path), Path(checkpoint)
    precision, cfg = read_run_config(precision_path)
    spec = quant_spec(cfg)
    net = instantiate(cfg.model.net)
    datamodule = build_datamodule(cfg)
    qmodel = prepare(net, spec, take(first_batch(datamodule.test_dataloader()), 8))
    state = _load_state(checkpoint)
    restore_input_scales(qmodel, state)  # a SPIQ model's per-channel input scales
    try:
        qmodel.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{checkpoint} does not fit the model of {precision_path}: {str(exc).splitlines()[0]}") from exc
    apply_precision(qmodel, precision, source=str(precision_path))
    qmodel.set_state("fixed")
    return FinishedRun(cfg, precision, datamodule, qmodel.eval(), spec)
