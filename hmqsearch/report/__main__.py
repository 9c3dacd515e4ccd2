"""``python -m hmqsearch.report RUNS... --out DIR [--layers RUN]``: the sweep report.

Reads every run of the given (multi)run folders (summary.json, .hydra/overrides.yaml) and
writes ``report.md`` (table, failed runs), ``pareto.png`` (test top-1 vs packed weight
size, baselines as reference points) and, with ``--layers``, ``bitwidths.png`` for that run.
Exit status 2 with one message on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hmqsearch.errors import UserError
from hmqsearch.io import atomic_write_text
from hmqsearch.report.bitwidths import bitwidth_chart
from hmqsearch.report.pareto import markdown_table, pareto_plot
from hmqsearch.report.runs import collect_runs


def build_report(folders: list[Path], out: Path, layers_run: Path | None = None) -> dict[str, Path]:
    """Write the report files into ``out``; returns them by kind."""
    runs = collect_runs(folders)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs)
    files = {"pareto": pareto_plot(runs, out / "pareto.png")}
    body = f"# Sweep report\n\nRuns from: {', '.join(str(f) for f in folders)}\n\n{table}\n![pareto](pareto.png)\n"
    if layers_run is not None:
        precision = layers_run / "precision.yaml"
        if not precision.is_file():
            raise UserError(f"--layers {layers_run}: no precision.yaml there")
        files["bitwidths"] = bitwidth_chart(precision, out / "bitwidths.png")
        body += f"\nPer-layer bit-widths of {layers_run}:\n\n![bit-widths](bitwidths.png)\n"
    files["markdown"] = atomic_write_text(out / "report.md", body)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hmqsearch.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="multirun folders (or single run folders)")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md and the PNGs")
    parser.add_argument("--layers", type=Path, help="run folder whose per-layer bit-widths to chart")
    args = parser.parse_args(argv)
    try:
        files = build_report(args.runs, args.out, args.layers)
    except UserError as exc:
        print(f"hmqsearch: error: {exc}", file=sys.stderr)
        return 2
    print((args.out / "report.md").read_text())
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
