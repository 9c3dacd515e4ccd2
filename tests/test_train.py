"""The embedded default end to end through train.py: artifacts, summary keys, sweeps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["pretrain.epochs=8", "search.epochs=3", "finetune.epochs=2", "logger=csv", "callbacks.progress_bar=false"]
SUMMARY_KEYS = {
    "float_top1", "quant_top1", "weight_bytes_packed", "budget_weight_bytes", "feasible",
    "latency_model", "expected_latency", "duals",
}


def train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )


def test_quick_default_run_writes_artifacts(tmp_path):
    run_dir = tmp_path / "run"
    proc = train(tmp_path, *QUICK, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["feasible"] is True
    assert summary["weight_bytes_packed"] <= summary["budget_weight_bytes"]
    precision = yaml.safe_load((run_dir / "precision.yaml").read_text())
    assert list(precision["layers"]) == ["conv1", "block_conv1", "block_conv2", "down", "linear"]
    assert precision["layers"]["conv1"]["input"]["bits"] == 8  # first layer input pinned
    # the budget is on the whole model: quantized weights packed + every other parameter at 32 bits
    assert precision["budgets"]["weight_bytes"]["exact"] == summary["model_bytes_packed"] <= summary["budget_weight_bytes"]
    assert summary["model_bytes_packed"] > summary["weight_bytes_packed"] and summary["budget_scope"] == "model"
    assert summary["compression_model"] == summary["model_float_bytes"] / summary["model_bytes_packed"] >= 8.0
    assert "compression, whole model" in proc.stdout
    assert "Precision assignment" in proc.stdout and "test top-1 quantized" in proc.stdout
    for stage in ("pretrain", "search", "finetune"):
        assert (run_dir / "checkpoints" / stage / "last.ckpt").is_file()
    # every run exports: the deployment graph and the packed checkpoint, verified
    assert (run_dir / "model.onnx").is_file() and (run_dir / "model.packed.safetensors").is_file()
    export = summary["export"]
    assert export["passed"] is True and export["verify"]["agreement"] >= 99.5
    assert export["verify"]["samples"] == export["verify"]["samples"] > 0
    assert export["packed_bytes"] == summary["weight_bytes_packed"]
    assert export["onnx_weight_bytes"] == summary["weight_bytes_container"]
    assert export["onnx_bytes"] == (run_dir / "model.onnx").stat().st_size
    assert export["measured_latency_ms"] > 0
    assert "onnxruntime agreement" in proc.stdout


def test_budget_sweep_sizes_follow_budgets(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = train(tmp_path, "-m", *QUICK, "budget.weight_compression=4,12", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s4, s12 = (json.loads((sweep_dir / str(i) / "summary.json").read_text()) for i in (0, 1))
    assert s4["feasible"] and s12["feasible"]
    assert s12["weight_bytes_packed"] < s4["weight_bytes_packed"]
    assert s12["budget_weight_bytes"] < s4["budget_weight_bytes"]


@pytest.mark.slow
def test_full_default_meets_its_targets(tmp_path):
    """The README's figure: the default run within 1 point of float, feasible, under budget."""
    run_dir = tmp_path / "run"
    proc = train(tmp_path, "logger=csv", "callbacks.progress_bar=false", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["feasible"] and summary["weight_bytes_packed"] <= summary["budget_weight_bytes"]
    assert summary["quant_top1"] >= summary["float_top1"] - 1.0


def test_default_search_keeps_its_accuracy_at_20x_with_1_bit_weights(tmp_path):
    """The default search settings keep the argmax up with the ramping bounds. With the earlier
    ones (logits 0.02, duals 0.1, ramp until 0.5, end temperature 0.05) the duals wound up during
    the ramp and this run fell to 71.39 % against 99.17 % float (docs/benchmark.md)."""
    run_dir = tmp_path / "run"
    proc = train(
        tmp_path, "budget.weight_compression=20", "search.weight_bits=[1,2,3,4,5,6,7,8]", "seed=2",
        "export.enabled=false", "logger=none", "callbacks.progress_bar=false", f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["feasible"] and summary["compression_model"] >= 20.0
    assert summary["quant_top1"] >= summary["float_top1"] - 3.0
