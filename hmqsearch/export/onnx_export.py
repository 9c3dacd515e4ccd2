"""ONNX QDQ deployment graph of a fixed-state :class:`QuantModel`.

Route: every quantized layer is swapped for a marker module whose ``torch.autograd.Function``
exports as one custom node; the rest of the network (ReLU, adds, padding, slicing, pooling,
flatten, ...) goes through torch's TorchScript ONNX exporter unchanged.  Each marker node is
then expanded into standard opset-21 nodes:

    x -> [Clip(lo, hi)] -> QuantizeLinear(s, 0) -> DequantizeLinear --+
    W_int (int8 | int4) -> DequantizeLinear(s_c, 0, axis=0) ----------+-> Conv | Gemm (+ float bias)

* Weights are integer initializers (int8 for 5-8 bits, int4 for 1-4 bits, ONNX's packed int4)
  with float32 power-of-two per-channel scales and zero point 0.
* Input activations are QuantizeLinear -> DequantizeLinear in int8/uint8/int4/uint4 (unsigned
  when the scheme is).  When the bit-width is narrower than its container (e.g. 6 bits in an
  int8) a Clip to [qmin * s, qmax * s] comes first, so the codes keep the narrower range.
* Tensors pinned to float stay float.
* An embedding is ``Gather`` from its dequantized integer table (int8/int4 codes, one scale
  per row); its index input is not quantized.
* A layer called more than once (a shared layer) stores its weights once: every call site
  reads the same dequantized weight tensor and quantizes its input with the layer's one
  input scheme (the input quantizer is shared by the call sites, as in PyTorch).
* The graph takes the model's inputs as they are (:mod:`hmqsearch.inputs`): one input per
  tensor, named ``input``, ``input_0``, ... or after the dict's keys, each with its own dtype
  (int64 token ids stay int64) and a dynamic batch axis; the output is the logits.

The graph is lossless: QuantizeLinear rounds half to even and all scales are powers of two,
so every quantized value equals PyTorch's fake quantization bit for bit (onnxruntime with
graph optimizations off reproduces the PyTorch logits exactly).

Graph forms.  onnxruntime (CPU) turns ``DQ(x) -> Conv(DQ(W)) -> [Relu] -> Q`` into QLinearConv,
an integer kernel, but only for 8-bit containers and only when the layer's output feeds the
next quantizer; a DQ'd weight that is not fused keeps its Conv from prepacking the weights
and runs at about half the float speed.  ``form="onnxruntime"`` (default) therefore writes:

* fusable layers: ``W_int8 -> DQ``, and ``W_int4 -> Cast(int8) -> DQ`` (folded at load time;
  onnxruntime has no int4 convolution) -> QLinearConv;
* the other layers: ``W_int -> Cast(float) -> Mul(scale)``, which onnxruntime folds into a
  prepacked float weight at load time.

``form="portable"`` puts DequantizeLinear directly on every integer weight (the textbook QDQ
form, for runtimes that fuse it themselves, e.g. TensorRT).  Both forms store the same
integers and compute the same values.  A layer whose output reaches a quantizer through
Relu/Clip alone also gets the DequantizeLinear weight, because onnxruntime would otherwise
requantize its float weight per tensor (:func:`requantized_by_onnxruntime`).  Integer kernels
add the bias as int32 at s_x * s_w; the quantized layers keep their bias on that grid
(:meth:`~hmqsearch.quant.layers.QuantLayerMixin.effective_bias`), so onnxruntime with all
its optimizations reproduces the PyTorch model exactly too (float32 accumulation order aside).
"""

from __future__ import annotations

import copy
import inspect
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from hmqsearch.errors import UserError
from hmqsearch.export.bn_fold import fold_batchnorm_into
from hmqsearch.export.deployed import DeployedLayer, deployed_layers
from hmqsearch.export.intpack import pack
from hmqsearch.inputs import Inputs, apply, named_tensors, rebuild, run_model, structure, take
from hmqsearch.io import atomic_write
from hmqsearch.quant.attention import fastpath_disabled
from hmqsearch.quant.fold import _replace_module
from hmqsearch.quant.prepare import QuantModel
from hmqsearch.quant.scheme import Scheme

