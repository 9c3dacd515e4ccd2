"""Two CPU processes under DDP (gloo): the ranks hold the same logits, duals and temperature
after the search, and rank 0 alone writes the artifacts."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ("precision.yaml", "summary.json", "quantized_state.pt")


def test_ddp_two_cpu_processes_agree_and_write_one_set_of_artifacts(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable, str(ROOT / "train.py"), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
            "pretrain.epochs=1", "search.epochs=1", "finetune.epochs=1", "logger=csv", "callbacks.progress_bar=false",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    # max |rank r - rank 0| over all logits, duals and tau, all-gathered after the search
    assert summary["rank_disagreement"] == {"logits": 0.0, "duals": 0.0, "tau": 0.0}
    assert summary["duals"]["weight_bytes"] > 0.0  # the duals did move: the agreement is not trivial
    for name in ARTIFACTS:
        found = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob(f"*{Path(name).stem}*{Path(name).suffix}"))
        assert found == [f"run/{name}"], found
