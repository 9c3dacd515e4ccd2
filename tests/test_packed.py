"""Bit packing at every width and the packed checkpoint: exact bytes, exact reload, bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from onnx import numpy_helper

from hmqsearch.cost.size import exact_weight_bytes, overhead_bytes
from hmqsearch.errors import UserError
from hmqsearch.export.intpack import pack, packed_size, unpack
from hmqsearch.export.onnx_export import int_initializer
from hmqsearch.export.packed import load_packed, packed_paths, save_packed
from hmqsearch.models.small_cnn import SmallCNN
from hmqsearch.quant.calibrate import calibrate_activations
from hmqsearch.quant.prepare import Pin, QuantModel, QuantSpec, prepare
from hmqsearch.quant.scheme import Scheme

ARCH = {"_target_": "hmqsearch.models.small_cnn.SmallCNN", "in_channels": 1, "num_classes": 10, "width": 16}
SHAPE = (1, 8, 8)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [1, 7, 8, 1001])
def test_pack_round_trip_every_width(bits, signed, n):
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    values = np.random.default_rng(bits * 100 + n).integers(lo, hi + 1, size=n)
    if bits == 1 and signed:  # the binary grid {-1, +1}
        lo, hi = -1, 1
        values = np.where(values < 0, -1, 1)
    values[0], values[-1] = lo, hi  # both ends of the range
    data = pack(values, bits, signed)
    assert data.dtype == np.uint8 and data.size == packed_size(n, bits) == -(-n * bits // 8)
    assert np.array_equal(unpack(data, n, bits, signed), values)


def test_pack_rejects_out_of_range_and_bad_widths():
    with pytest.raises(ValueError, match="do not fit 3-bit signed"):
        pack(np.array([4]), 3, True)
    with pytest.raises(ValueError, match="do not fit 4-bit unsigned"):
        pack(np.array([-1]), 4, False)
    with pytest.raises(ValueError, match="bits=9"):
        pack(np.array([0]), 9, False)
    with pytest.raises(ValueError, match="fewer than"):
        unpack(np.zeros(1, np.uint8), 3, 4, True)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [16, 15])
def test_int4_packing_is_onnx_int4(signed, n):
    """Our 4-bit packing is ONNX's int4/uint4 layout (first value in the low nibble)."""
    codes = np.arange(n) - (8 if signed else 0)
    tensor = int_initializer("w", codes, Scheme(4, signed, (0,)))
    assert len(tensor.raw_data) == -(-n // 2)
    assert np.array_equal(numpy_helper.to_array(tensor).astype(np.int64), codes)


def make_qmodel(spec: QuantSpec, bits: dict[str, tuple[int, int]]) -> QuantModel:
    torch.manual_seed(0)
    net = SmallCNN()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(32, *SHAPE)
    qmodel = prepare(net, spec, x[:8])
    calibrate_activations(qmodel, [x])
    for name, layer in qmodel.layers():
        wb, ab = bits.get(name, (8, 8))
        if not layer.wq.float_pinned:
            layer.wq.fix(layer.wq.scheme_at(wb, 2))
        if not layer.aq.float_pinned:
            layer.aq.fix(layer.aq.scheme_at(ab, 0))
    qmodel.set_state("fixed")
    return qmodel


SPECS = {
    "mixed": (
        QuantSpec(weight_bits=[1, 2, 3, 5, 7, 8], act_bits=[4, 8], pins=[Pin("linear", weight_bits="float")]),
        {"conv1": (3, 8), "block_conv1": (1, 4), "block_conv2": (5, 4), "down": (7, 8)},
    ),
    "per_tensor_unfolded": (  # one scale per layer; batch norms kept (stored as extra state)
        QuantSpec(weight_bits=[2, 6], act_bits=[8], weight_per_channel=False, fold_bn=False),
        {"conv1": (2, 8), "block_conv1": (6, 8), "block_conv2": (2, 8), "down": (6, 8), "linear": (2, 8)},
    ),
}


@pytest.mark.parametrize("case", list(SPECS))
def test_packed_checkpoint_reloads_exactly(tmp_path, case):
    spec, bits = SPECS[case]
    qmodel = make_qmodel(spec, bits)
    meta = save_packed(tmp_path / "model.packed", qmodel, arch=ARCH, spec=spec, example=torch.zeros(1, *SHAPE))
    st_path, json_path = packed_paths(tmp_path / "model.packed")
    assert st_path.name == "model.packed.safetensors" and json_path.is_file()

    expected = exact_weight_bytes(qmodel, "packed")
    assert meta["packed_bytes"] == sum(expected.values())
    assert meta["per_layer_packed_bytes"] == expected
    from safetensors.numpy import load_file

    tensors = load_file(str(st_path))
    layer_bytes = sum(v.nbytes for k, v in tensors.items() if not k.startswith(("extra/", "input/")))
    # exactly the packed weights + int8 exponents + biases
    assert layer_bytes == sum(expected.values()) + overhead_bytes(qmodel, "packed") == meta["packed_bytes"] + meta["overhead_bytes"]
    assert (meta["extra_bytes"] > 0) == (not spec.fold_bn)

    loaded = load_packed(st_path)
    x = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
    for (_, a), (_, b) in zip(loaded.layers(), qmodel.layers()):
        assert a.wq.float_pinned == b.wq.float_pinned
        if not a.wq.float_pinned:
            assert a.wq.argmax() == b.wq.argmax() and a.aq.argmax() == b.aq.argmax()


@pytest.fixture
def saved(tmp_path):
    spec, bits = SPECS["mixed"]
    save_packed(tmp_path / "model.packed", make_qmodel(spec, bits), arch=ARCH, spec=spec, example=torch.zeros(1, *SHAPE))
    return packed_paths(tmp_path / "model.packed")


@pytest.mark.parametrize(
    "damage,message",
    [
        ("truncate", "corrupt or truncated"),
        ("flip", "corrupt or truncated"),
        ("no_tensors", "does not exist"),
        ("no_json", "does not exist"),
        ("bad_json", "not valid JSON"),
        ("other_json", "not a hmqsearch packed checkpoint"),
        ("bad_target", "cannot build the architecture"),
    ],
)
def test_damaged_checkpoint_is_a_clear_user_error(saved, damage, message):
    st_path, json_path = saved
    data = st_path.read_bytes()
    if damage == "truncate":
        st_path.write_bytes(data[: len(data) - 100])
    elif damage == "flip":
        st_path.write_bytes(data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))
    elif damage == "no_tensors":
        st_path.unlink()
    elif damage == "no_json":
        json_path.unlink()
    elif damage == "bad_json":
        json_path.write_text(json_path.read_text()[:50])
    elif damage == "other_json":
        json_path.write_text(json.dumps({"hello": "world"}))
    else:
        meta = json.loads(json_path.read_text())
        meta["architecture"]["_target_"] = "no.such.module.Net"
        json_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=message) as exc:
        load_packed(st_path)
    assert str(st_path.parent) in str(exc.value)


