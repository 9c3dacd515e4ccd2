"""Sensitivity-allocated start: measured layer sensitivity and the greedy knapsack on it."""

import itertools

import pytest
import torch
from torch import nn

from hmqsearch.constrained.allocation import allocate, measure_sensitivity, only_lowest_fits, start_search_at
from hmqsearch.constrained.constraints import Constraint
from hmqsearch.cost import size
from hmqsearch.quant.prepare import QuantSpec, prepare
from hmqsearch.report.allocation import write_allocation_report

BITS = [2, 3, 4, 5, 6, 7, 8]


def toy():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 4))
    spec = QuantSpec(weight_bits=BITS, act_bits=[4, 8], first_layer_act_bits=None)
    return prepare(net, spec, torch.randn(4, 64))


def size_constraint(qmodel, compression):
    return Constraint("weight_bytes", "bytes", size.float_weight_bytes(qmodel) / compression,
                      lambda: size.expected_weight_bytes(qmodel),
                      lambda: float(sum(size.exact_weight_bytes(qmodel).values())), size.min_weight_bytes(qmodel))


def weight_quantizers(qmodel):
    return {name: layer.wq for name, layer in qmodel.layers()}


def synthetic_sensitivity(qmodel, scale):
    """Sensitivity falling 4x per bit (quantization noise power), layer l weighted by scale[l]."""
    return {name: {b: scale[name] * (4.0 ** (8 - b) - 1.0) for b in BITS} for name, _ in qmodel.layers()}


def fits(quantizers, assignment, constraint):
    start_search_at(quantizers, assignment)
    return constraint.satisfied()


def total(sens, assignment):
    return sum(sens[name][b] for name, b in assignment.items())


def test_measured_sensitivity_is_zero_at_the_highest_width_and_grows_as_widths_drop():
    qmodel = toy()
    quantizers = weight_quantizers(qmodel)
    before = {n: q.logits.detach().clone() for n, q in quantizers.items()}
    states = [q.state for _, q in qmodel.quantizers()]
    qmodel.train()
    torch.manual_seed(1)
    sens = measure_sensitivity(qmodel, quantizers, [torch.randn(64, 64) for _ in range(2)])
    for name, by_bits in sens.items():
        assert by_bits[8] == 0.0
        assert by_bits[2] > by_bits[4] > by_bits[6] > 0.0, (name, by_bits)
    # the model is left as it was found
    assert all(torch.equal(before[n], q.logits) for n, q in quantizers.items())
    assert [q.state for _, q in qmodel.quantizers()] == states
    assert qmodel.training


def bn_toy(running_mean_shift: float):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 4))
    net.train()
    with torch.no_grad():
        for _ in range(20):
            net(torch.randn(64, 64))
        net[1].running_mean += running_mean_shift
    spec = QuantSpec(weight_bits=BITS, act_bits=[4, 8], first_layer_act_bits=None, fold_bn=False)
    return prepare(net, spec, torch.randn(4, 64))


def test_sensitivity_reads_batch_norm_statistics_reestimated_on_the_batches_and_leaves_the_stored_ones():
    torch.manual_seed(1)
    batches = [torch.randn(64, 64) for _ in range(2)]
    measured = {}
    for shift in (0.0, 3.0):  # stale statistics (a running mean 3 off) must not change the measurement
        qmodel = bn_toy(shift)
        qmodel.eval()
        norm = next(m for m in qmodel.modules() if isinstance(m, nn.BatchNorm1d))
        stored = {k: v.clone() for k, v in norm.state_dict().items()}
        measured[shift] = measure_sensitivity(qmodel, weight_quantizers(qmodel), batches)
        assert all(torch.equal(stored[k], v) for k, v in norm.state_dict().items())
        assert norm.momentum == 0.1 and not norm.training
    for name, by_bits in measured[0.0].items():
        for bits, kl in by_bits.items():
            assert measured[3.0][name][bits] == pytest.approx(kl, rel=1e-4, abs=1e-7), (name, bits)
        assert by_bits[2] > by_bits[4] > 0.0


@pytest.mark.parametrize("compression", [6.0, 8.5, 11.0])
def test_allocation_meets_the_budget_and_beats_the_best_uniform_width(compression):
    qmodel = toy()
    quantizers = weight_quantizers(qmodel)
    c = size_constraint(qmodel, compression)
    names = list(quantizers)
    # the middle layer (most weights) is the least sensitive per weight
    sens = synthetic_sensitivity(qmodel, {names[0]: 8.0, names[1]: 1.0, names[2]: 4.0})
    assignment = allocate(quantizers, [c], sens)
    assert c.satisfied()
    assert {n: q.argmax().bits for n, q in quantizers.items()} == assignment
    uniform = max(b for b in BITS if fits(quantizers, dict.fromkeys(names, b), c))
    assert total(sens, assignment) < total(sens, dict.fromkeys(names, uniform))
    assert assignment[names[1]] < assignment[names[0]]  # the budget goes to the sensitive layers


def test_allocation_is_the_exact_optimum_on_a_small_instance():
    qmodel = toy()
    quantizers = weight_quantizers(qmodel)
    c = size_constraint(qmodel, 8.5)
    names = list(quantizers)
    sens = synthetic_sensitivity(qmodel, {names[0]: 3.0, names[1]: 1.0, names[2]: 0.5})
    assignment = allocate(quantizers, [c], sens)
    feasible = []
    for combo in itertools.product(BITS, repeat=len(names)):
        if fits(quantizers, dict(zip(names, combo)), c):
            feasible.append(total(sens, dict(zip(names, combo))))
    assert total(sens, assignment) == pytest.approx(min(feasible))


def test_allocation_returns_none_when_no_widths_fit():
    qmodel = toy()
    quantizers = weight_quantizers(qmodel)
    c = size_constraint(qmodel, 8.5)
    c.budget = c.minimum * 0.5
    assert allocate(quantizers, [c], synthetic_sensitivity(qmodel, dict.fromkeys(quantizers, 1.0))) is None
    assert all(q.argmax().bits == 8 for q in quantizers.values())


def test_only_lowest_fits_when_no_single_raise_keeps_the_budget():
    qmodel = toy()
    quantizers = weight_quantizers(qmodel)
    tight = size_constraint(qmodel, 8.5)
    tight.budget = tight.minimum  # exactly all-2-bit
    assert only_lowest_fits(quantizers, [tight])
    assert all(q.argmax().bits == 2 for q in quantizers.values())
    assert not only_lowest_fits(quantizers, [size_constraint(qmodel, 8.5)])


def test_allocation_report_bolds_the_allocated_width_and_draws_a_table_without_any_error(tmp_path):
    measured = {"conv1": {2: 0.2, 4: 0.01, 8: 0.0}, "fc": {2: 0.03, 4: 0.002, 8: 0.0}}
    table, chart = write_allocation_report(measured, {"conv1": 4, "fc": 2}, tmp_path, "toy")
    lines = table.read_text().splitlines()
    assert "| conv1 | 4 | 0.2 | **0.01** | 0 |" in lines
    assert "| fc | 2 | **0.03** | 0.002 | 0 |" in lines
    assert chart.read_bytes()[:4] == b"\x89PNG"
    # no allocation and nothing above the reference: still a table and a chart, no bold cell
    table, chart = write_allocation_report({"fc": {8: 0.0}}, None, tmp_path / "empty")
    assert "| fc | - | 0 |" in table.read_text() and "**" not in table.read_text()
    assert chart.read_bytes()[:4] == b"\x89PNG"
