"""A 4-run sweep in which one run fails: the other 3 complete, each in its own finished wandb
run, and sweep_status.json / .md say which one failed."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sweep_with_a_failing_run_completes_the_others(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable, str(ROOT / "train.py"), "-m", "pretrain.epochs=1", "search.epochs=1", "finetune.epochs=1",
            "logger=wandb", "callbacks.progress_bar=false",
            "budget.weight_compression=4,8,100,12",  # 100x cannot be met: job 2 fails before training
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    status = json.loads((sweep_dir / "sweep_status.json").read_text())
    assert [(j["job"], j["status"]) for j in status] == [("0", "ok"), ("1", "ok"), ("2", "failed"), ("3", "ok")]
    assert "budget.weight_compression=100" in status[2]["overrides"]
    assert "cannot be met" in status[2]["error"]
    report = (sweep_dir / "sweep_status.md").read_text()
    assert report.startswith("# Sweep status: 3 ok, 1 failed, 0 incomplete")
    assert not (sweep_dir / "2" / "summary.json").exists()

    run_ids = set()
    for job in ("0", "1", "3"):
        assert (sweep_dir / job / "summary.json").is_file()
        runs = list((sweep_dir / job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs  # its own wandb run
        run_ids.add(runs[0].name.rsplit("-", 1)[1])
        # wandb logs the exit code when run.finish() is called (not only at interpreter exit)
        assert "got exitcode: 0" in (sweep_dir / job / "wandb" / "debug.log").read_text()
    assert len(run_ids) == 3
    assert not (sweep_dir / "2" / "wandb").exists()

