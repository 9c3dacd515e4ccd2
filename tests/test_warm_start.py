"""Where the search starts: the highest uniform weight bit-width, or the sensitivity allocation,
that meets the budgets."""

import json

import pytest
import torch
import yaml
from torch import nn

from hmqsearch.constrained.constraints import Constraint
from hmqsearch.constrained.warm_start import warm_start
from hmqsearch.cost import size
from hmqsearch.errors import UserError
from hmqsearch.quant.prepare import QuantSpec, prepare


def toy(init_mass=0.95):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 4))
    spec = QuantSpec(weight_bits=[2, 3, 4, 5, 6, 7, 8], act_bits=[4, 8], first_layer_act_bits=None, init_mass=init_mass)
    return prepare(net, spec, torch.randn(4, 64))


def size_constraint(qmodel, compression):
    return Constraint("weight_bytes", "bytes", size.float_weight_bytes(qmodel) / compression,
                      lambda: size.expected_weight_bytes(qmodel),
                      lambda: float(sum(size.exact_weight_bytes(qmodel).values())), size.min_weight_bytes(qmodel))


@pytest.mark.parametrize("compression", [4.5, 6.0, 8.5, 11.0])
def test_feasible_uniform_start_is_the_highest_uniform_width_within_budget(compression):
    qmodel = toy()
    c = size_constraint(qmodel, compression)
    start = warm_start(qmodel, [c], "feasible_uniform").bits
    (bits,) = set(start.values())
    assert set(start) == {name for name, _ in qmodel.layers()}
    assert c.satisfied()
    weight_bits = {layer.wq.argmax().bits for _, layer in qmodel.layers()}
    assert weight_bits == {bits}
    # one more bit everywhere would break the budget
    for _, layer in qmodel.layers():
        layer.wq.fix(layer.wq.scheme_at(bits + 1), start=True)
    assert not c.satisfied()


def test_start_keeps_the_lowest_mse_threshold_and_most_mass_on_the_start():
    qmodel = toy()
    warm_start(qmodel, [size_constraint(qmodel, 8.5)], "feasible_uniform")
    for _, layer in qmodel.layers():
        q = layer.wq
        b, j = q.chosen_index()
        assert float(q.bit_probs().detach()[b]) > 0.9
        assert j == int(q.candidate_mse(layer.weight.detach())[b].argmin())
        assert q.argmax().bits != 8  # activations untouched: still at their highest
        assert layer.aq.argmax().bits == 8


def test_highest_start_changes_nothing_and_bad_name_is_refused():
    qmodel = toy()
    before = [layer.wq.logits.detach().clone() for _, layer in qmodel.layers()]
    assert warm_start(qmodel, [size_constraint(qmodel, 8.5)], "highest") == (None, None)
    assert all(torch.equal(b, layer.wq.logits) for b, (_, layer) in zip(before, qmodel.layers()))
    with pytest.raises(UserError, match="search.start='lowest'; allowed: highest, feasible_uniform, sensitivity"):
        warm_start(qmodel, [], "lowest")


@pytest.mark.parametrize("init_mass", [0.3, 0.95])
def test_init_mass_is_the_start_candidates_probability(init_mass):
    qmodel = toy(init_mass)
    (bits,) = set(warm_start(qmodel, [size_constraint(qmodel, 8.5)], "feasible_uniform").bits.values())
    for _, layer in qmodel.layers():
        row = layer.wq.bits.tolist().index(bits)
        # the start candidate: the start width at its preferred threshold (inputs: the highest width)
        start = layer.wq.probs().detach().reshape(layer.wq.logits.shape)[row].max()
        assert float(start) == pytest.approx(init_mass, abs=1e-5)
        assert float(layer.aq.probs().reshape(layer.aq.logits.shape)[-1].max()) == pytest.approx(init_mass, abs=1e-5)


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5])
def test_init_mass_outside_0_1_is_refused(bad):
    with pytest.raises(UserError, match=rf"search.init_mass={bad}; allowed: a probability strictly between 0 and 1"):
        toy(bad)


def test_sensitivity_start_meets_the_budget_with_mixed_widths_and_mass_on_them():
    qmodel = toy()
    c = size_constraint(qmodel, 8.5)
    torch.manual_seed(1)
    start, sensitivity = warm_start(qmodel, [c], "sensitivity", [torch.randn(32, 64) for _ in range(2)])
    assert set(start) == {name for name, _ in qmodel.layers()}
    assert c.satisfied()
    for name, layer in qmodel.layers():
        assert layer.wq.argmax().bits == start[name]
        assert float(layer.wq.bit_probs().detach().max()) > 0.9
        assert layer.aq.argmax().bits == 8
    # the allocation came from this measurement: every candidate width, none below the reference
    assert set(sensitivity) == set(start)
    for row in sensitivity.values():
        assert set(row) == {2, 3, 4, 5, 6, 7, 8} and row[8] == 0.0 and min(row.values()) >= 0.0


def test_digits_run_starts_the_search_at_the_sensitivity_allocation(train_run):
    _, run_dir = train_run("pretrain.epochs=3", "search.epochs=1", "finetune.epochs=1", "logger=csv",
                           "export.enabled=false", "search.start=sensitivity", "budget.weight_compression=8")
    summary = json.loads((run_dir / "summary.json").read_text())
    start = summary["search_start_weight_bits"]
    layers = yaml.safe_load((run_dir / "precision.yaml").read_text())["layers"]
    assert set(start) == {name for name, layer in layers.items() if "bits" in layer["weight"]}
    assert set(start.values()) <= {2, 3, 4, 5, 6, 7, 8}
    assert summary["feasible"]
    assert "search starts at the sensitivity allocation" in (run_dir / "train.log").read_text()
    # the measurement behind the start is kept: in summary.json and as allocation.md / .png
    measured = summary["search_start_sensitivity"]
    assert set(measured) == set(start)
    assert all(set(row) == {str(b) for b in range(2, 9)} and row["8"] == 0.0 for row in measured.values())
    table = (run_dir / "allocation.md").read_text()
    for name, bits in start.items():
        line = next(row for row in table.splitlines() if row.startswith(f"| {name} |"))
        assert f"| {name} | {bits} |" in line and line.count("**") == 2
    assert (run_dir / "allocation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sensitivity_start_skips_the_measurement_when_only_the_lowest_widths_fit(monkeypatch):
    qmodel = toy()
    c = size_constraint(qmodel, 8.5)
    c.budget = c.minimum
    monkeypatch.setattr("hmqsearch.constrained.warm_start.measure_sensitivity",
                        lambda *a, **k: pytest.fail("measured although nothing is left to allocate"))
    start, sensitivity = warm_start(qmodel, [c], "sensitivity", [torch.randn(8, 64)])
    assert sensitivity is None
    assert set(start.values()) == {2}
    assert c.satisfied()
