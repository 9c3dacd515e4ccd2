"""Where the search starts: the highest uniform weight bit-width that meets the budgets."""

import pytest
import torch
from torch import nn

from hmqsearch.constrained.constraints import Constraint
from hmqsearch.constrained.warm_start import warm_start
from hmqsearch.cost import size
from hmqsearch.errors import UserError
from hmqsearch.quant.prepare import QuantSpec, prepare


def toy():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 4))
    spec = QuantSpec(weight_bits=[2, 3, 4, 5, 6, 7, 8], act_bits=[4, 8], first_layer_act_bits=None)
    return prepare(net, spec, torch.randn(4, 64))


def size_constraint(qmodel, compression):
    return Constraint("weight_bytes", "bytes", size.float_weight_bytes(qmodel) / compression,
                      lambda: size.expected_weight_bytes(qmodel),
                      lambda: float(sum(size.exact_weight_bytes(qmodel).values())), size.min_weight_bytes(qmodel))


@pytest.mark.parametrize("compression", [4.5, 6.0, 8.5, 11.0])
def test_feasible_uniform_start_is_the_highest_uniform_width_within_budget(compression):
    qmodel = toy()
    c = size_constraint(qmodel, compression)
    bits = warm_start(qmodel, [c], "feasible_uniform")
    assert c.satisfied()
    weight_bits = {layer.wq.scheme().bits for _, layer in qmodel.layers()}
    assert weight_bits == {bits}
    # one more bit everywhere would break the budget
    for _, layer in qmodel.layers():
        layer.wq.start_at(bits + 1)
    assert not c.satisfied()


def test_start_keeps_the_lowest_mse_threshold_and_most_mass_on_the_start():
    qmodel = toy()
    warm_start(qmodel, [size_constraint(qmodel, 8.5)], "feasible_uniform")
    for _, layer in qmodel.layers():
        q = layer.wq
        b, j = q.chosen_index()
        assert float(q.bit_probs().detach()[b]) > 0.9
        assert j == int(q.candidate_mse(layer.weight.detach())[b].argmin())
        assert q.scheme().bits != 8  # activations untouched: still at their highest
        assert layer.aq.scheme().bits == 8


def test_highest_start_changes_nothing_and_bad_name_is_refused():
    qmodel = toy()
    before = [layer.wq.logits.detach().clone() for _, layer in qmodel.layers()]
    assert warm_start(qmodel, [size_constraint(qmodel, 8.5)], "highest") is None
    assert all(torch.equal(b, layer.wq.logits) for b, (_, layer) in zip(before, qmodel.layers()))
    with pytest.raises(UserError, match="search.start='lowest'; allowed: highest, feasible_uniform"):
        warm_start(qmodel, [], "lowest")
