"""hmqsearch entry point: `python train.py [overrides]`, sweeps with `-m`.

A user mistake (bad value, missing file, infeasible budget) prints one message, leaves no
run directory behind, and exits with status 2.  An exported graph that fails verification
exits with status 1 and keeps the run directory (the graph as model.FAILED-verification.onnx).
`python train.py stage=export export.run_dir=<run>` runs the export stage alone.
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
from hmqsearch.export.stage import run_export_stage
from hmqsearch.export.verify import VerificationError
from hmqsearch.pipeline import run
from hmqsearch.report.table import print_export_table

log = logging.getLogger("hmqsearch")

STAGES = ("all", "export")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        if cfg.stage == "export":
            summary = run_export_stage(cfg, run_dir)
            print_export_table(summary["export"])
            return summary.get("quant_top1")
        if cfg.stage != "all":
            raise UserError(f"stage={cfg.stage!r}; allowed: {', '.join(STAGES)}")
        summary = run(cfg, run_dir)
    except VerificationError as exc:
        print(f"hmqsearch: verification failed: {exc}", file=sys.stderr)
        sys.exit(1)
    except UserError as exc:
        print(f"hmqsearch: error: {exc}", file=sys.stderr)
        shutil.rmtree(run_dir, ignore_errors=True)
        sys.exit(2)
    return summary["quant_top1"]


if __name__ == "__main__":
    main()
