"""hmqsearch entry point: `python train.py [overrides]`, sweeps with `-m`.

A user mistake (bad value, missing file, infeasible budget) prints one message, leaves no
run directory behind, and exits with status 2.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from hmqsearch.errors import UserError
from hmqsearch.pipeline import run

log = logging.getLogger("hmqsearch")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run(cfg, run_dir)
    except UserError as exc:
        print(f"hmqsearch: error: {exc}", file=sys.stderr)
        shutil.rmtree(run_dir, ignore_errors=True)
        sys.exit(2)
    return summary["quant_top1"]


if __name__ == "__main__":
    main()
