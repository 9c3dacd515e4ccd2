"""ONNX deployment graph: lossless Q/DQ export, verification, the export stage and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto
from torch import nn

from hmqsearch.cli import main as cli_main
from hmqsearch.cost.size import exact_weight_bytes, overhead_bytes
from hmqsearch.errors import UserError
from hmqsearch.export.deploy import export_quantized
from hmqsearch.export.deployed import deployed_layers
from hmqsearch.export.onnx_export import OPSET, build_onnx, export_onnx
from hmqsearch.export.verify import VerificationError, fail_export, random_loader, verify_onnx
from hmqsearch.quant.calibrate import calibrate_activations
from hmqsearch.quant.prepare import Pin, QuantModel, QuantSpec, prepare

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (3, 16, 16)


class TinyNet(nn.Module):
    """Stem, an inverted residual (1x1, depthwise 3x3, 1x1, residual add), an option-A
    shortcut (strided slice + channel F.pad) beside a stride-2 conv, pooling, Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        x = F.relu(self.down(x) + short)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _randomize_bn(net: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)


def make_qmodel(
    bits: dict[str, tuple[int | None, int | None]], pins: list[Pin] | None = None, fold_bn: bool = True
) -> QuantModel:
    """TinyNet prepared, calibrated on random data, with ``bits[layer] = (weight, input)`` fixed."""
    torch.manual_seed(0)
    net = TinyNet()
    _randomize_bn(net)
    x = torch.randn(64, *SHAPE)
    spec = QuantSpec(weight_bits=[2, 3, 4, 5, 6, 7, 8], act_bits=[2, 4, 6, 8], pins=pins or [],
                     first_layer_act_bits=None, fold_bn=fold_bn)
    qmodel = prepare(net, spec, x[:8])
    calibrate_activations(qmodel, [x])
    for name, layer in qmodel.layers():
        wb, ab = bits.get(name, (8, 8))
        if wb is not None and not layer.wq.float_pinned:
            layer.wq.fix(layer.wq.scheme_at(wb, 1))
        if ab is not None and not layer.aq.float_pinned:
            layer.aq.fix(layer.aq.scheme_at(ab, 0))
    qmodel.set_state("fixed")
    return qmodel.eval()


MIXED = {  # int8 / int4 / 3- and 6-bit (restricted containers) / float
    "stem.0": (8, 8), "expand.0": (4, 8), "dw.0": (3, 4), "project.0": (6, 6), "down.0": (2, 8),
}
MIXED_PINS = [Pin("head", weight_bits="float", act_bits="float")]


@pytest.fixture(scope="module")
def int8_model() -> QuantModel:
    return make_qmodel({})


def signed4_after_relu_model() -> QuantModel:
    """A signed int4 quantizer right after a ReLU (onnxruntime would drop that ReLU)."""
    qmodel = make_qmodel({"project.0": (8, 4), "expand.0": (8, 4)})
    layers = dict(qmodel.layers())
    layers["project.0"].aq.signed = True
    layers["expand.0"].aq.signed = True
    return qmodel


@pytest.fixture(scope="module")
def mixed_model() -> QuantModel:
    return make_qmodel(MIXED, MIXED_PINS)


def _session(path: Path | bytes, optimized: bool, opt_path: Path | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    if not optimized:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if opt_path is not None:
        opts.optimized_model_filepath = str(opt_path)
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), opts, providers=["CPUExecutionProvider"])


