"""Exact resume: a search SIGKILLed mid-epoch and resumed ends with the same precision.yaml as an
uninterrupted run with the same seed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 20  # digits: 1257 training images in batches of 64
TINY = [
    "pretrain.epochs=1", "search.epochs=2", "finetune.epochs=1", "trainer.deterministic=true",
    "callbacks.checkpoint_every_n_steps=3", "logger=none", "callbacks.progress_bar=false",
]


def train_cmd(*overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *overrides]


def assignment(run_dir: Path) -> dict:
    data = yaml.safe_load((run_dir / "precision.yaml").read_text())
    return {k: v for k, v in data.items() if k != "config"}  # the config names the run directory


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    proc = subprocess.run(train_cmd(*TINY, f"hydra.run.dir={reference}"), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    victim = subprocess.Popen(train_cmd(*TINY, f"hydra.run.dir={killed}"), cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "search" / "last.ckpt"
    deadline = time.time() + 240
    while not last.is_file() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert last.is_file(), "the search never wrote a checkpoint"
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert step % STEPS_PER_EPOCH != 0, f"killed at step {step}: an epoch boundary, not mid-epoch"
    assert not (killed / "precision.yaml").exists() and not (killed / "checkpoints" / "search" / "done.json").exists()

    proc = subprocess.run(train_cmd(f"resume={killed}"), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pretrain: finished before the resume" in proc.stdout + proc.stderr
    assert assignment(killed) == assignment(reference)
    ref_summary, res_summary = (json.loads((d / "summary.json").read_text()) for d in (reference, killed))
    assert res_summary["duals"] == pytest.approx(ref_summary["duals"], abs=1e-6)
