"""What a default run shows and leaves: the result table last on the console, no third-party
notices, and files that the group and others can read under the usual umask 0022."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("wandb:", "litlogger", "litmodels", "Tip:", "LeafSpec", "anonymous", "Traceback")
RESULTS = ("precision.yaml", "summary.json", "quantized_state.pt", "model.onnx", "model.packed.safetensors",
           "model.packed.json", "checkpoints/pretrain/done.json", "checkpoints/search/done.json",
           "checkpoints/finetune/done.json", "checkpoints/finetune/best.ckpt")


def test_default_run_ends_with_the_result_table_and_writes_readable_files(tmp_path):
    """The default command (wandb logger, progress bars) with one epoch per stage: stdout and
    stderr as a terminal interleaves them end with the result table."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "pretrain.epochs=1", "search.epochs=1", "finetune.epochs=1",
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=lambda: os.umask(0o022),
    )
    output = proc.stdout
    assert proc.returncode == 0, output[-3000:]
    lines = output.rstrip("\n").splitlines()
    table = lines[max(i for i, line in enumerate(lines) if line.startswith("Result")):]
    assert table[-1].startswith("└") and all(line[:1] in "R┏┃┡│└" for line in table), "\n".join(lines[-30:])
    assert any("test top-1 quantized" in line for line in table) and any("latency, onnxruntime" in line for line in table)
    noise = [line for line in lines if any(n in line for n in NOISE)]
    assert not noise, noise
    assert (run_dir / "wandb").is_dir()  # wandb still writes its run and its logs, only the console is quiet

    for name in RESULTS:
        mode = stat.S_IMODE((run_dir / name).stat().st_mode)
        assert mode & 0o044 == 0o044, f"{name}: {oct(mode)} is not readable by group and others"