log = logging.getLogger(__name__)

OPSET = 21  # QuantizeLinear/DequantizeLinear with int4/uint4
IR_VERSION = 10  # the IR that introduced int4 and opset 21; onnxruntime >= 1.18 reads it
TRACE_OPSET = 20  # the highest the TorchScript exporter writes; 20 -> 21 changed no semantics
MARKER_DOMAIN = "hmqsearch.export"
OUTPUT_NAME = "logits"
FORMS = ("onnxruntime", "portable")

_CONTAINER = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4,
              (8, True): TensorProto.INT8, (8, False): TensorProto.UINT8}


def container_type(scheme: Scheme) -> int:
    """ONNX element type holding the scheme's codes."""
    return _CONTAINER[(scheme.container_bits, scheme.signed)]


def int_initializer(name: str, codes: np.ndarray, scheme: Scheme) -> onnx.TensorProto:
    """Integer codes as an int8/uint8 or (packed, low nibble first) int4/uint4 initializer."""
    if scheme.container_bits == 8:
        return numpy_helper.from_array(codes.astype(np.int8 if scheme.signed else np.uint8), name)
    raw = pack(codes, 4, scheme.signed).tobytes()
    return helper.make_tensor(name, container_type(scheme), list(codes.shape), raw, raw=True)


def _zero_point(name: str, scheme: Scheme, shape: list[int]) -> onnx.TensorProto:
    return int_initializer(name, np.zeros(shape, dtype=np.int32), scheme)


