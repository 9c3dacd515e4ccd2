"""The export stage from train.py: `stage=export` on a finished run, and a failed verification."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from hmqsearch.export.precision import write_precision
from hmqsearch.pipeline import quant_spec
from hmqsearch.quant.calibrate import calibrate_activations
from hmqsearch.quant.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A run directory as the pipeline leaves it (precision.yaml with its config, quantized state),
    built without training: the digits default, calibrated, at the initial argmax assignment
    (8-bit weights, which meet a 4x budget on the quantized layers exactly)."""
    run_dir = tmp_path_factory.mktemp("run")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["logger=none", "budget.weight_compression=4", "budget.scope=layers"])
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    calib = datamodule.calibration_batches(2)
    qmodel = prepare(instantiate(cfg.model.net), quant_spec(cfg), calib[0][:8])
    calibrate_activations(qmodel, calib)
    qmodel.set_state("fixed")
    write_precision(run_dir / "precision.yaml", qmodel, config=OmegaConf.to_container(cfg, resolve=True))
    torch.save(qmodel.state_dict(), run_dir / "quantized_state.pt")
    (run_dir / "summary.json").write_text(json.dumps({"quant_top1": 12.5}))
    return run_dir


def _train(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides, "logger=none"],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )


def test_stage_export_exports_a_finished_run(tmp_path, finished_run):
    proc = _train(tmp_path, "stage=export", f"export.run_dir={finished_run}", "export.latency_repeats=3",
                  f"hydra.run.dir={tmp_path / 'log'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (finished_run / "model.onnx").is_file() and (finished_run / "model.packed.safetensors").is_file()
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["quant_top1"] == 12.5  # the run's own figures are kept
    assert summary["export"]["passed"] is True and summary["export"]["verify"]["agreement"] == 100.0
    assert "onnxruntime agreement" in proc.stdout


def test_stage_export_without_a_run_is_one_clear_message(tmp_path):
    proc = _train(tmp_path, "stage=export", f"hydra.run.dir={tmp_path / 'log'}")
    assert proc.returncode == 2
    assert "stage=export needs export.run_dir" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "log").exists()


FAILING_VERIFY = """
import runpy, sys
import hmqsearch.export.stage as stage
real = stage.verify_onnx
stage.verify_onnx = lambda *a, **k: {**real(*a, **k), "passed": False}
sys.argv[0] = sys.argv[1]
del sys.argv[1]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_failed_verification_keeps_the_run_and_exits_nonzero(tmp_path, finished_run):
    """train.py with the verification made to fail: exit 1, run kept, graph renamed, summary says so."""
    proc = subprocess.run(
        [sys.executable, "-c", FAILING_VERIFY, str(ROOT / "train.py"), "stage=export", f"export.run_dir={finished_run}",
         "export.latency_repeats=3", "logger=none", f"hydra.run.dir={tmp_path / 'log'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "verification failed" in proc.stderr and "Traceback" not in proc.stderr
    assert (finished_run / "model.FAILED-verification.onnx").is_file()
    assert not (finished_run / "model.onnx").exists()
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["export"]["passed"] is False and summary["export"]["verify"]["samples"] > 0
    assert (tmp_path / "log").is_dir()  # the invocation's own directory (its log) is kept too
