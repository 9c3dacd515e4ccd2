"""Bad input: one clear message, the documented exit status, no traceback, no partial artifact.

Most cases call train.py's command line in this process (the same code path as
`python train.py`, without ~6 s of imports per case); a handful run as real subprocesses.
docs/reliability.md lists every case.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra.core.global_hydra import GlobalHydra

from conftest import write_calibrated_run
from hmqsearch import cli
from hmqsearch.models.small_cnn import SmallCNN

ROOT = Path(__file__).resolve().parents[1]
# Every case must fail before training; should one not, these keep the mistake quick to see.
SAFETY = ["pretrain.epochs=0", "search.epochs=0", "finetune.epochs=0", "logger=none", "callbacks.progress_bar=false"]
USER_ERROR = 2

# (id, overrides, expected exit status, expected message fragment)
CONFIG_CASES = [
    ("unknown-model", ["model=resnet1000"], USER_ERROR, "model=resnet1000 is not an option; allowed: mobilenetv2_cifar, resnet20, resnet32"),
    ("unknown-data", ["data=mnist_from_the_moon"], USER_ERROR, "data=mnist_from_the_moon is not an option; allowed: cifar10, digits, image_folder"),
    ("misspelled-key", ["budget.weight_compresion=8"], USER_ERROR, "unknown setting budget.weight_compresion; did you mean budget.weight_compression?"),
    ("key-outside-its-group", ["weight_compression=8"], USER_ERROR, "unknown setting weight_compression; did you mean budget.weight_compression?"),
    ("unknown-key", ["search.x=1"], USER_ERROR, "unknown setting search.x; allowed under search: act_bits, bn_batches"),
    ("misspelled-key-in-sweep", ["hydra.mode=MULTIRUN", "budget.weight_compresion=4,8"], USER_ERROR, "unknown setting budget.weight_compresion; did you mean budget.weight_compression?"),
    ("nan-compression", ["budget.weight_compression=nan"], USER_ERROR, "budget.weight_compression=nan; allowed: a positive number, or null"),
    ("inf-learning-rate", ["search.lr=inf"], USER_ERROR, "search.lr=inf; allowed: a positive number"),
    ("nan-model-setting", ["model.net.width=nan"], USER_ERROR, "model.net.width=nan; allowed: a finite number"),
    ("negative-dual-lr", ["search.dual_lr=-0.1"], USER_ERROR, "search.dual_lr=-0.1; allowed: a number >= 0"),
    ("zero-temperature", ["search.tau_end=0"], USER_ERROR, "search.tau_end=0; allowed: a positive number"),
    ("percentile-over-100", ["search.calibration.percentile=150"], USER_ERROR, "search.calibration.percentile=150; allowed: a number in (0, 100]"),
    ("negative-seed", ["seed=-1"], USER_ERROR, "seed=-1; allowed: an integer in [0, 4294967295]"),
    ("duplicate-weight-bits", ["search.weight_bits=[3,3]"], USER_ERROR, "search.weight_bits=[3, 3] repeats [3]; allowed: each bit-width once, e.g. search.weight_bits=[3]"),
    ("duplicate-act-bits", ["search.act_bits=[8,4,8]"], USER_ERROR, "search.act_bits=[8, 4, 8] repeats [8]; allowed: each bit-width once"),
    ("model-does-not-fit-data", ["model=resnet20"], USER_ERROR, "does not fit model hmqsearch.models.resnet_cifar.resnet20: its layer conv1 (Conv2d) expects 3 input channels but gets an input of shape (8, 1, 8, 8)"),
    ("negative-compression", ["budget.weight_compression=-4"], USER_ERROR, "budget.weight_compression=-4; allowed: a positive number"),
    ("zero-weight-kb", ["budget.weight_kb=0"], USER_ERROR, "budget.weight_kb=0; allowed: a positive number"),
    ("budget-basis", ["budget.basis=bits"], USER_ERROR, "budget.basis='bits'; allowed:"),
    ("weight-bits-zero", ["search.weight_bits=[0,4]"], USER_ERROR, "search.weight_bits=[0, 4] contains [0]; allowed bit-widths are integers 1..8"),
    ("act-bits-nine", ["search.act_bits=[4,9]"], USER_ERROR, "search.act_bits=[4, 9] contains [9]; allowed bit-widths are integers 1..8"),
    ("weight-bits-empty", ["search.weight_bits=[]"], USER_ERROR, "search.weight_bits is empty"),
    ("n-thresholds-zero", ["search.n_thresholds=0"], USER_ERROR, "search.n_thresholds=0; allowed: an integer >= 1"),
    ("infeasible-budget", ["budget.weight_compression=100"], USER_ERROR, "weight_bytes budget 294.16 bytes (packed, whole model) cannot be met"),
    ("missing-pretrained", ["model.pretrained=/nonexistent/weights.th"], USER_ERROR, "pretrained weights /nonexistent/weights.th not found"),
    ("search-mode", ["search.mode=soft"], USER_ERROR, "search.mode='soft'; allowed: expected, mixture, hard, argmax"),
    ("logger-kind", ["logger.kind=tensorboard"], USER_ERROR, "logger.kind='tensorboard'; allowed: wandb, csv, none"),
    ("latency-model", ["cost.latency=magic"], USER_ERROR, "cost.latency='magic'; allowed: analytic, measured, none"),
    ("infeasible-latency", ["budget.latency_ms=0.0000001"], USER_ERROR, "latency_ms budget 1e-07 ms"),
    ("latency-budget-without-model", ["cost.latency=none", "budget.latency_ms=1"], USER_ERROR, "budget.latency_ms is set but no latency model is configured"),
    ("measured-without-table", ["cost=measured"], USER_ERROR, "cost.latency=measured needs cost.latency_table="),
    ("missing-latency-table", ["cost=measured", "cost.latency_table=/nonexistent/table.json"], USER_ERROR, "latency table /nonexistent/table.json does not exist"),
    ("negative-epochs", ["finetune.epochs=-1"], USER_ERROR, "finetune.epochs=-1; allowed: an integer >= 0"),
    ("epochs-not-int", ["search.epochs=two"], USER_ERROR, "search.epochs='two'; allowed: an integer >= 0"),
    ("negative-bn-batches", ["search.bn_batches=-2"], USER_ERROR, "search.bn_batches=-2; allowed: an integer >= 0"),
    ("batch-size-zero", ["data.batch_size=0"], USER_ERROR, "data.batch_size=0; allowed: an integer from 1 to"),
    ("val-size-too-small", ["data.val_size=5"], USER_ERROR, "data.val_size=5; allowed: an integer from 10 to"),
    ("wrong-num-classes", ["model.net.num_classes=7"], USER_ERROR, "outputs shape (7,) but the data has 10 classes; set model.net.num_classes=10"),
    ("wrong-input-shape", ["model.net.in_channels=3"], USER_ERROR, "(input shape (1, 8, 8)) does not fit model hmqsearch.models.small_cnn.SmallCNN: its layer conv1 (Conv2d) expects 3 input channels"),
    ("unknown-stage", ["stage=deploy"], USER_ERROR, "stage='deploy'; allowed: all, export"),
    ("export-form", ["export.form=tensorrt"], USER_ERROR, "export.form='tensorrt'; allowed: onnxruntime, portable"),
    ("distill-alpha", ["distill.enabled=true", "distill.alpha=1.5"], USER_ERROR, "distill.alpha=1.5; allowed: a number in [0, 1]"),
    ("search-start", ["search.start=lowest"], USER_ERROR, "search.start='lowest'; allowed: highest, feasible_uniform, sensitivity"),
    ("distill-stage", ["distill.stages=[pretrain]"], USER_ERROR, "distill.stages=['pretrain']; allowed entries: search, finetune"),
    ("cifar-missing-root", ["data=cifar10", "model=resnet20", "data.root=/nonexistent/cifar"], USER_ERROR, "/nonexistent/cifar"),
    *([] if torch.cuda.is_available() else [  # a mistake only where there is no GPU
        ("gpu-without-cuda", ["trainer.accelerator=gpu"], USER_ERROR, "trainer.accelerator=gpu, but torch"),
    ]),
    ("nan-bops-budget", ["budget.bops_compression=nan"], USER_ERROR, "budget.bops_compression=nan; allowed: a positive number, or null"),
    ("negative-ramp-steps", ["search.ramp.steps=-1"], USER_ERROR, "search.ramp.steps=-1; allowed: an integer >= 0"),
    ("search-enforce", ["search.enforce=maybe"], USER_ERROR, "search.enforce='maybe'; allowed: argmax, argmax_only, expected"),
    ("assigned-without-path", ["method=assigned"], USER_ERROR, "method=assigned needs method.path=<a run's precision.yaml>"),
    ("assigned-missing-file", ["method=assigned", "method.path=none.yaml"], USER_ERROR, "precision file none.yaml does not exist"),
]


def _file_cases(tmp: Path) -> list[tuple[str, list[str], int, str]]:
    """Cases whose input is a file: weights, latency tables, run directories and checkpoints."""
    garbage = tmp / "garbage.th"
    garbage.write_bytes(b"\x00not a torch file")
    text = tmp / "text.th"
    text.write_text("hello")
    pickled = tmp / "numpy.th"
    torch.save({"conv1.weight": np.zeros(3)}, pickled)
    truncated_weights = tmp / "truncated.th"
    torch.save(SmallCNN().state_dict(), truncated_weights)
    truncated_weights.write_bytes(truncated_weights.read_bytes()[:500])
    other_arch = tmp / "other_arch.th"
    torch.save({"encoder.weight": torch.zeros(3)}, other_arch)
    narrower = tmp / "narrower.th"
    torch.save(SmallCNN(width=8).state_dict(), narrower)
    table = tmp / "table.json"
    table.write_text("{ not json")
    empty = tmp / "empty_dir"
    empty.mkdir()
    corrupt_overrides = _run_dir(tmp / "corrupt_overrides", overrides_text="[unclosed")
    finished = _run_dir(tmp / "finished")
    (finished / "summary.json").write_text("{}")
    truncated = _run_dir(tmp / "truncated_ckpt")
    (truncated / "checkpoints" / "pretrain" / "last.ckpt").write_bytes(b"PK\x03\x04truncated")
    foreign = _run_dir(tmp / "foreign_ckpt")
    torch.save({"state_dict": {"encoder.weight": torch.zeros(3)}}, foreign / "checkpoints" / "pretrain" / "last.ckpt")
    bad_done = _run_dir(tmp / "corrupt_done")
    (bad_done / "checkpoints" / "pretrain" / "done.json").write_text("{")
    stray_ckpt = tmp / "stray.ckpt"
    stray_ckpt.write_bytes(b"x")
    return [
        ("corrupt-pretrained", [f"model.pretrained={garbage}"], USER_ERROR, f"cannot read pretrained weights {garbage}: this is not a file written by torch.save"),
        ("text-pretrained", [f"model.pretrained={text}"], USER_ERROR, f"cannot read pretrained weights {text}: this is not a file written by torch.save (it starts with b'hello'); allowed: a state_dict"),
        ("pickle-pretrained", [f"model.pretrained={pickled}"], USER_ERROR, f"cannot read pretrained weights {pickled}: it holds a Python object (numpy."),
        ("truncated-pretrained", [f"model.pretrained={truncated_weights}"], USER_ERROR, f"cannot read pretrained weights {truncated_weights}: the torch.save file is damaged or truncated"),
        ("other-architecture-pretrained", [f"model.pretrained={other_arch}"], USER_ERROR, f"pretrained weights {other_arch} do not fit SmallCNN: missing: conv1.weight, bn1.weight"),
        ("narrower-pretrained", [f"model.pretrained={narrower}"], USER_ERROR, "shape mismatch: conv1.weight (file (8, 1, 3, 3), model (16, 1, 3, 3))"),
        ("corrupt-latency-table", ["cost=measured", f"cost.latency_table={table}"], USER_ERROR, f"latency table {table} is not a valid table"),
        ("resume-missing-dir", [f"resume={tmp / 'nope'}"], USER_ERROR, f"resume={tmp / 'nope'}: no such run directory"),
        ("resume-not-a-run", [f"resume={empty}"], USER_ERROR, "not a hmqsearch run directory"),
        ("resume-corrupt-overrides", [f"resume={corrupt_overrides}"], USER_ERROR, f"{corrupt_overrides / '.hydra' / 'overrides.yaml'} is corrupt"),
        ("resume-finished-run", [f"resume={finished}"], USER_ERROR, "the run already finished (summary.json is there); nothing to resume"),
        ("resume-changes-search", [f"resume={truncated}", "search.epochs=5"], USER_ERROR, "only trainer, callbacks, logger, hydra settings may change, not: search.epochs=5"),
        ("resume-in-multirun", ["-m", f"resume={truncated}"], USER_ERROR, "cannot be used with -m (multirun)"),
        ("ckpt-path-missing", [f"ckpt_path={tmp / 'nope.ckpt'}"], USER_ERROR, f"ckpt_path={tmp / 'nope.ckpt'}: no such file"),
        ("ckpt-path-outside-run", [f"ckpt_path={stray_ckpt}"], USER_ERROR, "expected a checkpoint inside <run dir>/checkpoints/<pretrain|search|finetune>/"),
        ("truncated-checkpoint", [f"resume={truncated}"], USER_ERROR, f"checkpoint {truncated / 'checkpoints' / 'pretrain' / 'last.ckpt'} is unreadable (corrupt or truncated)"),
        ("foreign-checkpoint", [f"resume={foreign}"], USER_ERROR, "does not match the pretrain model: 26 missing keys (first: model.block_bn1.bias); 1 unexpected keys (first: encoder.weight)"),
        ("corrupt-done-marker", [f"resume={bad_done}"], USER_ERROR, f"{bad_done / 'checkpoints' / 'pretrain' / 'done.json'} is corrupt"),
    ]


def _run_dir(path: Path, overrides_text: str | None = None) -> Path:
    """A run directory as a killed run leaves it: its overrides and a checkpoint folder."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(overrides_text or yaml.safe_dump(SAFETY))
    (path / "checkpoints" / "pretrain").mkdir(parents=True)
    return path


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def train_entry():
    spec = importlib.util.spec_from_file_location("train_entry", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_in_process(train_entry, argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as exited:
        train_entry.cli()
    captured = capsys.readouterr()
    return exited.value.code, captured.out + captured.err


def test_bad_input_suite(tmp_path, train_entry, capsys, monkeypatch):
    """Every case: the message, the exit status, no traceback, and nothing left behind (a fresh
    run leaves no directory; a resumed run directory is left exactly as it was)."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    cases = CONFIG_CASES + _file_cases(inputs)
    assert len({c[0] for c in cases}) == len(cases) >= 25
    monkeypatch.chdir(tmp_path)
    failures = []
    for name, overrides, status, message in cases:
        run_dir = tmp_path / "runs" / name
        before = _snapshot(inputs)
        resuming = any(o.startswith(("resume=", "ckpt_path=")) for o in overrides)
        argv = [*overrides, "logger=none"] if resuming else [*SAFETY, *overrides, f"hydra.run.dir={run_dir}"]
        code, output = _run_in_process(train_entry, argv, capsys, monkeypatch)
        problems = []
        if code != status:
            problems.append(f"exit status {code}, expected {status}")
        if message not in output:
            problems.append(f"message {message!r} not in output")
        if "Traceback" in output:
            problems.append("traceback printed")
        if run_dir.exists():
            problems.append(f"partial run directory left: {sorted(p.name for p in run_dir.rglob('*'))}")
        if _snapshot(inputs) != before:
            problems.append("an input file or run directory was changed")
        if problems:
            failures.append(f"{name}: {'; '.join(problems)}\n{output[-1500:]}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("overrides,message", [
    (["model=resnet1000"], "model=resnet1000 is not an option; allowed: mobilenetv2_cifar, resnet20"),
    (["budget.weight_compresion=8"], "unknown setting budget.weight_compresion; did you mean budget.weight_compression?"),
    (["budget.weight_compression=nan"], "budget.weight_compression=nan; allowed: a positive number, or null"),
    (["budget.weight_compression=100"], "weight_bytes budget 294.16 bytes (packed, whole model) cannot be met"),
    (["data.val_size=5"], "data.val_size=5; allowed: an integer from 10 to"),
    (["resume=/nonexistent/run"], "resume=/nonexistent/run: no such run directory"),
], ids=["unknown-option", "misspelled-key", "nan-budget", "infeasible-budget", "data-size", "resume-missing"])
def test_bad_input_through_a_real_subprocess(tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides, "logger=none", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == USER_ERROR, output[-2000:]
    assert f"hmqsearch: error: {message}" in output, output[-2000:]
    assert "Traceback" not in output and "+budget" not in output  # no advice to add a misspelled key
    assert not run_dir.exists(), f"partial run directory left behind: {list(run_dir.rglob('*'))}"


@pytest.fixture
def run_over_budget(tmp_path) -> Path:
    """A finished run's directory whose precision.yaml was edited past the run's 8x budget on the
    quantized layers: every weight at 4 bits (exactly the budget, 3,608 bytes packed) but one
    layer raised to 5 bits."""
    run_dir = write_calibrated_run(tmp_path / "finished", ["budget.scope=layers"])
    precision = yaml.safe_load((run_dir / "precision.yaml").read_text())
    for name, layer in precision["layers"].items():
        layer["weight"]["bits"] = 5 if name == "block_conv1" else 4
    (run_dir / "precision.yaml").write_text(yaml.safe_dump(precision, sort_keys=False))
    return run_dir


def test_export_over_budget_refuses_unless_allowed(tmp_path, run_over_budget, train_entry, capsys, monkeypatch):
    """`stage=export` of a precision.yaml that breaks the run's budget: exit 2, the budget and the
    bytes named, nothing exported; `export.allow_over_budget=true` exports it."""
    monkeypatch.chdir(tmp_path)
    before = _snapshot(run_over_budget)
    log_dir = tmp_path / "export_log"
    argv = ["stage=export", f"export.run_dir={run_over_budget}", "logger=none", f"hydra.run.dir={log_dir}"]
    code, output = _run_in_process(train_entry, argv, capsys, monkeypatch)
    assert code == USER_ERROR, output[-2000:]
    # block_conv1 holds 16 x 16 x 3 x 3 = 2,304 weights: one more bit each is 288 bytes over 3,608
    assert (f"{run_over_budget / 'precision.yaml'} breaks the run's budget: weight_bytes 3,896 bytes (packed, quantized layers) "
            "against its budget 3,608; allowed: an assignment within the budgets, or export.allow_over_budget=true") in output
    assert "Traceback" not in output and not log_dir.exists()
    assert _snapshot(run_over_budget) == before  # no model.onnx, no packed checkpoint, nothing changed

    allowed = [*argv, "export.allow_over_budget=true", "export.compare_float=false", "export.latency_repeats=1"]
    monkeypatch.setattr(sys, "argv", ["train.py", *allowed])
    GlobalHydra.instance().clear()
    train_entry.cli()
    assert (run_over_budget / "model.onnx").is_file() and (run_over_budget / "model.packed.safetensors").is_file()


def test_corrupt_precision_yaml_names_the_file(tmp_path, capsys):
    """`hmqsearch export --run-dir` on a run whose precision.yaml is corrupt: exit 2, the file named."""
    (tmp_path / "precision.yaml").write_text("layers: [unclosed\n")
    (tmp_path / "quantized_state.pt").write_bytes(b"")
    before = _snapshot(tmp_path)
    assert cli.main(["export", "--run-dir", str(tmp_path)]) == USER_ERROR
    err = capsys.readouterr().err
    assert str(tmp_path / "precision.yaml") in err and "Traceback" not in err
    assert _snapshot(tmp_path) == before


def test_docs_and_readme_count_every_case(tmp_path):
    """docs/reliability.md numbers one row per case of this file (the suite's, the GPU case where it
    is skipped, and the two export cases above), and the README quotes the same count."""
    import re

    count = len(CONFIG_CASES) + len(_file_cases(tmp_path)) + int(torch.cuda.is_available()) + 2
    docs = (ROOT / "docs" / "reliability.md").read_text()
    rows = [int(n) for n in re.findall(r"^\| (\d+) \| `", docs.split("### The bad-input suite")[1], re.M)]
    assert rows == list(range(1, count + 1))
    assert f"these {count} cases" in docs
    assert f"the {count} cases of `tests/test_cli_errors.py`" in (ROOT / "README.md").read_text()
