"""Model preparation on models it has never seen: folding, wrapping, names, pins, reuse."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hmqsearch.errors import UserError
from hmqsearch.quant.calibrate import calibrate_activations
from hmqsearch.quant.layers import QuantConv2d, QuantLinear
from hmqsearch.quant.prepare import Pin, QuantSpec, prepare


def randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


class NestedSequential(nn.Module):
    """Nested Sequentials with module ReLUs and a BatchNorm1d after the Linear."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 5))

    def forward(self, x):
        return self.head(self.features(x))


class Residual(nn.Module):
    """Functional ReLUs, a residual add, grouped and depthwise convolutions."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.dw_bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = x + self.grouped(F.relu(self.dw_bn(self.dw(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SharedLayer(nn.Module):
    """One convolution called twice, a BN that must not be folded, and data-dependent control flow."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)  # follows the shared conv on one call only
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.tanh(self.conv_in(x))
        x = self.bn(self.shared(x))
        x = self.shared(torch.tanh(x))
        return self.fc(x.mean((2, 3)))


MODELS = [NestedSequential, Residual, SharedLayer]


@pytest.fixture
def x():
    return torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("cls", MODELS)
def test_float_state_equals_original_after_folding(cls, x):
    torch.manual_seed(0)
    model = randomize_bn(cls())
    qmodel = prepare(model, QuantSpec(weight_bits=[8], act_bits=[8]), x)
    qmodel.set_state("float")
    assert torch.allclose(qmodel(x), model(x), atol=1e-5)


@pytest.mark.parametrize("cls", MODELS)
def test_8bit_outputs_close_to_float(cls, x):
    """At 8 bits with the tightest covering thresholds the logits move by < 3 % of their scale."""
    torch.manual_seed(0)
    model = randomize_bn(cls())
    qmodel = prepare(model, QuantSpec(weight_bits=[8], act_bits=[8], n_thresholds=2), x)
    calibrate_activations(qmodel, [x])
    for _, q in qmodel.quantizers():
        q.fix(q.scheme_at(8, 1))  # t = 2^M: the smallest power of two covering the range
    qmodel.set_state("fixed")
    ref, out = model(x), qmodel(x)
    assert (out - ref).abs().max() < 0.03 * ref.abs().max()


def test_folding_pairs_and_names():
    model = randomize_bn(NestedSequential())
    qmodel = prepare(model, QuantSpec(), torch.randn(2, 3, 8, 8))
    assert qmodel.folded == [("features.0.0", "features.0.1"), ("features.1.0", "features.1.1"), ("head.1", "head.2")]
    assert qmodel.layer_names == ["features.0.0", "features.1.0", "head.1", "head.4"]
    assert all(not isinstance(m, nn.BatchNorm2d) for m in qmodel.modules())


def test_depthwise_and_grouped_are_wrapped():
    qmodel = prepare(randomize_bn(Residual()), QuantSpec(), torch.randn(2, 3, 8, 8))
    layers = dict(qmodel.layers())
    assert isinstance(layers["dw"], QuantConv2d) and layers["dw"].groups == 8
    assert isinstance(layers["grouped"], QuantConv2d) and layers["grouped"].groups == 2
    assert isinstance(layers["fc"], QuantLinear)
    assert layers["dw"].shape.macs == 8 * 8 * 8 * 9  # one MAC per output element per tap


def test_shared_layer_is_one_quantized_module_called_twice(x):
    model = randomize_bn(SharedLayer())
    qmodel = prepare(model, QuantSpec(), x)
    assert qmodel.folded == []  # the BN follows only one of the two calls
    shared = dict(qmodel.layers())["shared"]
    assert shared.shape.calls == 2
    assert shared.shape.macs == 2 * 8 * 8 * 8 * 8 * 9


def test_first_layer_input_pinned_to_8_bits_and_pins_by_pattern():
    spec = QuantSpec(weight_bits=[2, 4, 8], act_bits=[4, 8], pins=[Pin("fc", weight_bits=8), Pin("dw", act_bits="float")])
    qmodel = prepare(randomize_bn(Residual()), spec, torch.randn(2, 3, 8, 8))
    layers = dict(qmodel.layers())
    assert qmodel.layer_names[0] == "stem"
    assert layers["stem"].aq.bits.tolist() == [8.0]
    assert layers["stem"].wq.bits.tolist() == [2.0, 4.0, 8.0]
    assert layers["fc"].wq.bits.tolist() == [8.0]
    assert layers["dw"].aq.float_pinned
    qmodel.set_state("fixed")
    y = torch.randn(2, 8, 4, 4)
    assert layers["dw"].aq(y) is y


def test_bad_specs_are_user_errors():
    with pytest.raises(UserError, match=r"search.weight_bits=\[0, 4\] contains \[0\]; allowed bit-widths are integers 1..8"):
        QuantSpec(weight_bits=[0, 4]).validate()
    with pytest.raises(UserError, match="search.act_bits is empty"):
        QuantSpec(act_bits=[]).validate()
    with pytest.raises(UserError, match="search.mode='soft'"):
        QuantSpec(mode="soft").validate()