def _logits(qmodel: QuantModel, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return qmodel(x).numpy()


@pytest.mark.parametrize("form", ["onnxruntime", "portable"])
@pytest.mark.parametrize("which", ["int8", "mixed", "signed4"])
def test_graph_is_valid_and_agrees_with_pytorch(tmp_path, int8_model, mixed_model, which, form):
    qmodel = {"int8": int8_model, "mixed": mixed_model}.get(which) or signed4_after_relu_model()
    x = torch.randn(128, *SHAPE, generator=torch.Generator().manual_seed(1))
    info = export_onnx(qmodel, tmp_path / "m.onnx", x, form=form)
    model = onnx.load(str(info.path))
    onnx.checker.check_model(model, full_check=True)
    assert next(o.version for o in model.opset_import if o.domain == "") >= OPSET
    assert not [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    ref = _logits(qmodel, x)
    for optimized in (False, True):
        out = _session(info.path, optimized).run(None, {"input": x.numpy()})[0]
        assert (out.argmax(1) == ref.argmax(1)).mean() == 1.0
        # float32 accumulation order only: the biases lie on the s_x * s_w grid, so the
        # integer kernels' int32 bias and requantization reproduce PyTorch exactly
        assert np.abs(out - ref).max() < 1e-4


def test_quantized_values_are_bit_identical(tmp_path, mixed_model):
    """Every weight DequantizeLinear and every activation QuantizeLinear equals PyTorch exactly."""
    model = build_onnx(mixed_model, torch.zeros(1, *SHAPE), form="portable").model
    wanted = {}
    for name, layer in mixed_model.layers():
        if not layer.wq.float_pinned:
            wanted[f"{name}.weight_dequantized"] = layer.quantized_weight().detach().numpy()
    captured: dict[str, np.ndarray] = {}
    hooks = [
        layer.aq.register_forward_hook(lambda m, i, o, n=name: captured.__setitem__(f"{n}.input_dequantized", o.detach().numpy()))
        for name, layer in mixed_model.layers() if not layer.aq.float_pinned
    ]
    x = torch.randn(32, *SHAPE, generator=torch.Generator().manual_seed(2))
    try:
        _logits(mixed_model, x)
    finally:
        for h in hooks:
            h.remove()
    wanted.update(captured)
    for name in wanted:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    outs = _session(model.SerializeToString(), optimized=False).run(list(wanted), {"input": x.numpy()})
    for (name, expected), got in zip(wanted.items(), outs):
        assert np.array_equal(got, expected), name


def test_containers_zero_points_and_float_pins(mixed_model):
    built = build_onnx(mixed_model, torch.zeros(1, *SHAPE), form="portable")
    model = built.model
    inits = {i.name: i for i in model.graph.initializer}
    dtype = lambda n: inits[n].data_type  # noqa: E731
    assert dtype("stem.0.weight_quantized") == TensorProto.INT8
    assert dtype("expand.0.weight_quantized") == TensorProto.INT4
    assert dtype("dw.0.weight_quantized") == TensorProto.INT4  # 3 bits inside an int4
    assert dtype("project.0.weight_quantized") == TensorProto.INT8  # 6 bits inside an int8
    assert dtype("head.weight") == TensorProto.FLOAT
    layers = dict(mixed_model.layers())
    for name in ("stem.0", "expand.0", "dw.0", "project.0", "down.0"):
        zp = onnx.numpy_helper.to_array(inits[f"{name}.input_zero_point"])
        assert int(np.asarray(zp).max()) == 0
        signed, bits = layers[name].aq.signed, layers[name].aq.argmax().bits
        want = {(True, 8): TensorProto.INT8, (False, 8): TensorProto.UINT8,
                (True, 4): TensorProto.INT4, (False, 4): TensorProto.UINT4}[(signed, 8 if bits > 4 else 4)]
        assert dtype(f"{name}.input_zero_point") == want
        scale = float(onnx.numpy_helper.to_array(inits[f"{name}.input_scale"]))
        assert scale == 2.0 ** round(np.log2(scale))  # power of two
    assert {dtype("expand.0.input_zero_point"), dtype("dw.0.input_zero_point")} & {TensorProto.UINT8, TensorProto.UINT4}
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Clip") >= 1  # 6-bit activations of project.0 inside an int8
    assert "head.input_quantized" not in {o for n in model.graph.node for o in n.output}
    # integer weights at their container width; float32 scales and biases beside them
    container = sum(exact_weight_bytes(mixed_model, "container").values())
    assert abs(built.weight_bytes - container) <= 0.1 * container
    assert built.overhead_bytes == overhead_bytes(mixed_model, "container")


def test_fixed_layers_add_their_bias_on_the_accumulator_grid(mixed_model):
    """As integer kernels do: an int32 bias in units of s_x * s_w (float inputs keep the float bias)."""
    for name, layer in mixed_model.layers():
        bias = layer.effective_bias().detach()
        if layer.aq.float_pinned or layer.wq.float_pinned:
            assert torch.equal(bias, layer.bias.detach()), name
            continue
        units = bias / (layer.aq.discrete_steps() * layer.wq.discrete_steps())
        assert torch.equal(units, torch.round(units)), name


def test_onnxruntime_runs_the_predicted_integer_kernels(tmp_path, int8_model):
    info = export_onnx(int8_model, tmp_path / "m.onnx", torch.zeros(1, *SHAPE))
    assert info.integer_kernel_layers  # expand.0 -> ReLU6 is not, dw.0 -> ReLU -> project's quantizer is
    _session(info.path, optimized=True, opt_path=tmp_path / "opt.onnx")
    optimized = onnx.load(str(tmp_path / "opt.onnx"))
    assert sum(n.op_type == "QLinearConv" for n in optimized.graph.node) == len(info.integer_kernel_layers)


def test_batch_norm_kept_while_training_is_folded_into_the_graph(tmp_path):
    """search.fold_bn=false: no BatchNormalization in the graph; each BN multiplies its layer's
    per-channel weight scales, the integer codes stay the trained ones, and onnxruntime with
    its integer kernels agrees with the PyTorch model (left in, onnxruntime fused the BN into
    a float weight and re-quantized it per tensor)."""
    qmodel = make_qmodel({"expand.0": (4, 8), "down.0": (2, 8)}, fold_bn=False)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in qmodel.net.modules()) == 5
    with torch.no_grad():
        qmodel.net.stem[1].weight[:3] *= -1  # negative gamma: a negative weight scale
    x = torch.randn(256, *SHAPE, generator=torch.Generator().manual_seed(1))
    info = export_onnx(qmodel, tmp_path / "m.onnx", x)
    model = onnx.load(str(info.path))
    onnx.checker.check_model(model, full_check=True)
    assert not [n.name for n in model.graph.node if n.op_type == "BatchNormalization"]
    stored = {i.name: i for i in model.graph.initializer}
    for d in deployed_layers(qmodel):
        if d.codes is not None and d.wscheme.container_bits == 8:
            assert np.array_equal(onnx.numpy_helper.to_array(stored[f"{d.name}.weight_quantized"]), d.codes)
    bn = qmodel.net.stem[1]
    g = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    stem = next(d for d in deployed_layers(qmodel) if d.name == "stem.0")
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(stored["stem.0.weight_scale"]).reshape(-1),
                                  (stem.wscheme.steps * g).astype(np.float32))
    assert info.integer_kernel_layers
    ref = _logits(qmodel, x)
    for optimized in (False, True):
        out = _session(info.path, optimized).run(None, {"input": x.numpy()})[0]
        assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.99
        assert np.abs(out - ref).mean() < 1e-3


