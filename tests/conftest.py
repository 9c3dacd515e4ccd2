from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


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
