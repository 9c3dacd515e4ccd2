"""Exact resume: a search SIGKILLed (or SIGTERMed) mid-epoch and resumed ends with the same
precision.yaml as an uninterrupted run with the same seed."""

import json
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


def interrupt(run_dir: Path, cwd: Path, sig: signal.Signals) -> tuple[int, str]:
    """Start the tiny run, send ``sig`` as soon as the search's first checkpoint appears; return
    the exit status and stderr."""
    victim = subprocess.Popen(train_cmd(*TINY, f"hydra.run.dir={run_dir}"), cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = run_dir / "checkpoints" / "search" / "last.ckpt"
    deadline = time.time() + 240
    while not last.is_file() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(sig)
    _, stderr = victim.communicate(timeout=120)
    assert last.is_file(), "the search never wrote a checkpoint"
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert step % STEPS_PER_EPOCH != 0, f"stopped at step {step}: an epoch boundary, not mid-epoch"
    assert not (run_dir / "precision.yaml").exists() and not (run_dir / "checkpoints" / "search" / "done.json").exists()
    return victim.returncode, stderr


def test_sigkill_or_sigterm_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    reference = tmp_path / "reference"
    proc = subprocess.run(train_cmd(*TINY, f"hydra.run.dir={reference}"), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref_summary = json.loads((reference / "summary.json").read_text())

    for sig in (signal.SIGKILL, signal.SIGTERM):
        run_dir = tmp_path / sig.name
        status, stderr = interrupt(run_dir, tmp_path, sig)
        if sig == signal.SIGTERM:  # Lightning stops after the batch; a checkpoint is written at that boundary
            assert status == 143 and f"resume={run_dir}" in stderr, stderr[-2000:]
        proc = subprocess.run(train_cmd(f"resume={run_dir}"), cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "pretrain: finished before the resume" in proc.stdout + proc.stderr
        assert assignment(run_dir) == assignment(reference), sig.name
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["duals"] == pytest.approx(ref_summary["duals"], abs=1e-6)


def test_run_killed_while_exporting_resumes_into_the_export_only(tmp_path):
    """The state a kill during the export leaves: stages done, summary not final, no graph.
    The resume loads every stage from its checkpoint and exports again."""
    run_dir = tmp_path / "run"
    done = subprocess.run(train_cmd(*TINY, f"hydra.run.dir={run_dir}"), cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] is True
    again = subprocess.run(train_cmd(f"resume={run_dir}"), cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 2 and "the run already finished" in again.stderr + again.stdout

    summary["finished"] = False
    summary.pop("export")
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "model.onnx").unlink()
    checkpoints = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*.ckpt")}
    resumed = subprocess.run(train_cmd(f"resume={run_dir}"), cwd=tmp_path, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = json.loads((run_dir / "summary.json").read_text())
    assert final["finished"] is True and final["export"]["passed"] is True
    assert (run_dir / "model.onnx").is_file()
    assert final["quant_top1"] == summary["quant_top1"]
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints  # nothing retrained


def test_resume_of_a_sweep_preset_job_runs_in_its_own_directory(tmp_path):
    """A job launched by a preset that sets hydra.mode=MULTIRUN (hparams_search=budget_sweep)
    resumes as one run in its directory, not as a new multirun elsewhere."""
    from hydra import compose, initialize_config_dir
    from hydra.types import RunMode

    from hmqsearch.resume import resume_argv

    run_dir = tmp_path / "c4"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
        ["budget.weight_compression=4", "hparams_search=budget_sweep", "logger=none"]))
    argv = resume_argv(["train.py", f"resume={run_dir}"])
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=argv[1:], return_hydra_config=True)
    assert cfg.hydra.mode == RunMode.RUN
    assert Path(cfg.hydra.run.dir) == run_dir.resolve() and cfg.budget.weight_compression == 4