def test_verification_failure_renames_the_graph(tmp_path):
    qmodel = make_qmodel({})
    path = export_onnx(qmodel, tmp_path / "model.onnx", torch.zeros(1, *SHAPE)).path
    with torch.no_grad():
        qmodel.net.head.bias.add_(torch.linspace(-50, 50, 10))  # the graph no longer matches
    result = verify_onnx(path, qmodel, random_loader(SHAPE, 64), min_agreement=99.0)
    assert not result["passed"]
    with pytest.raises(VerificationError, match="agreement"):
        fail_export(path, result)
    assert not path.exists() and (tmp_path / "model.FAILED-verification.onnx").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_broken_onnx_is_a_user_error(tmp_path, int8_model, damage):
    path = export_onnx(int8_model, tmp_path / "m.onnx", torch.zeros(1, *SHAPE)).path
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x13not an onnx model" * 50)
    else:
        path.unlink()
    with pytest.raises(UserError, match=str(path.name)):
        verify_onnx(path, int8_model, random_loader(SHAPE, 8))


def test_export_quantized_writes_verified_artifacts(tmp_path):
    from hmqsearch.models.small_cnn import SmallCNN

    torch.manual_seed(0)
    spec = QuantSpec(weight_bits=[2, 4, 8], act_bits=[4, 8])
    x = torch.randn(32, 1, 8, 8)
    qmodel = prepare(SmallCNN(), spec, x[:8])
    calibrate_activations(qmodel, [x])
    qmodel.set_state("fixed")
    loader = [(x, torch.randint(0, 10, (32,)))]
    cfg = {"verify_samples": 32, "latency_repeats": 3, "latency_warmup": 1}
    arch = {"_target_": "hmqsearch.models.small_cnn.SmallCNN"}
    figures = export_quantized(qmodel, tmp_path, x, loader, cfg, arch=arch, spec=spec)["export"]
    assert (tmp_path / "model.onnx").is_file()
    assert (tmp_path / "model.packed.safetensors").is_file() and (tmp_path / "model.packed.json").is_file()
    assert figures["packed_bytes"] == sum(exact_weight_bytes(qmodel, "packed").values())
    assert figures["onnx_bytes"] == (tmp_path / "model.onnx").stat().st_size
    assert figures["verify"]["agreement"] == 100.0 and figures["verify"]["samples"] == 32
    assert figures["measured_latency_ms"] > 0 and figures["measured_float_latency_ms"] > 0
    with pytest.raises(UserError, match="tolerance_agreement"):
        export_quantized(qmodel, tmp_path, x, loader, {"tolerance_agreement": 150}, arch={"_target_": "x"}, spec=spec)


def test_cli_help_and_bad_input(tmp_path, capsys):
    for argv in (["--help"], ["export", "--help"], ["verify", "--help"], ["profile", "--help"]):
        with pytest.raises(SystemExit) as exc:
            cli_main(argv)
        assert exc.value.code == 0
    assert "hmqsearch" in capsys.readouterr().out
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"truncated")
    proc = subprocess.run(
        [sys.executable, "-m", "hmqsearch.cli", "verify", str(bad), "--packed", str(tmp_path / "none.packed")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert cli_main(["export", "--packed", str(tmp_path / "missing.packed.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_all_int4_resnet20_graph_is_under_016_of_float32(tmp_path):
    """The issue's size target on CIFAR ResNet-20 (random weights: sizes do not depend on values)."""
    from hmqsearch.models.resnet_cifar import resnet20

    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    qmodel = prepare(resnet20(), QuantSpec(weight_bits=[4, 8], act_bits=[8]), x)
    calibrate_activations(qmodel, [x])
    for _, layer in qmodel.layers():
        layer.wq.fix(layer.wq.scheme_at(4))
    qmodel.set_state("fixed")
    int4 = export_onnx(qmodel.eval(), tmp_path / "int4.onnx", x)
    fp32 = export_onnx(qmodel, tmp_path / "fp32.onnx", x, as_float=True)
    assert int4.weight_bytes == sum(exact_weight_bytes(qmodel, "container").values())
    assert int4.onnx_bytes < 0.16 * fp32.onnx_bytes
