"""Per-layer proximity constraints, the sensitivity report and the dual-guided repair."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hmqsearch.constrained.budgets import BudgetSpec, build_constraints
from hmqsearch.constrained.proximity import ProximityConstraints, ProximitySpec
from hmqsearch.constrained.repair import repair
from hmqsearch.errors import UserError
from hmqsearch.lit.search import SearchModule
from hmqsearch.quant.prepare import QuantSpec, prepare
from hmqsearch.report.sensitivity import markdown_table, spearman, write_sensitivity_report

ROOT = Path(__file__).resolve().parents[1]


def toy(weight_bits=(2, 8)):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    spec = QuantSpec(weight_bits=list(weight_bits), act_bits=[8], first_layer_act_bits=None)
    return prepare(net, spec, torch.randn(4, 16))


def fixed_at(qmodel, bits: int):
    for _, layer in qmodel.layers():
        layer.wq.fix(layer.wq.scheme_at(bits))
    qmodel.set_state("fixed")
    return qmodel


def test_dual_grows_while_violated_and_returns_to_zero_when_satisfied():
    qmodel = fixed_at(toy(), 2).train()
    prox = ProximityConstraints(qmodel, ProximitySpec(enabled=True, tolerance=1e-3, dual_lr=0.5)).train()
    x = torch.randn(64, 16)
    history = []
    for _ in range(3):  # 2-bit weights: relative output error far above 1e-3
        qmodel(x)
        assert bool((prox.violations() > 0).all())
        prox.step_end()
        history.append(prox.duals.values.clone())
    assert bool((history[1] > history[0]).all()) and bool((history[2] > history[1]).all())
    qmodel.set_state("float")  # quantized output == float output: every constraint holds (v = -1)
    for _ in range(int(history[-1].max() / 0.5) + 1):
        before = prox.duals.values.clone()
        qmodel(x)
        assert bool((prox.violations() < 0).all())
        prox.step_end()
        assert bool(((prox.duals.values < before) | (prox.duals.values == 0)).all())
    assert bool((prox.duals.values == 0).all())


def test_epoch_update_ascends_once_on_the_mean_violation():
    qmodel = fixed_at(toy(), 2).train()
    prox = ProximityConstraints(qmodel, ProximitySpec(enabled=True, tolerance=1e-3, update="epoch", dual_lr=0.5)).train()
    x = torch.randn(64, 16)
    seen = []
    for _ in range(2):
        qmodel(x)
        seen.append(prox.violations().detach())
        prox.step_end()
    assert bool((prox.duals.values == 0).all())  # nothing until the epoch ends
    prox.epoch_end()
    torch.testing.assert_close(prox.duals.values, 0.5 * (seen[0] + seen[1]) / 2)


def test_hooks_measure_only_in_training_mode():
    qmodel = fixed_at(toy(), 2)
    prox = ProximityConstraints(qmodel, ProximitySpec(enabled=True)).eval()
    qmodel(torch.randn(8, 16))
    assert torch.equal(prox.violations(), -torch.ones(2))  # nothing measured: treated as satisfied


def test_search_module_carries_proximity_duals():
    qmodel = fixed_at(toy(), 2)
    prox = ProximityConstraints(qmodel, ProximitySpec(enabled=True, tolerance=1e-3, dual_lr=0.1))
    module = SearchModule(qmodel, 4, functools.partial(torch.optim.Adam), 1e-3, 0.0, [], 0.1, proximity=prox)
    data = TensorDataset(torch.randn(64, 16), torch.randint(0, 4, (64,)))
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, DataLoader(data, batch_size=16))
    assert bool((prox.duals.values > 0).all())
    assert "proximity.duals.values" in module.state_dict()


def test_invalid_proximity_settings_are_user_errors():
    with pytest.raises(UserError, match="update"):
        ProximitySpec(update="batch").validate()
    with pytest.raises(UserError, match="tolerance"):
        ProximitySpec(tolerance=0).validate()


def test_sensitivity_report_ranks_layers_and_draws_a_chart(tmp_path):
    duals = {"a": 0.1, "b": 2.0, "c": 0.5}
    table, chart = write_sensitivity_report(duals, tmp_path, "toy")
    rows = [line.split("|")[2].strip() for line in markdown_table(duals).splitlines()[2:]]
    assert rows == ["b", "c", "a"]
    assert "| 1 | b |" in table.read_text()
    assert chart.read_bytes().startswith(b"\x89PNG")


def test_spearman_rank_correlation():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)


def test_repair_by_duals_lowers_the_least_sensitive_layer_first():
    names = [n for n, _ in toy().layers()]
    for duals in ({names[0]: 5.0, names[1]: 0.1}, {names[0]: 0.1, names[1]: 5.0}):
        q = toy()
        [c] = build_constraints(q, BudgetSpec(weight_compression=5), None)
        steps = repair(q, [c], duals)
        assert c.satisfied()
        least = min(duals, key=duals.get)
        assert steps[0].quantizer.startswith(least + ".")


def test_run_with_proximity_writes_the_sensitivity_report(train_run):
    _, run_dir = train_run("pretrain.epochs=2", "search.epochs=1", "finetune.epochs=1", "logger=none",
                           "search.proximity.enabled=true", "search.repair_by=duals")
    assert (run_dir / "sensitivity.png").is_file()
    assert "| 1 |" in (run_dir / "sensitivity.md").read_text()


def test_repair_by_duals_without_proximity_is_a_user_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "search.repair_by=duals", "logger=none", f"hydra.run.dir={tmp_path / 'r'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("hmqsearch: error: search.repair_by=duals needs")


def test_reference_is_the_float_layer_as_built_not_the_trained_weights():
    qmodel = toy()
    qmodel.set_state("float")
    qmodel.train()
    prox = ProximityConstraints(qmodel, ProximitySpec(enabled=True, tolerance=1.0, relative=False)).train()
    x = torch.randn(8, 16)
    qmodel(x)
    assert torch.equal(prox.violations(), -torch.ones(2))  # same weights: distance 0
    prox.step_end()
    layer = dict(qmodel.layers())[qmodel.layer_names[0]]
    with torch.no_grad():
        layer.weight.add_(0.5)  # training moves the weights; the reference stays
    qmodel(x)
    assert float(prox.violations()[0]) > -1.0
