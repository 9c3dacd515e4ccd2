from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import hmqsearch.config_schema  # noqa: F401 - registers the schema that every composition of conf/ builds on

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_train(*overrides: str):
    """conf/train.yaml composed with ``overrides``, as train.py would (without running it)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that need it skip cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def train_run(tmp_path: Path):
    """Run train.py in a subprocess from ``tmp_path`` with ``overrides``, the run directory
    ``tmp_path/run`` (returned with the finished process)."""

    def run(*overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
        run_dir = tmp_path / "run"
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve().parents[1] / "train.py"), *overrides,
             "callbacks.progress_bar=false", f"hydra.run.dir={run_dir}"],
            cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc, run_dir

    return run


def write_calibrated_run(run_dir: Path, overrides: list[str]) -> Path:
    """A run directory as train.py leaves it, built without training: the digits default with
    ``overrides``, calibrated, at the initial argmax assignment (precision.yaml with its config,
    quantized_state.pt)."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from hmqsearch.export.precision import write_precision
    from hmqsearch.quant.assignment import Assignment
    from hmqsearch.quant.calibrate import calibrate_activations
    from hmqsearch.quant.prepare import prepare
    from hmqsearch.run.config import quant_spec

    cfg = compose_train("logger=none", *overrides)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    calib = datamodule.calibration_batches(2)
    qmodel = prepare(instantiate(cfg.model.net), quant_spec(cfg), calib[0][:8])
    calibrate_activations(qmodel, calib)
    qmodel.set_state("fixed")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_precision(run_dir / "precision.yaml", Assignment.of(qmodel), config=OmegaConf.to_container(cfg, resolve=True))
    torch.save(qmodel.state_dict(), run_dir / "quantized_state.pt")
    return run_dir
