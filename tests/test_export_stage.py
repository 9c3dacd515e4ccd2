"""The export stage from train.py: `stage=export` on a finished run, and a failed verification."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_calibrated_run


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished run without training: the digits default at its initial argmax assignment
    (8-bit weights, which meet a 4x budget on the quantized layers exactly)."""
    run_dir = write_calibrated_run(tmp_path_factory.mktemp("run"), ["budget.weight_compression=4", "budget.scope=layers"])
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
import os, runpy, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))  # as `python train.py` would: this checkout's package
import hmqsearch.export.deploy as deploy
real = deploy.verify_onnx
deploy.verify_onnx = lambda *a, **k: {**real(*a, **k), "passed": False}
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
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # patch this checkout's package, the one train.py imports
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "verification failed" in proc.stderr and "Traceback" not in proc.stderr
    assert (finished_run / "model.FAILED-verification.onnx").is_file()
    assert not (finished_run / "model.onnx").exists()
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["export"]["passed"] is False and summary["export"]["verify"]["samples"] > 0
    assert (tmp_path / "log").is_dir()  # the invocation's own directory (its log) is kept too
