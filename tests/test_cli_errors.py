"""Bad input through the real command line: one clear message, exit 2, no traceback, no run dir."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    # (overrides, expected message fragment)
    (["model=resnet1000"], "Could not find 'model/resnet1000'"),
    (["data=mnist_from_the_moon"], "Could not find 'data/mnist_from_the_moon'"),
    (["budget.weight_compression=-4"], "budget.weight_compression=-4; allowed: a positive number"),
    (["budget.weight_kb=0"], "budget.weight_kb=0; allowed: a positive number"),
    (["search.weight_bits=[0,4]"], "search.weight_bits=[0, 4] contains [0]; allowed bit-widths are integers 1..8"),
    (["search.act_bits=[4,9]"], "search.act_bits=[4, 9] contains [9]; allowed bit-widths are integers 1..8"),
    (["search.weight_bits=[]"], "search.weight_bits is empty"),
    (["budget.weight_compression=100"], "weight_bytes budget 288.64 bytes (packed) cannot be met"),
    (["model.pretrained=/nonexistent/weights.th"], "/nonexistent/weights.th"),
    (["search.mode=soft"], "search.mode='soft'; allowed: expected, mixture, hard"),
    (["logger.kind=tensorboard"], "logger.kind='tensorboard'; allowed: wandb, csv, none"),
    (["cost.latency=magic"], "cost.latency='magic'; allowed: analytic, measured, none"),
    (["budget.latency_ms=0.0000001"], "latency_ms budget 1e-07 ms"),
    (["finetune.epochs=-1"], "finetune.epochs=-1; allowed: an integer >= 0"),
    (["stage=deploy"], "stage='deploy'; allowed: all, export"),
    (["export.form=tensorrt"], "export.form='tensorrt'; allowed: onnxruntime, portable"),
]


@pytest.mark.parametrize("overrides,message", CASES, ids=[c[0][0] for c in CASES])
def test_bad_input_is_one_clear_message(tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides, "logger=none", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert message in output, output[-2000:]
    assert "Traceback" not in output
    assert not run_dir.exists(), f"partial run directory left behind: {list(run_dir.rglob('*'))}"