def _f32(value: float | np.ndarray, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


@dataclass
class Subgraph:
    """Nodes and initializers that implement one deployed layer."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    weight_bytes: int = 0  # weight tensors as stored (integer containers, or float32)
    overhead_bytes: int = 0  # their float32 scales and the biases

    def init(self, tensor: onnx.TensorProto, counts_as: str | None = None) -> str:
        """Add an initializer; ``counts_as`` "weight" or "overhead" adds its bytes to that count."""
        self.initializers.append(tensor)
        size = len(tensor.raw_data) or numpy_helper.to_array(tensor).nbytes
        if counts_as == "weight":
            self.weight_bytes += size
        elif counts_as == "overhead":
            self.overhead_bytes += size
        return tensor.name

    def node(self, op: str, inputs: list[str], output: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output


def quantize_dequantize(sub: Subgraph, x: str, scheme: Scheme, prefix: str) -> str:
    """x -> [Clip] -> QuantizeLinear -> DequantizeLinear for a per-tensor activation scheme."""
    step = float(scheme.steps[0])
    qmin, qmax = scheme.qrange
    if not scheme.fills_container:
        lo = sub.init(_f32(qmin * step, f"{prefix}_clip_lo"))
        hi = sub.init(_f32(qmax * step, f"{prefix}_clip_hi"))
        x = sub.node("Clip", [x, lo, hi], f"{prefix}_clipped")
    scale = sub.init(_f32(step, f"{prefix}_scale"))
    zp = sub.init(_zero_point(f"{prefix}_zero_point", scheme, []))
    q = sub.node("QuantizeLinear", [x, scale, zp], f"{prefix}_quantized")
    return sub.node("DequantizeLinear", [q, scale, zp], f"{prefix}_dequantized")


def _weight(sub: Subgraph, layer: DeployedLayer, form: str, fused: bool) -> str:
    """The layer's float weight tensor as computed from its integer initializer."""
    name, scheme = layer.name, layer.wscheme
    if scheme is None or layer.codes is None:
        return sub.init(_f32(layer.weight, f"{name}.weight"), "weight")
    w = sub.init(int_initializer(f"{name}.weight_quantized", layer.codes, scheme), "weight")
    steps = scheme.steps if layer.channel_scale is None else (scheme.steps * layer.channel_scale).astype(np.float32)
    per_channel = steps.size > 1
    if form == "onnxruntime" and not fused:  # folded by onnxruntime into a float weight
        shape = (-1,) + (1,) * (layer.codes.ndim - 1) if per_channel else ()
        scale = sub.init(_f32(steps.reshape(shape), f"{name}.weight_scale"), "overhead")
        wf = sub.node("Cast", [w], f"{name}.weight_float", to=TensorProto.FLOAT)
        return sub.node("Mul", [wf, scale], f"{name}.weight_dequantized")
    scale = sub.init(_f32(steps if per_channel else steps[0], f"{name}.weight_scale"), "overhead")
    if form == "onnxruntime" and scheme.container_bits == 4:  # int4 codes widened for QLinearConv
        scheme = scheme.at_bits(8)
        w = sub.node("Cast", [w], f"{name}.weight_int8", to=container_type(scheme))
    zp = sub.init(_zero_point(f"{name}.weight_zero_point", scheme, [steps.size] if per_channel else []))
    attrs = {"axis": 0} if per_channel else {}
    return sub.node("DequantizeLinear", [w, scale, zp], f"{name}.weight_dequantized", **attrs)


def weight_subgraph(layer: DeployedLayer, form: str = "portable", fused: bool = False) -> tuple[Subgraph, str]:
    """The nodes computing the layer's float weight tensor from its integer initializer, and its name."""
    if form not in FORMS:
        raise UserError(f"export.form={form!r}; allowed: {', '.join(FORMS)}")
    sub = Subgraph()
    return sub, _weight(sub, layer, form, fused)


def call_subgraph(layer: DeployedLayer, x: str, y: str, input_rank: int, w: str, prefix: str) -> Subgraph:
    """The nodes computing ``y = layer(x)`` from the weight tensor ``w``; ``prefix`` names the
    call site's own nodes (the layer's name, with ``#<k>`` from a shared layer's second call on)."""
    sub = Subgraph()
    name = layer.name
    if layer.kind == "embedding":
        sub.nodes.append(helper.make_node("Gather", [w, x], [y], name=f"{prefix}.gather", axis=0))
        return sub
    if layer.ascheme is not None:
        x = quantize_dequantize(sub, x, layer.ascheme, f"{prefix}.input")
    inputs = [x, w]
    if layer.bias is not None:
        inputs.append(f"{name}.bias")
    if layer.kind == "conv":
        sub.nodes.append(helper.make_node(
            "Conv", inputs, [y], name=f"{prefix}.conv", kernel_shape=list(layer.weight.shape[2:]),
            strides=list(layer.stride), pads=list(layer.pads), dilations=list(layer.dilation), group=layer.groups,
        ))
    elif input_rank == 2:
        sub.nodes.append(helper.make_node("Gemm", inputs, [y], name=f"{prefix}.gemm", transB=1))
    else:  # Linear on [..., in]: MatMul with W^T, then the bias
        wt = sub.node("Transpose", [w], f"{prefix}.weight_t", perm=[1, 0])
        if layer.bias is None:
            sub.nodes.append(helper.make_node("MatMul", [x, wt], [y], name=f"{prefix}.matmul"))
        else:
            mm = sub.node("MatMul", [x, wt], f"{prefix}.matmul")
            sub.nodes.append(helper.make_node("Add", [mm, inputs[2]], [y], name=f"{prefix}.add_bias"))
    return sub


def _bias_subgraph(sub: Subgraph, layer: DeployedLayer) -> None:
    if layer.bias is not None:
        sub.init(_f32(layer.bias, f"{layer.name}.bias"), "overhead")


def layer_subgraph(
    layer: DeployedLayer, x: str, y: str, input_rank: int, form: str = "portable", fused: bool = False
) -> Subgraph:
    """The opset-21 nodes computing ``y = layer(x)`` as deployed (weights and one call)."""
    sub, w = weight_subgraph(layer, form, fused)
    _bias_subgraph(sub, layer)
    call = call_subgraph(layer, x, y, input_rank, w, layer.name)
    sub.nodes += call.nodes
    sub.initializers += call.initializers
    return sub


# ---------------------------------------------------------------- tracing with markers
class _MarkerOp(torch.autograd.Function):
    """Runs the deployed layer in PyTorch; exports as one ``hmqsearch.export::QuantLayer`` node."""

    @staticmethod
    def forward(ctx, x: Tensor, index: int, module: "_MarkerLayer") -> Tensor:  # noqa: ANN001
        return module.compute(x)

    @staticmethod
    def symbolic(g, x, index: int, module: "_MarkerLayer"):  # noqa: ANN001, ANN205 - TorchScript values
        out = g.op(f"{MARKER_DOMAIN}::QuantLayer", x, index_i=index, rank_i=x.type().dim())
        sizes = module.out_sizes(x.type().varyingSizes())
        out.setType(x.type().with_dtype(torch.float32).with_sizes([None, *sizes[1:]]))
        return out


class _MarkerLayer(nn.Module):
    """Stand-in for a quantized layer during tracing (plain tensor ops, no quantizer state)."""

    def __init__(self, layer: DeployedLayer, index: int) -> None:
        super().__init__()
        self.index = index
        self.layer = layer

    def out_sizes(self, sizes: list[int | None]) -> list[int | None]:
        """The output's sizes for an input of ``sizes`` (None: not known), for the marker's type."""
        d = self.layer
        if d.kind == "embedding":
            return [*sizes, d.weight.shape[1]]
        if d.kind == "linear":
            return [*sizes[:-1], d.weight.shape[0]]
        spatial = []
        n = len(d.stride)
        for i, size in enumerate(sizes[2:]):
            k, s, dil = d.weight.shape[2 + i], d.stride[i], d.dilation[i]
            total = None if size is None else size + d.pads[i] + d.pads[n + i]
            spatial.append(None if total is None else (total - dil * (k - 1) - 1) // s + 1)
        return [sizes[0], d.weight.shape[0], *spatial]

    def compute(self, x: Tensor) -> Tensor:
        d = self.layer
        w = torch.from_numpy(d.weight)
        if d.kind == "embedding":
            return F.embedding(x, w)
        if d.ascheme is not None:
            step = float(d.ascheme.steps[0])
            qmin, qmax = d.ascheme.qrange
            x = torch.round(torch.clamp(x, qmin * step, qmax * step) / step) * step
        b = None if d.bias is None else torch.from_numpy(d.bias)
        if d.kind == "linear":
            return F.linear(x, w, b)
        n = len(d.stride)
        pad = [p for i in reversed(range(n)) for p in (d.pads[i], d.pads[n + i])]  # F.pad: last axis first
        conv = F.conv1d if n == 1 else F.conv2d
        return conv(F.pad(x, pad), w, b, d.stride, 0, d.dilation, d.groups)

    def forward(self, x: Tensor) -> Tensor:
        return _MarkerOp.apply(x, self.index, self)


class _Graphable(nn.Module):
    """The network called on flat input tensors (ONNX inputs), returning its logits."""

    def __init__(self, net: nn.Module, desc: dict) -> None:
        super().__init__()
        self.net = net
        self.desc = desc

    def forward(self, *tensors: Tensor) -> Tensor:
        return run_model(self.net, rebuild(self.desc, list(tensors)))


def trace_markers(
    qmodel: QuantModel, layers: list[DeployedLayer], example: Inputs, folded: Sequence[str] = ()
) -> onnx.ModelProto:
    """The network traced to ONNX with one marker node per quantized layer call (not yet runnable);
    the batch norms named in ``folded`` (already folded into ``layers``) become identities."""
    net = copy.deepcopy(qmodel.net).eval()
    modules = dict(net.named_modules())
    for index, layer in enumerate(layers):
        _replace_module(net, modules[layer.name], _MarkerLayer(layer, index))
    for name in folded:
        _replace_module(net, modules[name], nn.Identity())
    named = named_tensors(example)
    input_names = [name for name, _ in named]
    buf = io.BytesIO()
    # torch >= 2.9 defaults to the torch.export-based exporter; the marker needs the TorchScript one
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings(), torch.no_grad(), fastpath_disabled():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            _Graphable(net, structure(example)), tuple(t for _, t in named), buf, opset_version=TRACE_OPSET, **legacy,
            input_names=input_names, output_names=[OUTPUT_NAME],
            dynamic_axes={**{name: {0: "batch"} for name in input_names}, OUTPUT_NAME: {0: "batch"}},
            custom_opsets={MARKER_DOMAIN: 1},
        )
    return onnx.load_from_string(buf.getvalue())


# ---------------------------------------------------------------- which layers fuse
class _Graph:
    """Consumers and constants of a traced graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.constants: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.outputs = {o.name for o in model.graph.output}
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def bound(self, node: onnx.NodeProto, i: int, default: float) -> float | None:
        if len(node.input) <= i or not node.input[i]:
            return default
        value = self.constants.get(node.input[i])
        return None if value is None else float(value)


def _marker_index(node: onnx.NodeProto | None) -> int | None:
    if node is None or node.domain != MARKER_DOMAIN:
        return None
    return next(a.i for a in node.attribute if a.name == "index")


def fusable_layers(traced: onnx.ModelProto, layers: list[DeployedLayer]) -> dict[int, tuple[int, str | None]]:
    """Layers onnxruntime runs as QLinearConv, mapped to (consuming layer, activation between).

    Fusable: a Conv with 8-bit input and quantized weights whose output reaches the next
    layer's 8-bit quantizer alone, directly or through a Relu (unsigned quantizer) or a Clip
    that clips no more than the quantizer does.
    """
    graph = _Graph(traced)
    targets: dict[int, set[tuple[int, str | None] | None]] = {}  # every call of a shared layer must fuse alike
    for node in traced.graph.node:
        i = _marker_index(node)
        if i is not None and _integer_kernel_possible(layers[i]):
            targets.setdefault(i, set()).add(_fusion_target(graph, node, layers))
    return {i: next(iter(t)) for i, t in targets.items() if len(t) == 1 and None not in t}


def _fusion_target(graph: "_Graph", node: onnx.NodeProto, layers: list[DeployedLayer]) -> tuple[int, str | None] | None:
    """(consuming layer, activation between) when this call's output can fuse into an integer kernel."""
    nxt = graph.only_consumer(node.output[0])
    act = nxt.op_type if nxt is not None and nxt.domain == "" else None
    between = nxt
    if act in ("Relu", "Clip"):
        nxt = graph.only_consumer(nxt.output[0])
    j = _marker_index(nxt)
    if j is None or (s := layers[j].ascheme) is None or s.container_bits != 8 or not s.fills_container:
        return None
    step = float(s.steps[0])
    lo, hi = s.qrange[0] * step, s.qrange[1] * step
    if act == "Relu" and s.signed:
        return None
    if act == "Clip":
        cmin, cmax = graph.bound(between, 1, -np.inf), graph.bound(between, 2, np.inf)
        if cmin is None or cmax is None or cmin > lo or cmax < hi:
            return None
    return j, act if act in ("Relu", "Clip") else None


def requantized_by_onnxruntime(traced: onnx.ModelProto, layers: list[DeployedLayer]) -> set[int]:
    """Layers whose float weights onnxruntime would requantize itself, so they need a DQ weight.

    onnxruntime's WeightBiasQuantization (>= 1.20) rewrites a Conv/Gemm whose input comes from a
    per-tensor DequantizeLinear and whose output reaches a QuantizeLinear through Relu/Clip
    nodes alone with a *float* weight initializer: it quantizes that weight to int8 per tensor,
    a lossy change.  A DequantizeLinear weight (our per-channel power-of-two codes) is kept.
    """
    graph = _Graph(traced)
    out: set[int] = set()
    for node in traced.graph.node:
        i = _marker_index(node)
        if i is None or layers[i].ascheme is None or layers[i].wscheme is None:
            continue
        nxt, through_act = graph.only_consumer(node.output[0]), False
        while nxt is not None and nxt.domain == "" and nxt.op_type in ("Relu", "Clip"):
            nxt, through_act = graph.only_consumer(nxt.output[0]), True
        j = _marker_index(nxt)
        if j is None or (s := layers[j].ascheme) is None:
            continue
        # a Relu/Clip (ours or the network's) before a 4-bit quantizer is written as Max/Min
        if s.container_bits == 4 and (through_act or not s.fills_container):
            continue
        out.add(i)
    return out


def _integer_kernel_possible(layer: DeployedLayer) -> bool:
    return (
        layer.kind == "conv" and len(layer.stride) == 2 and layer.wscheme is not None
        and layer.ascheme is not None and layer.ascheme.container_bits == 8
    )


# ---------------------------------------------------------------- assembly
@dataclass
class BuiltGraph:
    """A checked deployment graph and what its quantized layers store."""

    model: onnx.ModelProto
    weight_bytes: int  # weight initializers (= size.exact_weight_bytes on the container basis)
    overhead_bytes: int  # float32 weight scales and biases (= size.overhead_bytes, container)
    integer_kernel_layers: list[str]  # layers onnxruntime can run as QLinearConv


@dataclass
class ExportInfo:
    """What :func:`export_onnx` wrote."""

    path: Path
    onnx_bytes: int
    weight_bytes: int
    overhead_bytes: int
    integer_kernel_layers: list[str]
    form: str


def _expand(traced: onnx.ModelProto, layers: list[DeployedLayer], form: str) -> BuiltGraph:
    fused = set(fusable_layers(traced, layers))
    if form == "portable":  # no int4 convolution kernel in onnxruntime
        fused = {i for i in fused if layers[i].wscheme is not None and layers[i].wscheme.container_bits == 8}
    dq_weight = fused | requantized_by_onnxruntime(traced, layers)
    graph = traced.graph
    nodes: list[onnx.NodeProto] = []
    inits = list(graph.initializer)
    weight_bytes = overhead_bytes = 0
    weights: dict[int, str] = {}  # layer index -> its weight tensor, written at the first call
    calls: dict[int, int] = {}
    for node in graph.node:
        index = _marker_index(node)
        if index is None:
            nodes.append(node)
            continue
        layer = layers[index]
        if index not in weights:
            sub, weights[index] = weight_subgraph(layer, form, index in dq_weight)
            _bias_subgraph(sub, layer)
            nodes += sub.nodes
            inits += sub.initializers
            weight_bytes += sub.weight_bytes
            overhead_bytes += sub.overhead_bytes
        calls[index] = calls.get(index, 0) + 1
        prefix = layer.name if calls[index] == 1 else f"{layer.name}#{calls[index]}"
        rank = next(a.i for a in node.attribute if a.name == "rank")
        call = call_subgraph(layer, node.input[0], node.output[0], rank, weights[index], prefix)
        nodes += call.nodes
        inits += call.initializers
    nodes, shield_inits = _shield_4bit_quantizers(nodes, inits)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(inits + shield_inits)
    del graph.value_info[:]
    opsets = [o for o in traced.opset_import if o.domain not in (MARKER_DOMAIN, "")]
    del traced.opset_import[:]
    traced.opset_import.extend([helper.make_opsetid("", OPSET), *opsets])
    traced.ir_version = IR_VERSION
    model = onnx.shape_inference.infer_shapes(traced, check_type=True, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    del model.graph.value_info[:]  # checked; runtimes infer shapes themselves, the file stays small
    return BuiltGraph(model, weight_bytes, overhead_bytes, [layers[i].name for i in sorted(fused)])


_FOUR_BIT = (TensorProto.INT4, TensorProto.UINT4)


def _shield_4bit_quantizers(
    nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Write a Relu or Clip that feeds a 4-bit QuantizeLinear as Max/Min (same values).

    onnxruntime (up to 1.31 at least) drops a Relu before QuantizeLinear(int4, 0) as if the
    zero point were the type's minimum, and its QDQ selectors throw on Conv -> Clip ->
    QuantizeLinear(int4/uint4) while checking whether the Clip is redundant.
    """
    types = {i.name: i.data_type for i in inits}
    producer = {out: n for n in nodes for out in n.output}
    targets = {
        id(p) for n in nodes
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and types.get(n.input[2]) in _FOUR_BIT
        and (p := producer.get(n.input[0])) is not None and p.op_type in ("Relu", "Clip")
    }
    out_nodes: list[onnx.NodeProto] = []
    extra: list[onnx.TensorProto] = []
    for n in nodes:
        if id(n) not in targets:
            out_nodes.append(n)
            continue
        x, y = n.input[0], n.output[0]
        lo = n.input[1] if n.op_type == "Clip" and len(n.input) > 1 and n.input[1] else None
        hi = n.input[2] if n.op_type == "Clip" and len(n.input) > 2 and n.input[2] else None
        if n.op_type == "Relu":
            lo = f"{y}_zero"
            extra.append(_f32(0.0, lo))
        steps = [("Max", lo), ("Min", hi)]
        steps = [(op, bound) for op, bound in steps if bound is not None]
        if not steps:
            out_nodes.append(helper.make_node("Identity", [x], [y], name=y))
        for k, (op, bound) in enumerate(steps):
            out = y if k == len(steps) - 1 else f"{y}_{op.lower()}"
            out_nodes.append(helper.make_node(op, [x, bound], [out], name=out))
            x = out
    return out_nodes, extra


def build_onnx(qmodel: QuantModel, example: Inputs, form: str = "onnxruntime", as_float: bool = False) -> BuiltGraph:
    """The checked opset-21 deployment graph of ``qmodel``'s argmax assignment.

    ``as_float``: the same network with every layer in float32 (the reference for speed-ups).
    """
    if form not in FORMS:
        raise UserError(f"export.form={form!r}; allowed: {', '.join(FORMS)}")
    layers = deployed_layers(qmodel)
    if as_float:
        layers = [d.at_bits(None, None) for d in layers]
    return build_graph(qmodel, layers, example, form)


def build_graph(qmodel: QuantModel, layers: list[DeployedLayer], example: Inputs, form: str = "onnxruntime") -> BuiltGraph:
    """The deployment graph of ``qmodel``'s network with its quantized layers deployed as ``layers``."""
    traced, layers = trace_deployment(qmodel, layers, example)
    return _expand(traced, layers, form)


def trace_deployment(
    qmodel: QuantModel, layers: list[DeployedLayer], example: Inputs
) -> tuple[onnx.ModelProto, list[DeployedLayer]]:
    """:func:`trace_markers` of ``layers`` with the batch norms that follow them folded in, and
    the layers as folded (what the expanded graph computes)."""
    layers, folded = fold_batchnorm_into(qmodel, layers)
    one = apply(take(example, 1), lambda t: t.detach().cpu())
    return trace_markers(qmodel, layers, one, folded), layers


def export_onnx(
    qmodel: QuantModel, path: str | Path, example: Inputs, form: str = "onnxruntime", as_float: bool = False
) -> ExportInfo:
    """Write the deployment graph of ``qmodel``'s argmax assignment to ``path`` (atomically).

    ``example``: an input batch as the model takes it (a tensor, tuple or dict of tensors; its
    first sample is traced, dtypes kept; the batch axis is dynamic, the other axes are fixed).
    """
    built = build_onnx(qmodel, example, form, as_float)
    path = atomic_write(path, lambda p: onnx.save_model(built.model, str(p)))
    info = ExportInfo(
        path, path.stat().st_size, built.weight_bytes, built.overhead_bytes, built.integer_kernel_layers, form
    )
    log.info(
        "exported %s (%d bytes; %d of %d layers run as integer kernels in onnxruntime)",
        path, info.onnx_bytes, len(info.integer_kernel_layers), len(qmodel.layer_names),
    )
    return info
