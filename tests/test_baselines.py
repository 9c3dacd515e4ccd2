"""Fixed-precision methods in the search's harness: precision parsing, threshold rules, fixed assignments."""

import math

import pytest
import torch

from hmqsearch.errors import UserError
from hmqsearch.methods import PTQ, HMQSearch, Method, Precision, Prepared, UniformQAT, by_name
from hmqsearch.models.small_cnn import SmallCNN
from hmqsearch.quant.calibrate import calibrate_activations
from hmqsearch.quant.prepare import QuantSpec, prepare


def test_methods_read_precision_and_reject_bad_values():
    assert UniformQAT("w4a8") == by_name("uniform", precision="W4A8") and UniformQAT("w4a8").precision == Precision(4, 8)
    assert by_name("hmq") == HMQSearch() and HMQSearch().precision is None
    for make, fragment in (
        (lambda: PTQ("W9A8"), "method.precision='W9A8'"),
        (lambda: PTQ(None), "expected WxAy"),
        (lambda: by_name("random", precision="W4A4"), "method='random'; allowed: hmq, uniform, ptq, spiq"),
    ):
        with pytest.raises(UserError, match=fragment):
            make()


def _prepared(method: Method):
    torch.manual_seed(0)
    net, x = SmallCNN(), torch.randn(32, 1, 8, 8)
    spec = method.quant_spec(QuantSpec(weight_bits=[2, 4, 8], act_bits=[4, 8]))
    qmodel = prepare(net, spec, x[:4])
    calibrate_activations(qmodel, [x])
    method.assign(Prepared(qmodel, net, [x]))
    qmodel.set_state("fixed")
    return qmodel, x


@pytest.mark.parametrize("method", [UniformQAT("W2A4"), PTQ("W4A8")], ids=["uniform", "ptq"])
def test_every_quantizer_gets_the_fixed_precision(method: Method):
    qmodel, _ = _prepared(method)
    for i, (name, layer) in enumerate(qmodel.layers()):
        assert layer.wq.argmax().bits == method.weight_bits, name
        assert layer.aq.argmax().bits == (8 if i == 0 else method.act_bits), name  # first input pinned to 8


def test_ptq_thresholds_are_the_smallest_powers_of_two_covering_the_range():
    qmodel, _ = _prepared(PTQ("W4A8"))
    for name, layer in qmodel.layers():
        absmax = layer.weight.detach().abs().reshape(layer.weight.shape[0], -1).amax(1)
        expected = [math.ceil(math.log2(float(a))) for a in absmax]
        assert list(layer.wq.argmax().threshold_exp) == expected, name


def test_uniform_thresholds_are_the_lowest_mse_candidates():
    qmodel, _ = _prepared(UniformQAT("W2A8"))
    for name, layer in qmodel.layers():
        mse = layer.wq.candidate_mse(layer.weight.detach())[0]  # the single bit-width row
        assert layer.wq.chosen_index() == (0, int(mse.argmin())), name
