"""The one Scheme and the one Assignment: read from a model, written into one, serialized."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hmqsearch.errors import UserError
from hmqsearch.models.small_cnn import SmallCNN
from hmqsearch.quant.assignment import Assignment, LayerSchemes
from hmqsearch.quant.calibrate import calibrate_activations
from hmqsearch.quant.hmq import HMQQuantizer
from hmqsearch.quant.prepare import Pin, QuantSpec, prepare
from hmqsearch.quant.scheme import Scheme

SPEC = QuantSpec(weight_bits=[2, 4, 8], act_bits=[4, 8], pins=[Pin("linear", act_bits="float")])


def model(seed: int = 0, calibrate: bool = True):
    torch.manual_seed(seed)
    x = torch.randn(32, 1, 8, 8)
    qmodel = prepare(SmallCNN(in_channels=1, num_classes=10, width=16), SPEC, x[:8])
    if calibrate:
        calibrate_activations(qmodel, [x])
    return qmodel, x


def test_scheme_steps_container_and_dict_round_trip():
    s = Scheme(4, False, (3, 1), per_channel=True)
    assert s.steps.tolist() == [0.5, 0.125] and s.qrange == (0, 15) and s.container_bits == 4
    assert s.to_dict() == {"bits": 4, "signed": False, "per_channel": True, "threshold_exp": [3, 1],
                           "container": "uint4"}
    assert Scheme.from_dict(s.to_dict()) == s
    binary = Scheme(1, True, (0,))
    assert binary.steps.tolist() == [0.5] and binary.to_dict()["threshold_exp"] == 0
    assert Scheme.from_dict(binary.to_dict()) == binary
    assert Scheme(6, True, (2,)).at_bits(8) == Scheme(8, True, (2,))


def test_assignment_round_trips_through_its_dict_into_a_fresh_model():
    """Written into an uncalibrated model (other grids, all signed), the assignment reads back
    the same and the fixed models compute the same."""
    qmodel, x = model()
    for name, layer in qmodel.layers():
        layer.wq.fix(layer.wq.scheme_at(2 if name == "down" else 4, 2))
    assignment = Assignment.of(qmodel)
    assert assignment["linear"].input is None and assignment["down"].weight.bits == 2
    fresh, _ = model(calibrate=False)
    fresh.load_state_dict({k: v for k, v in qmodel.state_dict().items() if "wq" not in k and "aq" not in k},
                          strict=False)
    Assignment.from_dict(assignment.to_dict()).apply(fresh)
    assert Assignment.of(fresh) == assignment
    for m in (qmodel, fresh):
        m.set_state("fixed")
        m.eval()
    assert torch.equal(qmodel(x), fresh(x))


def test_assignment_is_immutable_and_compares_by_entries():
    qmodel, _ = model()
    a = Assignment.of(qmodel)
    with pytest.raises(TypeError):
        a["conv1"] = LayerSchemes(None, None)  # type: ignore[index]
    assert a == dict(a) and list(a) == [n for n, _ in qmodel.layers()]


def test_fix_keeps_the_other_logits_and_start_puts_the_initial_mass():
    q = HMQQuantizer([2, 4, 8], 4)
    q.set_range(torch.tensor(3.0))
    before = q.logits.detach().clone()
    q.fix(q.scheme_at(2, 3))
    changed = (q.logits.detach() != before).nonzero().tolist()
    assert changed == [[0, 3]] and q.chosen_index() == (0, 3)
    q.fix(q.scheme_at(4, 1), start=True)
    assert q.chosen_index() == (1, 1) and float(q.probs().detach()[4 + 1]) == pytest.approx(q.init_mass)
    with pytest.raises(ValueError, match="threshold index 4 is not on this grid"):
        q.scheme_at(2, 4)


def test_fix_recentres_thresholds_off_the_grid_and_takes_the_signedness():
    q = HMQQuantizer([4, 8], 4, per_channel_axis=0, num_channels=2)
    q.set_range(torch.tensor([1.0, 1.0]))  # M = 0: exponents 1, 0, -1, -2
    q.fix(Scheme(4, False, (5, -7), per_channel=True))
    assert q.argmax() == Scheme(4, False, (5, -7), per_channel=True)
    q.fix(Scheme(8, True, (3,)))  # one exponent for every channel
    assert q.argmax() == Scheme(8, True, (3, 3), per_channel=True)


def test_float_pinned_quantizer_has_no_scheme_and_stays_float():
    q = HMQQuantizer([8], 4, float_pinned=True)
    q.state = "fixed"
    x = torch.randn(5)
    assert q.state == "float" and torch.equal(q(x), x) and q.argmax() is None
    q.fix(None)
    with pytest.raises(ValueError, match="pinned to float"):
        q.fix(Scheme(8, True, (0,)))
    with pytest.raises(AttributeError):
        q.float_pinned = False  # type: ignore[misc]
    with pytest.raises(ValueError, match="float given"):
        HMQQuantizer([8], 4).fix(None)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("conv1"), r"src does not match the model: layers missing from it \['conv1'\]"),
    (lambda d: d["down"].update(weight={"bits": 3, "signed": True, "threshold_exp": [0] * 16}),
     r"src: down.weight: bits=3 is not a candidate here \(allowed \[2, 4, 8\]\)"),
    (lambda d: d["down"].update(weight={"bits": 4, "signed": True, "threshold_exp": [0, 1]}),
     r"src: down.weight: 2 threshold exponents for 16 channels"),
    (lambda d: d["down"].update(input={"bits": "float"}), r"src: down.input: float given"),
    (lambda d: d["linear"].update(input={"bits": 8, "signed": False, "threshold_exp": 0}),
     r"src: linear.input: 8 bits given but the tensor is pinned to float"),
    (lambda d: d["down"].update(weight={"bits": 4}), r"src: down.weight: malformed scheme"),
])
def test_a_bad_assignment_is_one_user_error_naming_its_source(edit, message):
    qmodel, _ = model()
    data = Assignment.of(qmodel).to_dict()
    edit(data)
    with pytest.raises(UserError, match=message):
        Assignment.from_dict(data, "src").apply(qmodel, "src")


def test_steps_are_exact_powers_of_two_as_float32():
    steps = Scheme(8, True, (-20, 0, 20), per_channel=True).steps
    assert steps.dtype == np.float32 and steps.tolist() == [2.0 ** -27, 2.0 ** -7, 2.0 ** 13]