def test_checkpoint_without_architecture_loads_into_the_callers_model(tmp_path):
    spec, bits = SPECS["mixed"]
    qmodel = make_qmodel(spec, bits)
    example = torch.randn(4, *SHAPE)
    meta = save_packed(tmp_path / "model.packed", qmodel, spec=spec, example=example)
    assert meta["architecture"] is None and meta["inputs"] == {"kind": "tensor", "names": ["input"]}
    with pytest.raises(UserError, match=r"saved without a Hydra architecture .* load_packed\(path, MyModel"):
        load_packed(tmp_path / "model.packed")
    net = SmallCNN(in_channels=1, num_classes=10, width=16)
    loaded = load_packed(tmp_path / "model.packed", net)
    with torch.no_grad():
        assert torch.equal(loaded(example), qmodel(example))
    with pytest.raises(UserError, match="other quantized layers than the checkpoint"):
        load_packed(tmp_path / "model.packed", torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)))


def test_version_1_checkpoint_still_loads(tmp_path):
    """Version 1 stored a float input shape and no example sample: it still loads."""
    spec, bits = SPECS["mixed"]
    qmodel = make_qmodel(spec, bits)
    save_packed(tmp_path / "model.packed", qmodel, arch=ARCH, spec=spec, example=torch.zeros(1, *SHAPE))
    _, json_path = packed_paths(tmp_path / "model.packed")
    meta = json.loads(json_path.read_text())
    meta["version"] = 1
    del meta["inputs"]
    json_path.write_text(json.dumps(meta))
    x = torch.randn(8, *SHAPE)
    with torch.no_grad():
        assert torch.equal(load_packed(json_path)(x), qmodel(x))
