"""SPIQ: BN-derived input ranges, exact folding, dynamic baseline and ONNX export of a folded model."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from hmqsearch.export.onnx_export import build_onnx
from hmqsearch.quant.bn_ranges import input_ranges
from hmqsearch.quant.dynamic import DynamicInputQuantizer
from hmqsearch.quant.prepare import QuantSpec, prepare
from hmqsearch.quant.spiq import InputChannelScale, apply_spiq, channel_scales

MEAN, STD = (0.5, 0.25, 0.0), (0.25, 0.5, 1.0)


class Net(nn.Module):
    """conv-BN-ReLU, a residual block (conv-BN-ReLU, depthwise conv-BN, add, ReLU), pooling, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.dw, self.bn3 = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        y = self.bn3(self.dw(F.relu(self.bn2(self.conv2(x)))))
        x = F.relu(x + y)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


GAMMA1 = torch.tensor([1.0, -2.0, 0.5, 0.1])
BETA1 = torch.tensor([0.0, 1.0, -1.0, 0.5])


def make_net() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.bn1.weight.copy_(GAMMA1)
        net.bn1.bias.copy_(BETA1)
        for bn in (net.bn2, net.bn3):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        for bn in (net.bn1, net.bn2, net.bn3):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_bn_derived_ranges_on_a_hand_built_network() -> None:
    k = 3.0
    ranges = input_ranges(make_net(), MEAN, STD, k)
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    # network input: the normalised pixel range [-mean / std, (1 - mean) / std]
    assert torch.allclose(ranges["conv1"].lo, -mean / std)
    assert torch.allclose(ranges["conv1"].hi, (1 - mean) / std)
    # after BN + ReLU: [max(0, beta - k |gamma|), max(0, beta + k |gamma|)], unsigned
    r = ranges["conv2"]
    assert torch.allclose(r.hi, torch.tensor([3.0, 7.0, 0.5, 0.8]))
    assert torch.allclose(r.lo, torch.tensor([0.0, 0.0, 0.0, 0.2]))
    assert not r.signed and ranges["conv1"].signed
    # the depthwise conv's input: BN2 + ReLU of the same rule
    g2, b2 = make_net().bn2.weight.detach(), make_net().bn2.bias.detach()
    assert torch.allclose(ranges["dw"].hi, (b2 + k * g2.abs()).clamp(min=0))
    # after the residual add + ReLU, pooled: never beyond the sum of the two branches' ranges
    g3, b3 = make_net().bn3.weight.detach(), make_net().bn3.bias.detach()
    assert bool((ranges["fc"].hi <= r.hi + (b3 + k * g3.abs()).clamp(min=0) + 1e-6).all())
    assert bool((ranges["fc"].hi > 0).all()) and bool((ranges["fc"].lo >= 0).all())


def test_channel_scales_are_ratios_to_the_widest_channel() -> None:
    r = input_ranges(make_net(), MEAN, STD, 3.0)["conv2"]
    assert torch.allclose(channel_scales(r), torch.tensor([3.0, 7.0, 0.5, 0.8]) / 7.0)
    pot = channel_scales(r, power_of_two=True)
    assert torch.equal(pot, torch.tensor([0.5, 1.0, 0.125, 0.125]))


def test_folding_is_exact_in_float() -> None:
    """Folded model == unfolded model before any rounding (quantizers off)."""
    net = make_net()
    x = torch.randn(16, 3, 8, 8)
    qmodel = prepare(net, QuantSpec(weight_bits=[4, 8], act_bits=[4, 8]), x[:4])
    before = qmodel(x)
    weights = {name: layer.weight.detach().clone() for name, layer in qmodel.layers()}
    scales = apply_spiq(qmodel, input_ranges(net, MEAN, STD))
    after = qmodel(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    # the weights really changed, along the input-channel axis, and the scales are in the graph
    layers = dict(qmodel.layers())
    assert torch.allclose(layers["conv2"].weight, weights["conv2"] * scales["conv2"][None, :, None, None])
    assert torch.allclose(layers["dw"].weight, weights["dw"] * scales["dw"][:, None, None, None])
    assert torch.allclose(layers["fc"].weight, weights["fc"] * scales["fc"][None, :])
    assert sum(isinstance(m, InputChannelScale) for m in qmodel.modules()) == 4


def test_folded_input_grid_covers_every_scaled_channel() -> None:
    net = make_net()
    ranges = input_ranges(net, MEAN, STD)
    qmodel = prepare(net, QuantSpec(weight_bits=[8], act_bits=[8]), torch.randn(2, 3, 8, 8))
    apply_spiq(qmodel, ranges)
    for name, layer in qmodel.layers():
        widest = float(ranges[name].absmax.max())
        assert float(layer.aq.base_exp[0]) == math.ceil(math.log2(widest))
        assert layer.aq.signed == ranges[name].signed


def test_dynamic_quantizer_uses_each_batch_range() -> None:
    q = DynamicInputQuantizer(4)
    small, large = torch.linspace(0, 1, 16), torch.linspace(0, 8, 16)
    assert torch.equal(q(small), torch.round(small / (1 / 16)).clamp(0, 15) * (1 / 16))
    assert torch.equal(q(large), torch.round(large / 0.5).clamp(0, 15) * 0.5)
    signed = torch.tensor([-1.0, 0.3, 0.9])
    assert torch.equal(q(signed), torch.round(signed / 0.125).clamp(-8, 7) * 0.125)


def test_spiq_folded_model_exports_to_onnx_and_agrees(tmp_path) -> None:
    net = make_net()
    x = torch.randn(32, 3, 8, 8)
    qmodel = prepare(net, QuantSpec(weight_bits=[8], act_bits=[8], first_layer_act_bits=8), x[:4])
    scales = apply_spiq(qmodel, input_ranges(net, MEAN, STD))
    for _, layer in qmodel.layers():
        layer.wq.fix(layer.wq.scheme_at(8, 1))
        layer.aq.fix(layer.aq.scheme_at(8, 1))
    qmodel.set_state("fixed")
    qmodel.eval()
    built = build_onnx(qmodel, x, form="portable")
    graph = built.model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    # the folding is visible: per-channel Mul before each input quantizer, per-channel weight scales
    muls = [n for n in graph.node if n.op_type == "Mul" and any(inits.get(i, np.zeros(0)).size in (3, 4) for i in n.input)]
    assert len(muls) == 4
    inv = [inits[i].reshape(-1) for n in muls for i in n.input if i in inits]
    assert any(v.shape == (4,) and np.allclose(v, 1 / scales["conv2"].numpy()) for v in inv)
    wdq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.name.endswith("weight_dequantized")]
    assert len(wdq) == 4 and all(inits[n.input[1]].size == inits[n.input[0]].shape[0] for n in wdq)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(built.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = qmodel(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    onnx.checker.check_model(built.model)
