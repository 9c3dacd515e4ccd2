"""hmqsearch entry point: `python train.py [overrides]`, sweeps with `-m`, `resume=RUN_DIR`.

A user mistake (bad value, missing file, infeasible budget) prints one message, leaves no
run directory behind, and exits with status 2.  An exported graph that fails verification
exits with status 1 and keeps the run directory (the graph as model.FAILED-verification.onnx).
A run stopped during training (non-finite loss) prints one message, keeps its checkpoints,
and exits with status 1; SIGTERM saves a checkpoint and exits with 143.  In a multirun, a
failed job is recorded in its directory (failure.json) and the sweep goes on.
`python train.py stage=export export.run_dir=<run>` runs the export stage alone.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from pytorch_lightning.utilities.exceptions import SIGTERMException

from hmqsearch.config_keys import check_overrides, legacy_overrides
from hmqsearch.config_schema import check_config
from hmqsearch.errors import RunHalted, UserError
from hmqsearch.export.verify import VerificationError
from hmqsearch.quiet import silence_third_party_notices
from hmqsearch.report.table import print_export_table
from hmqsearch.resume import resume_argv
from hmqsearch.run.export_stage import run_export_stage
from hmqsearch.run.stages import run
from hmqsearch.sweep import record_failure

log = logging.getLogger("hmqsearch")

CONFIG_DIR = Path(__file__).resolve().parent / "conf"


def _remove_partial_output(cfg: DictConfig, run_dir: Path) -> None:
    """A fresh run's directory goes; a resumed run's directory stays, less this attempt's config."""
    if cfg.resume:
        shutil.rmtree(run_dir / HydraConfig.get().output_subdir, ignore_errors=True)
        Path(HydraConfig.get().job_logging.handlers.file.filename).unlink(missing_ok=True)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)


def _run_stage(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    check_config(cfg)
    if cfg.stage == "export":
        summary = run_export_stage(cfg, run_dir)
        print_export_table(summary["export"])
        return summary
    return run(cfg, run_dir)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    silence_third_party_notices()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        try:
            return _run_stage(cfg, run_dir).get("quant_top1")
        except Exception as exc:  # one failed job must not stop the sweep
            log.error("job failed: %s", exc)
            record_failure(run_dir, exc)
            return math.nan
    try:
        summary = _run_stage(cfg, run_dir)
    except VerificationError as exc:
        print(f"hmqsearch: verification failed: {exc}", file=sys.stderr)
        sys.exit(1)
    except UserError as exc:
        print(f"hmqsearch: error: {exc}", file=sys.stderr)
        _remove_partial_output(cfg, run_dir)
        sys.exit(2)
    except RunHalted as exc:
        print(f"hmqsearch: stopped: {exc}", file=sys.stderr)
        sys.exit(1)
    except SIGTERMException:
        print(f"hmqsearch: stopped by SIGTERM; continue with: python train.py resume={run_dir}", file=sys.stderr)
        sys.exit(143)
    return summary.get("quant_top1")


def cli() -> None:
    """``train.py``'s command line: ``resume=``/``ckpt_path=`` expand to the original command first,
    ``logger.kind=X`` reads as ``logger=X``; unknown keys, group options and values of the wrong
    type are refused before Hydra starts."""
    try:
        sys.argv = legacy_overrides(resume_argv(sys.argv), CONFIG_DIR)
        check_overrides(sys.argv[1:], CONFIG_DIR)
    except UserError as exc:
        print(f"hmqsearch: error: {exc}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
