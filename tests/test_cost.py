"""Cost models against hand counts, and their expectations' gradients."""

import pytest
import torch
from torch import nn

from hmqsearch.cost import latency as lat
from hmqsearch.cost import size
from hmqsearch.quant.hmq import argmax_costs
from hmqsearch.quant.prepare import QuantSpec, prepare


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)  # 216 weights, 8 channels
        self.fc = nn.Linear(8, 4)  # 32 weights + 4 biases

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.fixture
def qmodel():
    spec = QuantSpec(weight_bits=[2, 3, 4, 8], act_bits=[4, 8], first_layer_act_bits=None)
    return prepare(Tiny(), spec, torch.randn(2, 3, 4, 4))


def fix(qmodel, conv_w, fc_w, conv_a=8, fc_a=8):
    for name, wb, ab in (("conv", conv_w, conv_a), ("fc", fc_w, fc_a)):
        layer = dict(qmodel.layers())[name]
        layer.wq.fix(layer.wq.scheme_at(wb))
        layer.aq.fix(layer.aq.scheme_at(ab))


def at_argmax(qmodel):
    """Expected costs under a one-hot distribution on every quantizer's argmax."""
    return argmax_costs(q for _, q in qmodel.quantizers())


def test_packed_and_container_bytes_by_hand(qmodel):
    fix(qmodel, conv_w=3, fc_w=4)
    packed = size.exact_weight_bytes(qmodel, "packed")
    # conv: ceil(216 * 3 / 8) = 81 bytes; fc: 32 * 4 / 8 = 16
    assert packed == {"conv": 81, "fc": 16}
    # 3 bits are stored as int4: 108 bytes; fc int4: 16
    assert size.exact_weight_bytes(qmodel, "container") == {"conv": 108, "fc": 16}
    # scales: 8 + 4 int8 exponents (packed) or float32 (container); fc bias 4 * 4
    assert size.overhead_bytes(qmodel, "packed") == 12 + 16
    assert size.overhead_bytes(qmodel, "container") == 48 + 16
    assert size.float_weight_bytes(qmodel) == 4 * 216 + 4 * 32
    assert size.min_weight_bytes(qmodel) == 54 + 8


def test_expected_bytes_equal_exact_at_one_hot_and_have_gradient(qmodel):
    fix(qmodel, conv_w=8, fc_w=2)
    with at_argmax(qmodel):
        exp = size.expected_weight_bytes(qmodel)
    assert exp.item() == pytest.approx(sum(size.exact_weight_bytes(qmodel).values()), rel=1e-6)
    for _, q in qmodel.quantizers():
        q.reset_logits()
    exp = size.expected_weight_bytes(qmodel)
    exp.backward()
    grad = dict(qmodel.layers())["conv"].wq.logits.grad
    assert grad[-1].sum() > 0 and grad[0].sum() < 0  # more mass on 8 bits costs bytes


def test_analytic_latency_by_hand(qmodel):
    target = lat.Target("toy", int8_macs_per_s=1e6, bytes_per_s=1e6)
    table = lat.analytic_table(qmodel, target)
    # fc at W4A8: 32 MACs; compute 32*4*8/(64e6) s = 2 us; memory (16 + 8 + 4) bytes / 1e6 = 28 us
    assert table.lookup("fc", 4, 8) == pytest.approx(1e3 * 28e-6)
    # conv at W8A8: 16 outputs * 8 channels * 27 MACs = 3456 MACs -> 3456 us; memory 216+48+128 = 392 us
    assert table.lookup("conv", 8, 8) == pytest.approx(1e3 * 3456e-6)
    fix(qmodel, conv_w=8, fc_w=4)
    exact = lat.exact_latency(qmodel, table)
    assert exact == {"conv": pytest.approx(3.456), "fc": pytest.approx(0.028)}
    with at_argmax(qmodel):
        assert lat.expected_latency(qmodel, table).item() == pytest.approx(3.484, rel=1e-5)


def test_expected_latency_gradient_and_table_round_trip(qmodel, tmp_path):
    table = lat.analytic_table(qmodel, lat.Target("toy", 1e6, 1e6))
    lat.expected_latency(qmodel, table).backward()
    assert dict(qmodel.layers())["conv"].aq.logits.grad.abs().sum() > 0
    table.save(tmp_path / "t.json")
    again = lat.LatencyTable.load(tmp_path / "t.json")
    assert again.ms == table.ms and again.source == "analytic:toy"


def test_bops_and_activation_memory_by_hand(qmodel):
    """Tiny on 3x4x4: conv 8 * 16 outputs x 27 MACs = 3456 MACs, input 48 values; fc 32 MACs, input 8."""
    from hmqsearch.cost import compute

    fix(qmodel, conv_w=3, fc_w=8, conv_a=4, fc_a=8)
    assert compute.exact_bops(qmodel) == 3456 * 3 * 4 + 32 * 8 * 8
    assert compute.float_bops(qmodel) == (3456 + 32) * 32 * 32
    assert compute.min_bops(qmodel) == 3456 * 2 * 4 + 32 * 2 * 4
    assert compute.exact_activation_bytes(qmodel) == max(48 * 4 / 8, 8 * 8 / 8)
    assert compute.min_activation_bytes(qmodel) == 48 * 4 / 8
    with at_argmax(qmodel):  # all the mass on the argmax: the expectations equal the exact costs
        assert float(compute.expected_bops(qmodel).detach()) == pytest.approx(compute.exact_bops(qmodel), rel=1e-4)
        assert float(compute.expected_activation_bytes(qmodel).detach()) == pytest.approx(24.0, rel=1e-4)


def test_bops_budget_pushes_inputs_and_an_unreachable_one_is_refused(qmodel):
    from hmqsearch.constrained.budgets import BudgetSpec, build_constraints
    from hmqsearch.errors import UserError

    for _, q in qmodel.quantizers():
        q.reset_logits()
    [c] = build_constraints(qmodel, BudgetSpec(weight_compression=None, bops_compression=64), None)
    assert c.name == "bops" and c.budget == pytest.approx((3456 + 32) * 1024 / 64)
    c.violation().backward()
    conv_input = dict(qmodel.layers())["conv"].aq
    bits_grad = conv_input.logits.grad.sum(1)  # d violation / d row logits: 4 bits (row 0) down, 8 up
    assert bits_grad[0] < 0 < bits_grad[1]
    with pytest.raises(UserError, match="bops budget .* cannot be met"):
        build_constraints(qmodel, BudgetSpec(weight_compression=None, bops_compression=1000), None)
    with pytest.raises(UserError, match="budget.activation_kb=-1"):
        build_constraints(qmodel, BudgetSpec(activation_kb=-1), None)
