"""A tiny digits multirun (search, uniform QAT, PTQ) through train.py, and the report built from it."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hmqsearch.report.__main__ import build_report, main
from hmqsearch.report.runs import collect_runs

ROOT = Path(__file__).resolve().parents[1]
TINY = ["pretrain.epochs=2", "search.epochs=1", "finetune.epochs=1", "logger=csv", "callbacks.progress_bar=false"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """One multirun: 0 = the search at 8x, 1 = uniform W4A8 QAT, 2 = PTQ W8A8 (percentile)."""
    tmp = tmp_path_factory.mktemp("sweep")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", *TINY, "method=hmq,uniform,ptq",
         "search.calibration.method=percentile", f"hydra.sweep.dir={tmp / 'multirun'}"],
        cwd=tmp, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "multirun"


def _summary(sweep: Path, i: int) -> dict:
    return json.loads((sweep / str(i) / "summary.json").read_text())


def test_each_method_writes_its_summary_and_assignment(sweep: Path):
    hmq, uniform, ptq = (_summary(sweep, i) for i in range(3))
    assert [s["method"]["name"] for s in (hmq, uniform, ptq)] == ["hmq", "uniform", "ptq"]
    assert hmq["feasible"] is True and uniform["feasible"] is None and ptq["feasible"] is None
    for i, (wbits, abits) in ((1, (4, 8)), (2, (8, 8))):
        layers = yaml.safe_load((sweep / str(i) / "precision.yaml").read_text())["layers"]
        assert {e["weight"]["bits"] for e in layers.values()} == {wbits}
        assert {e["input"]["bits"] for e in layers.values()} == {abits}
    # uniform fine-tunes with the search's fine-tune stage; PTQ does not train at all
    assert (sweep / "1" / "checkpoints" / "finetune" / "last.ckpt").is_file()
    assert not (sweep / "2" / "checkpoints" / "finetune").exists()
    assert ptq["quant_top1"] == ptq["search_top1"]
    assert ptq["method"]["calibration"] == "percentile"
    assert uniform["weight_bytes_packed"] * 2 == ptq["weight_bytes_packed"]  # 4- vs 8-bit weights


def test_report_table_and_plots_match_the_summaries(sweep: Path, tmp_path: Path):
    files = build_report([sweep], tmp_path / "report", layers_run=sweep / "0")
    for kind in ("pareto", "bitwidths"):
        assert files[kind].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = files["markdown"].read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if re.match(r"\| \d+ \|", line)}
    assert sorted(rows) == ["0", "1", "2"]
    for i in range(3):
        s = _summary(sweep, i)
        assert f"{s['weight_bytes_packed']:,}" in rows[str(i)]
        assert f"{s['quant_top1']:.2f} %" in rows[str(i)]
    assert "uniform W4A8" in rows["1"] and "PTQ W8A8 p99.99" in rows["2"]
    assert "beat" in rows["0"]  # the search is compared with the baselines at least as large


def test_report_lists_failed_runs_and_rejects_a_missing_folder(sweep: Path, tmp_path: Path, capsys):
    folder = tmp_path / "multirun"
    shutil.copytree(sweep, folder)
    (folder / "1" / "summary.json").unlink()
    runs = collect_runs([folder])
    assert [r.complete for r in runs] == [True, False, True]
    text = build_report([folder], tmp_path / "report")["markdown"].read_text()
    assert "Failed or incomplete runs" in text and "method=uniform" in text
    assert main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    assert "hmqsearch: error: run folder" in capsys.readouterr().err


def test_baseline_runs_reload_with_their_own_precision(sweep: Path):
    """A finished baseline run rebuilds for export: its spec holds the method's single precision."""
    from hmqsearch.quant.assignment import Assignment
    from hmqsearch.run.load import load_run

    assignment = Assignment.of(load_run(sweep / "1").qmodel)
    assert {s.weight.bits for s in assignment.values()} == {4}


def test_search_is_judged_against_the_next_size_up_and_every_larger_baseline():
    from hmqsearch.report.pareto import baselines_at_least_as_large, next_size_up
    from hmqsearch.report.runs import Run

    def run(name, method, size, top1):
        return Run(Path(name), summary={"method": {"name": method}, "weight_bytes_packed": size, "quant_top1": top1})

    search = run("hmq", "hmq", 90, 80.0)
    smaller, w4, w4a4, w8 = run("w2", "uniform", 60, 70.0), run("w4", "uniform", 120, 85.0), \
        run("w4a4", "uniform", 120, 82.0), run("w8", "ptq", 240, 91.0)
    runs = [search, smaller, w4, w4a4, w8, Run(Path("failed"))]
    assert [r.path.name for r in next_size_up(search, runs)] == ["w4", "w4a4"]
    assert [r.path.name for r in baselines_at_least_as_large(search, runs)] == ["w4", "w4a4", "w8"]
    assert next_size_up(w8, runs) == [w8]  # a baseline is its own size class
    assert next_size_up(run("huge", "hmq", 999, 1.0), runs) == []


def test_runs_of_one_label_are_told_apart_by_the_overrides_only_some_have(tmp_path: Path):
    for name, weight_bits, extra in (("w2", 2, []), ("w2_6ep", 2, ["finetune.epochs=6"]), ("w4", 4, [])):
        run_dir = tmp_path / name
        (run_dir / ".hydra").mkdir(parents=True)
        method = {"name": "uniform", "weight_bits": weight_bits, "act_bits": 8}
        (run_dir / "summary.json").write_text(json.dumps({"method": method, "weight_bytes_packed": 60}))
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["method=uniform", "seed=0", *extra]))
    names = {r.path.name: r.name for r in collect_runs([tmp_path])}
    assert names == {"w2": "uniform W2A8", "w2_6ep": "uniform W2A8 (finetune.epochs=6)", "w4": "uniform W4A8"}
