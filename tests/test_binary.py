"""1-bit weights: the symmetric binary grid, its gradients, its cost, packing and ONNX export."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from hmqsearch.cost.size import exact_weight_bytes, expected_weight_bytes
from hmqsearch.export.deployed import deployed_layers
from hmqsearch.export.intpack import pack, unpack
from hmqsearch.export.onnx_export import export_onnx
from hmqsearch.export.packed import load_packed, save_packed
from hmqsearch.models.small_cnn import SmallCNN
from hmqsearch.quant.calibrate import calibrate_activations
from hmqsearch.quant.functional import binary_quant, quantize_to_int
from hmqsearch.quant.hmq import HMQQuantizer, argmax_costs
from hmqsearch.quant.prepare import QuantSpec, prepare

ARCH = {"_target_": "hmqsearch.models.small_cnn.SmallCNN", "in_channels": 1, "num_classes": 10, "width": 16}
SHAPE = (1, 8, 8)


def binary_quantizer(channels: int = 3, bits=(1, 2, 4, 8)) -> HMQQuantizer:
    q = HMQQuantizer(list(bits), 4, signed=True, per_channel_axis=0, num_channels=channels)
    q.set_range(torch.tensor([2.4, 0.9, 1.5][:channels]))  # M = 2, 0, 1: thresholds 2^(M+1-j)
    return q


def test_binary_levels_are_plus_minus_half_the_threshold_per_channel():
    q = binary_quantizer()
    q.fix(q.scheme_at(1, 2))  # j = 2: t = 2^(M-1) = 2, 0.5, 1
    q.state = "fixed"
    w = torch.tensor([[0.3, -0.1, 0.0, -5.0], [0.01, -2.0, 0.2, 0.0], [-0.7, 0.7, 9.0, -0.0]])
    out = q(w)
    step = torch.tensor([1.0, 0.25, 0.5])[:, None]
    assert torch.equal(out, torch.where(w >= 0, step, -step))  # +t/2 at and above 0, -t/2 below
    assert q.argmax().bits == 1 and torch.equal(torch.from_numpy(q.argmax().steps), step.flatten())
    assert set(out.unique().abs().tolist()) <= {1.0, 0.25, 0.5}


def test_binary_straight_through_gradient_inside_the_threshold_only():
    w = torch.tensor([-3.0, -1.9, -0.5, 0.0, 0.5, 1.9, 3.0], requires_grad=True)
    step = torch.tensor(1.0, requires_grad=True)  # t = 2
    binary_quant(w, step).sum().backward()
    assert torch.equal(w.grad, torch.tensor([0.0, 1, 1, 1, 1, 1, 0]))
    assert step.grad == (torch.where(w >= 0, 1.0, -1.0)).sum()  # d out / d step = the sign


def test_binary_codes_are_the_sign():
    x = torch.tensor([-0.2, 0.0, 0.3, -7.0])
    assert quantize_to_int(x, torch.tensor(0.5), 1, True).tolist() == [-1, 1, 1, -1]
    assert quantize_to_int(x, torch.tensor(0.5), 1, False).tolist() == [0, 0, 1, 0]  # unsigned 1 bit: {0, 1}


def test_relaxed_forward_with_all_mass_on_one_bit_is_the_binary_quantizer():
    q = binary_quantizer()
    with torch.no_grad():  # all the mass on (1 bit, t_2)
        q.logits.fill_(0.0)
        q.logits[0, 2] = 20.0
    q.state, q.mode = "search", "expected"
    q.train()
    q.tau.fill_(1e-3)
    w = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    relaxed = q(w)
    q.state = "fixed"
    assert torch.allclose(relaxed, q(w), atol=1e-5)


@pytest.mark.parametrize("mode", ["expected", "mixture", "hard", "argmax"])
def test_relaxed_forward_sends_gradients_to_weights_and_logits(mode):
    q = binary_quantizer()
    q.state, q.mode = "search", mode
    q.train()
    with torch.no_grad():
        q.logits.zero_()
    w = torch.randn(3, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = q(w)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    assert torch.isfinite(q.logits.grad).all() and q.logits.grad.abs().sum() > 0


def test_one_bit_only_quantizer_searches_thresholds_without_nan():
    q = binary_quantizer(bits=(1,))
    q.state = "search"
    q.train()
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    q(w).sum().backward()
    assert torch.isfinite(w.grad).all() and torch.isfinite(q.logits.grad).all()


def test_lowest_mse_binary_threshold_is_near_the_mean_magnitude():
    w = torch.randn(1, 4096, generator=torch.Generator().manual_seed(3))
    q = HMQQuantizer([1], 8, signed=True, per_channel_axis=0, num_channels=1)
    q.set_range(w.abs().max())
    q.init_from_data(w)
    q.fix(q.scheme_at(1))
    level = float(q.argmax().steps[0])
    assert level in (0.5, 1.0)  # the powers of two around E|w| = 0.80 for a unit normal


def binary_model():
    torch.manual_seed(0)
    net = SmallCNN(in_channels=1, num_classes=10, width=16)
    x = torch.randn(64, *SHAPE)
    spec = QuantSpec(weight_bits=[1, 2, 4, 8], act_bits=[4, 8])
    qmodel = prepare(net, spec, x[:8])
    calibrate_activations(qmodel, [x])
    for name, layer in qmodel.layers():
        if not layer.wq.float_pinned:
            layer.wq.fix(layer.wq.scheme_at(1 if name != "conv1" else 4, 3))
        if not layer.aq.float_pinned:
            layer.aq.fix(layer.aq.scheme_at(8, 0))
    qmodel.set_state("fixed")
    return qmodel.eval(), spec, x


def test_one_bit_layers_cost_one_bit_per_weight():
    qmodel, _, _ = binary_model()
    exact = exact_weight_bytes(qmodel, "packed")
    for name, layer in qmodel.layers():
        if name != "conv1":
            assert exact[name] == -(-layer.weight.numel() // 8)
    with argmax_costs(q for _, q in qmodel.quantizers()):  # the expected cost of the fixed assignment
        assert float(expected_weight_bytes(qmodel).detach()) == pytest.approx(sum(exact.values()), rel=1e-3)
    container = exact_weight_bytes(qmodel, "container")
    assert container["down"] == -(-dict(qmodel.layers())["down"].weight.numel() * 4 // 8)  # int4 in the graph


def test_one_bit_pack_rejects_zero():
    with pytest.raises(ValueError, match="binary grid"):
        pack(np.array([1, 0, -1]), 1, True)
    assert unpack(pack(np.array([1, -1, -1]), 1, True), 3, 1, True).tolist() == [1, -1, -1]


def test_one_bit_model_packs_reloads_and_exports_exactly(tmp_path):
    qmodel, spec, x = binary_model()
    for d in deployed_layers(qmodel):
        if d.wscheme is not None and d.wscheme.bits == 1:
            assert set(np.unique(d.codes).tolist()) == {-1, 1}
    with torch.no_grad():
        ref = qmodel(x).numpy()
    save_packed(tmp_path / "m.packed", qmodel, arch=ARCH, spec=spec, example=torch.zeros(1, *SHAPE))
    loaded = load_packed(tmp_path / "m.packed.safetensors")
    with torch.no_grad():
        assert np.array_equal(loaded(x).numpy(), ref)
    for form in ("portable", "onnxruntime"):
        info = export_onnx(qmodel, tmp_path / f"{form}.onnx", x, form=form)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(info.path), opts, providers=["CPUExecutionProvider"])
        out = sess.run(None, {"input": x.numpy()})[0]
        assert (out.argmax(1) == ref.argmax(1)).all()
        assert np.abs(out - ref).max() < 1e-4
